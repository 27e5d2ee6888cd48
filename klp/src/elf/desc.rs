//! The patch description of a livepatch object, in upstream klp-build's layout
//! (spec §1.11): `.init.klp_objects` holds one `struct klp_object_ext` per patched
//! object and `.init.klp_funcs` the `struct klp_func_ext` records they point to.
//!
//! ```text
//! klp_object_ext (64 bytes): name @0, funcs @8, callbacks @16 (pre_patch @16,
//!     post_patch @24, pre_unpatch @32, post_unpatch @40, post_unpatch_enabled @48),
//!     nr_funcs @56 (u32)
//! klp_func_ext (24 bytes): old_name @0, new_func @8, sympos @16
//! ```
//!
//! In a relocatable object every pointer field is zero and carries an ordinary
//! relocation (the arch's 64-bit absolute type) naming what it points to; this module
//! reads the records by following those relocations, so the description can be read
//! before the object is loaded. A callback may also be given by a function named with
//! one of the [`CALLBACK_PREFIXES`] followed by the object's name.

use super::{ElfError, PatchObject, Symbol};

/// The section of the object records.
pub const OBJECTS_SECTION: &str = ".init.klp_objects";
/// The section of the function records.
pub const FUNCS_SECTION: &str = ".init.klp_funcs";
/// Size of `struct klp_object_ext`.
pub const OBJECT_EXT_SIZE: u64 = 64;
/// Size of `struct klp_func_ext`.
pub const FUNC_EXT_SIZE: u64 = 24;
/// Name prefixes of callback functions, in the order of [`Callback`].
pub const CALLBACK_PREFIXES: [&str; 4] = [
    "__klp_pre_patch_callback_",
    "__klp_post_patch_callback_",
    "__klp_pre_unpatch_callback_",
    "__klp_post_unpatch_callback_",
];

/// What a pointer field points to: a symbol of the object plus an addend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pointer<'d> {
    /// The symbol the relocation names.
    pub symbol: Symbol<'d>,
    /// The relocation's addend.
    pub addend: i64,
}

/// The four callbacks of an object, in the order of [`CALLBACK_PREFIXES`].
pub type Callbacks<'d> = [Option<Pointer<'d>>; 4];

/// One `struct klp_func_ext`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuncExt<'d> {
    /// The function to replace.
    pub old_name: &'d str,
    /// The replacement.
    pub new_func: Pointer<'d>,
    /// Which of the same-named symbols (0: unique).
    pub sympos: u64,
}

/// One `struct klp_object_ext`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectExt<'d> {
    /// `None` for vmlinux.
    pub name: Option<&'d str>,
    /// The callbacks (from the record, else by name prefix).
    pub callbacks: Callbacks<'d>,
    /// `nr_funcs`.
    pub nr_funcs: u32,
    funcs_section: usize,
    funcs_offset: u64,
}

