//! A small writer of relocatable ELF64 objects for tests: sections, symbols and
//! relocations laid out by hand, in either byte order, with any section index a test
//! needs (`SHN_LIVEPATCH` included).

#![allow(dead_code)]

/// One section to write (entry 0, the null section, is implicit).
pub struct Sec {
    pub name: String,
    pub sh_type: u32,
    pub flags: u64,
    pub data: Vec<u8>,
    pub link: u32,
    pub info: u32,
    pub align: u64,
    pub entsize: u64,
}

/// One symbol (entry 0, the null symbol, is implicit).
pub struct SymDef {
    pub name: String,
    pub info: u8,
    pub shndx: u16,
    pub value: u64,
    pub size: u64,
}

pub struct Obj {
    pub big: bool,
    pub machine: u16,
    pub secs: Vec<Sec>,
    pub syms: Vec<SymDef>,
    /// Index of the first global symbol (symtab `sh_info`).
    pub first_global: u32,
}

pub const SHT_PROGBITS: u32 = 1;
pub const SHT_SYMTAB: u32 = 2;
pub const SHT_STRTAB: u32 = 3;
pub const SHT_RELA: u32 = 4;
pub const SHF_ALLOC: u64 = 2;
pub const SHF_EXECINSTR: u64 = 4;
pub const SHF_INFO_LINK: u64 = 0x40;
pub const STB_GLOBAL_FUNC: u8 = 0x12;
pub const STB_GLOBAL_OBJECT: u8 = 0x11;
pub const STB_LOCAL_SECTION: u8 = 0x03;

impl Obj {
    pub fn new(machine: u16, big: bool) -> Obj {
        Obj {
            big,
            machine,
            secs: Vec::new(),
            syms: Vec::new(),
            first_global: 1,
        }
    }

    /// Adds a section; returns its index (1-based, as in the file).
    pub fn section(&mut self, s: Sec) -> u32 {
        self.secs.push(s);
        self.secs.len() as u32
    }

    /// A livepatch module's `.modinfo` (`license=GPL`, `livepatch=Y`); its index.
    pub fn modinfo(&mut self) -> u32 {
        self.section(Sec {
            name: ".modinfo".into(),
            sh_type: SHT_PROGBITS,
            flags: SHF_ALLOC,
            data: b"license=GPL\0livepatch=Y\0".to_vec(),
            link: 0,
            info: 0,
            align: 1,
            entsize: 0,
        })
    }

    /// The number of symbols added so far.
    pub fn symbols_len(&self) -> u32 {
        self.syms.len() as u32
    }

    /// Adds a symbol; returns its index.
    pub fn symbol(&mut self, s: SymDef) -> u32 {
        self.syms.push(s);
        self.syms.len() as u32
    }

    /// The index the symbol table will have: after every added section.
    pub fn symtab_index(&self) -> u32 {
        self.secs.len() as u32 + 1
    }

    /// Relocation entries as section contents.
    pub fn relas(&self, entries: &[(u64, u32, u32, i64)]) -> Vec<u8> {
        let mut v = Vec::new();
        for &(off, sym, ty, addend) in entries {
            self.u64(&mut v, off);
            self.u64(&mut v, (u64::from(sym) << 32) | u64::from(ty));
            self.u64(&mut v, addend as u64);
        }
        v
    }

    fn u16(&self, v: &mut Vec<u8>, x: u16) {
        v.extend_from_slice(&if self.big {
            x.to_be_bytes()
        } else {
            x.to_le_bytes()
        });
    }
    fn u32(&self, v: &mut Vec<u8>, x: u32) {
        v.extend_from_slice(&if self.big {
            x.to_be_bytes()
        } else {
            x.to_le_bytes()
        });
    }
    pub fn u64(&self, v: &mut Vec<u8>, x: u64) {
        v.extend_from_slice(&if self.big {
            x.to_be_bytes()
        } else {
            x.to_le_bytes()
        });
    }

