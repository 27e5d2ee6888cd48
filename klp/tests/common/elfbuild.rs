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