impl<'d> PatchObject<'d> {
    /// The 8-byte word at `offset` of section `index`'s file contents.
    fn word(&self, index: usize, offset: u64) -> Result<u64, ElfError<'d>> {
        let data = self.section_data(index)?;
        let bytes = super::bytes(data, "a patch description record", offset, 8)?;
        let mut w = [0u8; 8];
        for (d, s) in w.iter_mut().zip(bytes) {
            *d = *s;
        }
        Ok(if self.is_big_endian() {
            u64::from_be_bytes(w)
        } else {
            u64::from_le_bytes(w)
        })
    }

    /// What the pointer field at `offset` of section `index` points to, from the
    /// relocation at that offset (`None`: a NULL pointer, no relocation).
    pub fn pointer(&self, index: usize, offset: u64) -> Result<Option<Pointer<'d>>, ElfError<'d>> {
        for s in self.sections() {
            let s = s?;
            if s.sh_type != super::SHT_RELA || s.is_klp_rela() || s.info as usize != index {
                continue;
            }
            for r in self.relas(s.index)? {
                if r.offset == offset {
                    let symbol = self.symbol(r.sym as usize)?;
                    return Ok(Some(Pointer {
                        symbol,
                        addend: r.addend,
                    }));
                }
            }
        }
        Ok(None)
    }

    /// The NUL-terminated string a pointer points to.
    pub fn string_at(&self, p: &Pointer<'d>) -> Result<&'d str, ElfError<'d>> {
        let err = ElfError::Name {
            what: "a string of the patch description",
            offset: p.symbol.value.wrapping_add(p.addend as u64),
        };
        if !self.is_section_index(p.symbol.shndx) {
            return Err(err);
        }
        let data = self.section_data(p.symbol.shndx as usize)?;
        let at = p.symbol.value.checked_add_signed(p.addend).ok_or(err)?;
        let rest = data
            .get(usize::try_from(at).map_err(|_| err)?..)
            .ok_or(err)?;
        let len = rest.iter().position(|b| *b == 0).ok_or(err)?;
        core::str::from_utf8(rest.get(..len).ok_or(err)?).map_err(|_| err)
    }

    /// The function named `prefix` + `objname`, if the object defines one.
    fn callback_by_name(&self, prefix: &str, objname: &str) -> Option<Pointer<'d>> {
        self.symbols().filter_map(Result::ok).find_map(|s| {
            let rest = s.name.strip_prefix(prefix)?;
            (rest == objname && self.is_section_index(s.shndx)).then_some(Pointer {
                symbol: s,
                addend: 0,
            })
        })
    }

    /// The object records of the patch description (empty if the object has none).
    pub fn klp_objects(
        &self,
    ) -> Result<impl Iterator<Item = Result<ObjectExt<'d>, ElfError<'d>>> + '_, ElfError<'d>> {
        let sec = self.section_by_name(OBJECTS_SECTION);
        // The records that are really in the file (a section's header may claim more).
        let (index, size) = match sec {
            Some(s) => (s.index, self.section_data(s.index)?.len() as u64),
            None => (0, 0),
        };
        if size % OBJECT_EXT_SIZE != 0 {
            return Err(ElfError::EntrySize {
                what: "the size of .init.klp_objects",
                value: size,
            });
        }
        let n = size / OBJECT_EXT_SIZE;
        Ok((0..n).map(move |i| self.object_ext(index, i.saturating_mul(OBJECT_EXT_SIZE))))
    }

    fn object_ext(&self, index: usize, at: u64) -> Result<ObjectExt<'d>, ElfError<'d>> {
        let off = |d: u64| at.saturating_add(d);
        let name = match self.pointer(index, at)? {
            Some(p) => Some(self.string_at(&p)?),
            None => None,
        };
        let funcs = self.pointer(index, off(8))?;
        let nr_funcs = self.word(index, off(56)).map(|w| {
            // nr_funcs is the u32 at @56, in the object's byte order.
            if self.is_big_endian() {
                (w >> 32) as u32
            } else {
                (w & 0xffff_ffff) as u32
            }
        })?;
        let mut callbacks: Callbacks<'d> = [None; 4];
        let objname = name.unwrap_or("vmlinux");
        for (k, (slot, prefix)) in callbacks.iter_mut().zip(CALLBACK_PREFIXES).enumerate() {
            let field = off(16u64.saturating_add((k as u64).saturating_mul(8)));
            *slot = match self.pointer(index, field)? {
                Some(p) => Some(p),
                None => self.callback_by_name(prefix, objname),
            };
        }
        let (funcs_section, funcs_offset) = match funcs {
            Some(p) if self.is_section_index(p.symbol.shndx) => (
                p.symbol.shndx as usize,
                p.symbol
                    .value
                    .checked_add_signed(p.addend)
                    .ok_or(ElfError::Name {
                        what: "funcs of a klp_object_ext",
                        offset: p.symbol.value,
                    })?,
            ),
            Some(p) => {
                return Err(ElfError::SectionIndex {
                    what: "the section funcs of a klp_object_ext points into",
                    index: u64::from(p.symbol.shndx),
                });
            }
            None if nr_funcs == 0 => (0, 0),
            None => {
                return Err(ElfError::Name {
                    what: "funcs of a klp_object_ext (NULL with functions)",
                    offset: at,
                });
            }
        };
        // The records must lie inside their section: a damaged count cannot make a
        // reader walk billions of records.
        if nr_funcs > 0 {
            let size = self.section_data(funcs_section)?.len() as u64;
            let end = u64::from(nr_funcs)
                .checked_mul(FUNC_EXT_SIZE)
                .and_then(|n| n.checked_add(funcs_offset));
            if end.is_none_or(|e| e > size) {
                return Err(ElfError::EntrySize {
                    what: "nr_funcs of a klp_object_ext",
                    value: u64::from(nr_funcs),
                });
            }
        }
        Ok(ObjectExt {
            name,
            callbacks,
            nr_funcs,
            funcs_section,
            funcs_offset,
        })
    }

    /// The function records of `obj`.
    pub fn klp_funcs(
        &self,
        obj: &ObjectExt<'d>,
    ) -> impl Iterator<Item = Result<FuncExt<'d>, ElfError<'d>>> + '_ {
        let (index, base) = (obj.funcs_section, obj.funcs_offset);
        (0..u64::from(obj.nr_funcs)).map(move |i| {
            let at = base.saturating_add(i.saturating_mul(FUNC_EXT_SIZE));
            let old = self.pointer(index, at)?.ok_or(ElfError::Name {
                what: "old_name of a klp_func_ext (NULL)",
                offset: at,
            })?;
            let new_func = self
                .pointer(index, at.saturating_add(8))?
                .ok_or(ElfError::Name {
                    what: "new_func of a klp_func_ext (NULL)",
                    offset: at.saturating_add(8),
                })?;
            Ok(FuncExt {
                old_name: self.string_at(&old)?,
                new_func,
                sympos: self.word(index, at.saturating_add(16))?,
            })
        })
    }
}