    /// The file.
    pub fn build(&self) -> Vec<u8> {
        let mut shstr = vec![0u8];
        let name_off = |tab: &mut Vec<u8>, n: &str| {
            let o = tab.len() as u32;
            tab.extend_from_slice(n.as_bytes());
            tab.push(0);
            o
        };
        let mut strtab = vec![0u8];
        let mut symtab = vec![0u8; 24];
        for s in &self.syms {
            let n = name_off(&mut strtab, &s.name);
            self.u32(&mut symtab, n);
            symtab.push(s.info);
            symtab.push(0);
            self.u16(&mut symtab, s.shndx);
            self.u64(&mut symtab, s.value);
            self.u64(&mut symtab, s.size);
        }
        let nsecs = self.secs.len() as u32;
        let symtab_idx = nsecs + 1;
        let strtab_idx = nsecs + 2;
        let shstr_idx = nsecs + 3;
        let mut names: Vec<u32> = self
            .secs
            .iter()
            .map(|s| name_off(&mut shstr, &s.name))
            .collect();
        names.push(name_off(&mut shstr, ".symtab"));
        names.push(name_off(&mut shstr, ".strtab"));
        names.push(name_off(&mut shstr, ".shstrtab"));
        let mut out = vec![0u8; 64];
        let place = |out: &mut Vec<u8>, data: &[u8]| {
            while !out.len().is_multiple_of(8) {
                out.push(0);
            }
            let o = out.len() as u64;
            out.extend_from_slice(data);
            o
        };
        let mut offs: Vec<u64> = self.secs.iter().map(|s| place(&mut out, &s.data)).collect();
        offs.push(place(&mut out, &symtab));
        offs.push(place(&mut out, &strtab));
        offs.push(place(&mut out, &shstr));
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
        let shoff = out.len() as u64;
        // Section headers: null, the added ones, symtab, strtab, shstrtab.
        out.extend_from_slice(&[0u8; 64]);
        let hdr = |out: &mut Vec<u8>,
                   name: u32,
                   ty: u32,
                   flags: u64,
                   off: u64,
                   size: u64,
                   link: u32,
                   info: u32,
                   align: u64,
                   ent: u64| {
            self.u32(out, name);
            self.u32(out, ty);
            self.u64(out, flags);
            self.u64(out, 0);
            self.u64(out, off);
            self.u64(out, size);
            self.u32(out, link);
            self.u32(out, info);
            self.u64(out, align);
            self.u64(out, ent);
        };
        for (i, s) in self.secs.iter().enumerate() {
            hdr(
                &mut out,
                names[i],
                s.sh_type,
                s.flags,
                offs[i],
                s.data.len() as u64,
                s.link,
                s.info,
                s.align,
                s.entsize,
            );
        }
        let n = self.secs.len();
        hdr(
            &mut out,
            names[n],
            SHT_SYMTAB,
            0,
            offs[n],
            symtab.len() as u64,
            strtab_idx,
            self.first_global,
            8,
            24,
        );
        hdr(
            &mut out,
            names[n + 1],
            SHT_STRTAB,
            0,
            offs[n + 1],
            strtab.len() as u64,
            0,
            0,
            1,
            0,
        );
        hdr(
            &mut out,
            names[n + 2],
            SHT_STRTAB,
            0,
            offs[n + 2],
            shstr.len() as u64,
            0,
            0,
            1,
            0,
        );
        // The file header.
        let mut h = Vec::new();
        h.extend_from_slice(b"\x7fELF");
        h.push(2);
        h.push(if self.big { 2 } else { 1 });
        h.push(1);
        h.extend_from_slice(&[0; 9]);
        self.u16(&mut h, 1); // ET_REL
        self.u16(&mut h, self.machine);
        self.u32(&mut h, 1);
        self.u64(&mut h, 0);
        self.u64(&mut h, 0);
        self.u64(&mut h, shoff);
        self.u32(&mut h, 0);
        self.u16(&mut h, 64);
        self.u16(&mut h, 0);
        self.u16(&mut h, 0);
        self.u16(&mut h, 64);
        self.u16(&mut h, (nsecs + 4) as u16);
        self.u16(&mut h, shstr_idx as u16);
        out[..64].copy_from_slice(&h);
        let _ = symtab_idx;
        out
    }
}

/// One replaced function of a [`patch`]: (old name, sympos, new function's name).
pub type PatchFunc<'a> = (&'a str, u64, &'a str);

/// A livepatch object for one architecture (`machine`, byte order, the 64-bit
/// absolute relocation type `abs64`): a `.text` with one 16-byte function per
/// replacement (and per callback), the patch description in klp-build's layout
/// (`objects`: object name — `None` for vmlinux — and its functions; callbacks by
/// their `__klp_*_callback_<object>` names in `callbacks`), `livepatch=Y`, and for each
/// `(section object, symbol object, symbol, sympos)` of `klp_slots` an 8-byte slot in
/// `.data.klp` written through `.klp.rela.<section object>..data.klp` with `abs64`.
pub fn patch(
    machine: u16,
    big: bool,
    abs64: u32,
    objects: &[(Option<&str>, &[PatchFunc<'_>])],
    callbacks: &[&str],
    klp_slots: &[(&str, &str, &str, u64)],
) -> Vec<u8> {
    let mut o = Obj::new(machine, big);
    let new_names: Vec<&str> = objects
        .iter()
        .flat_map(|(_, fs)| fs.iter().map(|f| f.2))
        .chain(callbacks.iter().copied())
        .collect();
    let text = o.section(Sec {
        name: ".text".into(),
        sh_type: SHT_PROGBITS,
        flags: SHF_ALLOC | SHF_EXECINSTR,
        data: vec![0xcc; 16 * new_names.len().max(1)],
        link: 0,
        info: 0,
        align: 16,
        entsize: 0,
    });
    let data = o.section(Sec {
        name: ".data.klp".into(),
        sh_type: SHT_PROGBITS,
        flags: SHF_ALLOC | 1,
        data: vec![0; 8 * klp_slots.len().max(1)],
        link: 0,
        info: 0,
        align: 8,
        entsize: 0,
    });
    // Strings, records.
    let mut strings = Vec::new();
    let mut str_at = |s: &str| {
        let at = strings.len() as i64;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        at
    };
    let nfuncs: usize = objects.iter().map(|(_, f)| f.len()).sum();
    let mut objects_data = vec![0u8; 64 * objects.len()];
    let mut funcs_data = vec![0u8; 24 * nfuncs];
    let mut obj_rel: Vec<(u64, &str, i64)> = Vec::new(); // (offset, target, addend)
    let mut fn_rel: Vec<(u64, &str, i64)> = Vec::new();
    let mut fi = 0usize;
    let word = |v: &mut [u8], at: usize, x: u64, n: usize| {
        let b = if big {
            x.to_be_bytes()
        } else {
            x.to_le_bytes()
        };
        if big {
            v[at..at + n].copy_from_slice(&b[8 - n..]);
        } else {
            v[at..at + n].copy_from_slice(&b[..n]);
        }
    };
    for (i, (name, fs)) in objects.iter().enumerate() {
        let at = 64 * i;
        if let Some(n) = name {
            obj_rel.push((at as u64, "$strings", str_at(n)));
        }
        obj_rel.push((at as u64 + 8, "$funcs", 24 * fi as i64));
        word(&mut objects_data, at + 56, fs.len() as u64, 4);
        for (old, sympos, new) in fs.iter() {
            let f = 24 * fi;
            fn_rel.push((f as u64, "$strings", str_at(old)));
            fn_rel.push((f as u64 + 8, new, 0));
            word(&mut funcs_data, f + 16, *sympos, 8);
            fi += 1;
        }
    }
    let strs = o.section(Sec {
        name: ".init.klp_strings".into(),
        sh_type: SHT_PROGBITS,
        flags: SHF_ALLOC | 0x30,
        data: strings,
        link: 0,
        info: 0,
        align: 1,
        entsize: 1,
    });
    let objs = o.section(Sec {
        name: ".init.klp_objects".into(),
        sh_type: SHT_PROGBITS,
        flags: SHF_ALLOC,
        data: objects_data,
        link: 0,
        info: 0,
        align: 8,
        entsize: 0,
    });
    let fns = o.section(Sec {
        name: ".init.klp_funcs".into(),
        sh_type: SHT_PROGBITS,
        flags: SHF_ALLOC,
        data: funcs_data,
        link: 0,
        info: 0,
        align: 8,
        entsize: 0,
    });
    o.modinfo();
    // Symbols: section symbols, then the functions, then the livepatch symbols.
    let s_strs = o.symbol(SymDef {
        name: String::new(),
        info: STB_LOCAL_SECTION,
        shndx: strs as u16,
        value: 0,
        size: 0,
    });
    let s_fns = o.symbol(SymDef {
        name: String::new(),
        info: STB_LOCAL_SECTION,
        shndx: fns as u16,
        value: 0,
        size: 0,
    });
    o.first_global = 3;
    let mut fsyms = Vec::new();
    for (i, n) in new_names.iter().enumerate() {
        fsyms.push((
            *n,
            o.symbol(SymDef {
                name: n.to_string(),
                info: STB_GLOBAL_FUNC,
                shndx: text as u16,
                value: 16 * i as u64,
                size: 16,
            }),
        ));
    }
    let mut klp = Vec::new();
    for (sec_obj, sym_obj, sym, pos) in klp_slots {
        let idx = o.symbol(SymDef {
            name: format!(".klp.sym.{sym_obj}.{sym},{pos}"),
            info: STB_GLOBAL_FUNC,
            shndx: 0xff20,
            value: 0,
            size: 0,
        });
        klp.push((*sec_obj, idx));
    }
    let sym_of = |t: &str| match t {
        "$strings" => s_strs,
        "$funcs" => s_fns,
        n => {
            fsyms
                .iter()
                .find(|f| f.0 == n)
                .expect("a defined function")
                .1
        }
    };
    let obj_entries: Vec<_> = obj_rel
        .iter()
        .map(|&(off, t, a)| (off, sym_of(t), abs64, a))
        .collect();
    let fn_entries: Vec<_> = fn_rel
        .iter()
        .map(|&(off, t, a)| (off, sym_of(t), abs64, a))
        .collect();
    let obj_relas = o.relas(&obj_entries);
    let fn_relas = o.relas(&fn_entries);
    // The relocation sections come last, so the symbol table's index is known.
    let mut sec_objs: Vec<&str> = klp.iter().map(|k| k.0).collect();
    sec_objs.dedup();
    let symtab = o.symtab_index() + 2 + sec_objs.len() as u32;
    o.section(Sec {
        name: ".rela.init.klp_objects".into(),
        sh_type: SHT_RELA,
        flags: SHF_INFO_LINK,
        data: obj_relas,
        link: symtab,
        info: objs,
        align: 8,
        entsize: 24,
    });
    o.section(Sec {
        name: ".rela.init.klp_funcs".into(),
        sh_type: SHT_RELA,
        flags: SHF_INFO_LINK,
        data: fn_relas,
        link: symtab,
        info: fns,
        align: 8,
        entsize: 24,
    });
    for so in sec_objs {
        let entries: Vec<_> = klp
            .iter()
            .enumerate()
            .filter(|(_, k)| k.0 == so)
            .map(|(slot, k)| (8 * slot as u64, k.1, abs64, 0))
            .collect();
        let d = o.relas(&entries);
        o.section(Sec {
            name: format!(".klp.rela.{so}..data.klp"),
            sh_type: SHT_RELA,
            flags: SHF_ALLOC | SHF_INFO_LINK | 0x0010_0000,
            data: d,
            link: symtab,
            info: data,
            align: 8,
            entsize: 24,
        });
    }
    o.build()
}
