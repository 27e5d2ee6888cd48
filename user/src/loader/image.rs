//! A patch file in memory: its allocated sections laid out in one mapping near the
//! object it patches, with room for call stubs and address slots.
//!
//! The mapping has three parts, each page-aligned:
//!
//! | part | holds | protection once sealed |
//! |---|---|---|
//! | text | the executable sections, then the call stubs | read + execute |
//! | rodata | the read-only sections | read |
//! | data | the writable sections (`.bss` zeroed), then the address slots | read + write |
//!
//! Until [`Image::seal`] the whole mapping is read + write and nothing runs it; the
//! loader writes it directly. After, text is written only through
//! [`Image::write_section`] (made writable for the write, then read + execute again,
//! with the architecture's cache maintenance), for the relocations of a library that
//! arrives later.

use std::collections::HashMap;

use klp::Errno;
use klp::arch::{Arch, Native};
use klp::elf::{PatchObject, Section};

use super::{LoadError, errno_text};
use crate::redirect;

/// The largest patch mapping accepted (a hostile `.bss` size is refused, not mapped).
const MAX_IMAGE: u64 = 1 << 30;
/// Stubs and slots start at multiples of this.
const ALIGN: u64 = 8;

const SHT_NOBITS: u32 = 8;
const SHT_RELA: u32 = 4;
const SHF_WRITE: u64 = 0x1;
const SHF_EXECINSTR: u64 = 0x4;

/// Which part of the mapping a section goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Text,
    Rodata,
    Data,
}

/// A bump area of fixed-size entries (stubs or slots), one per symbol of the patch
/// (its key), holding the symbol's current address: an object that goes and comes
/// back elsewhere gets its entries rewritten, not new ones.
#[derive(Debug, Default)]
struct Area {
    next: u64,
    end: u64,
    /// key → (entry address, target written there).
    by_key: HashMap<u64, (u64, u64)>,
}

impl Area {
    fn take(&mut self, len: u64) -> Option<u64> {
        let at = self.next;
        let next = at.checked_add(len.next_multiple_of(ALIGN))?;
        if next > self.end {
            return None;
        }
        self.next = next;
        Some(at)
    }
}

/// One patch file in memory. Unmapped when dropped.
#[derive(Debug)]
pub(crate) struct Image {
    base: u64,
    len: u64,
    /// `[start, end)` of the text part (sections and stubs).
    pub(crate) text: (u64, u64),
    rodata: (u64, u64),
    /// Per section index: where it is loaded and its size.
    sections: Vec<Option<(u64, u64)>>,
    /// Per section index: whether it is in the text part.
    in_text: Vec<bool>,
    stubs: Area,
    slots: Area,
    /// ppc64le: the TOC pointer of the patch (`.toc` + 0x8000, as the kernel's module
    /// loader sets `r2` for a module).
    pub(crate) toc: Option<u64>,
    sealed: bool,
}

/// How many stubs and slots the relocations of `obj` may need at most.
fn count_needs(obj: &PatchObject<'_>) -> Result<(u64, u64), LoadError> {
    let (mut calls, mut slots) = (0u64, 0u64);
    for s in obj.sections() {
        let s = s.map_err(|e| malformed(&e))?;
        if s.sh_type != SHT_RELA {
            continue;
        }
        for r in obj.relas(s.index).map_err(|e| malformed(&e))? {
            match Native::link_class(r.r_type) {
                klp::arch::LinkClass::Call => calls += 1,
                klp::arch::LinkClass::GotSlot { .. } => slots += 1,
                klp::arch::LinkClass::Plain => {}
            }
        }
    }
    Ok((calls, slots))
}

/// A malformed file.
pub(crate) fn malformed(e: &klp::elf::ElfError<'_>) -> LoadError {
    LoadError::new(
        Errno::ENOEXEC,
        format!(
            "the patch file is malformed: {e} ({})",
            errno_text(Errno::ENOEXEC)
        ),
    )
}

fn too_large() -> LoadError {
    LoadError::new(
        Errno::ENOMEM,
        format!(
            "the patch file's sections need more than {} MiB of memory ({})",
            MAX_IMAGE >> 20,
            errno_text(Errno::ENOMEM)
        ),
    )
}

fn part_of(s: &Section<'_>) -> Option<Part> {
    if !s.is_alloc() || s.is_klp_rela() || s.sh_type == SHT_RELA {
        return None;
    }
    Some(if s.sh_flags & SHF_EXECINSTR != 0 {
        Part::Text
    } else if s.sh_flags & SHF_WRITE != 0 {
        Part::Data
    } else {
        Part::Rodata
    })
}

fn page() -> u64 {
    redirect::text::page_size()
}

impl Image {
    /// Lays out the allocated sections of `obj`, maps them as close to
    /// `[anchor_lo, anchor_hi)` (the patched object) as free address space allows,
    /// and copies their contents.
    pub(crate) fn map(
        obj: &PatchObject<'_>,
        anchor_lo: u64,
        anchor_hi: u64,
    ) -> Result<Image, LoadError> {
        let (calls, slot_count) = count_needs(obj)?;
        let n = obj.section_count();
        let mut offsets: Vec<Option<(Part, u64, u64)>> = vec![None; n];
        let mut sizes = [0u64; 3];
        for s in obj.sections() {
            let s = s.map_err(|e| malformed(&e))?;
            let Some(part) = part_of(&s) else { continue };
            let i = part as usize;
            let align = s.align.clamp(1, page());
            if !align.is_power_of_two() {
                return Err(malformed(&klp::elf::ElfError::EntrySize {
                    what: "sh_addralign",
                    value: s.align,
                }));
            }
            let at = sizes[i].next_multiple_of(align);
            let end = at.checked_add(s.size).filter(|&e| e <= MAX_IMAGE);
            let Some(end) = end else {
                return Err(too_large());
            };
            sizes[i] = end;
            if let Some(slot) = offsets.get_mut(s.index) {
                *slot = Some((part, at, s.size));
            }
        }
        let stub_len = calls.saturating_mul(klp::arch::MAX_CALL_STUB as u64);
        let slot_len = slot_count.saturating_mul(8);
        let text_len = sizes[0].next_multiple_of(ALIGN).saturating_add(stub_len);
        let data_len = sizes[2].next_multiple_of(ALIGN).saturating_add(slot_len);
        let pg = page();
        let text_pages = text_len.max(1).next_multiple_of(pg);
        let ro_pages = sizes[1].next_multiple_of(pg);
        let data_pages = data_len.max(ALIGN).next_multiple_of(pg);
        let len = text_pages
            .checked_add(ro_pages)
            .and_then(|l| l.checked_add(data_pages))
            .filter(|&l| l <= MAX_IMAGE)
            .ok_or_else(too_large)?;
        let base = map_near(anchor_lo, anchor_hi, len)?;
        let starts = [base, base + text_pages, base + text_pages + ro_pages];
        let mut img = Image {
            base,
            len,
            text: (base, base + text_pages),
            rodata: (starts[1], starts[1] + ro_pages),
            sections: vec![None; n],
            in_text: vec![false; n],
            stubs: Area {
                next: base + sizes[0].next_multiple_of(ALIGN),
                end: base + text_len,
                by_key: HashMap::new(),
            },
            slots: Area {
                next: starts[2] + sizes[2].next_multiple_of(ALIGN),
                end: starts[2] + data_len,
                by_key: HashMap::new(),
            },
            toc: None,
            sealed: false,
        };
        for (i, o) in offsets.iter().enumerate() {
            let Some((part, off, size)) = *o else {
                continue;
            };
            let addr = starts[part as usize] + off;
            if let Some(s) = img.sections.get_mut(i) {
                *s = Some((addr, size));
            }
            if let Some(t) = img.in_text.get_mut(i) {
                *t = part == Part::Text;
            }
            let sec = obj.section(i).map_err(|e| malformed(&e))?;
            if sec.sh_type == SHT_NOBITS {
                continue;
            }
            let data = obj.section_data(i).map_err(|e| malformed(&e))?;
            let dst = img.bytes_mut(i).ok_or_else(too_large)?;
            let Some(dst) = dst.get_mut(..data.len()) else {
                return Err(malformed(&klp::elf::ElfError::Truncated {
                    what: "section",
                    offset: 0,
                    size,
                }));
            };
            dst.copy_from_slice(data);
        }
        img.toc = obj
            .section_by_name(".toc")
            .and_then(|s| img.section_addr(s.index))
            .or(Some(starts[2]))
            .map(|t| t + 0x8000);
        Ok(img)
    }

    /// The whole mapping `[base, base + len)`.
    pub(crate) fn range(&self) -> (u64, u64) {
        (self.base, self.base + self.len)
    }

    /// Where section `index` is loaded.
    pub(crate) fn section_addr(&self, index: usize) -> Option<u64> {
        self.sections.get(index)?.map(|s| s.0)
    }

    /// The loaded bytes of section `index` (read from the mapping).
    pub(crate) fn bytes(&self, index: usize) -> Option<&[u8]> {
        let (addr, size) = (*self.sections.get(index)?)?;
        // SAFETY: `[addr, addr + size)` lies in the mapping this image owns (laid out
        // by `map`), which stays mapped and readable until the image is dropped; no
        // `&mut` to it exists while `&self` is borrowed (`bytes_mut` takes `&mut self`).
        Some(unsafe { std::slice::from_raw_parts(addr as *const u8, size as usize) })
    }

    /// The loaded bytes of section `index`, writable: only before [`Image::seal`].
    fn bytes_mut(&mut self, index: usize) -> Option<&mut [u8]> {
        if self.sealed {
            return None;
        }
        let (addr, size) = (*self.sections.get(index)?)?;
        // SAFETY: as in `bytes`; before sealing the mapping is read + write and no
        // thread runs or reads it but this one, through this exclusive borrow.
        Some(unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, size as usize) })
    }

    /// Replaces the bytes of section `index` with `new` (same length). Before sealing a
    /// plain copy (text through the architecture's writer, for its cache
    /// maintenance); after, only the bytes that differ are written, text pages made
    /// writable for the write.
    pub(crate) fn write_section(&mut self, index: usize, new: &[u8]) -> Result<(), Errno> {
        let (addr, size) = self
            .sections
            .get(index)
            .copied()
            .flatten()
            .ok_or(Errno::EINVAL)?;
        if new.len() as u64 != size {
            return Err(Errno::EINVAL);
        }
        let text = self.in_text.get(index).copied().unwrap_or(false);
        let old = self.bytes(index).ok_or(Errno::EINVAL)?.to_vec();
        // The runs of bytes that change.
        let mut i = 0;
        while i < new.len() {
            if old.get(i) == new.get(i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < new.len() && old.get(i) != new.get(i) {
                i += 1;
            }
            let run = new.get(start..i).ok_or(Errno::EINVAL)?;
            self.write_at(addr + start as u64, run, text)?;
        }
        Ok(())
    }

    /// Writes `bytes` at `at` inside the mapping (`text`: in the text part).
    fn write_at(&mut self, at: u64, bytes: &[u8], text: bool) -> Result<(), Errno> {
        let end = at.checked_add(bytes.len() as u64).ok_or(Errno::EINVAL)?;
        if at < self.base || end > self.base + self.len {
            return Err(Errno::EINVAL);
        }
        if !text {
            if self.sealed && at >= self.rodata.0 && end <= self.rodata.1 {
                return Err(Errno::EPERM);
            }
            // SAFETY: `[at, end)` lies in the mapping (checked above), outside the
            // read-only part once sealed, so it is writable; the loader is the only
            // writer (its callers hold the process's core lock).
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at as *mut u8, bytes.len()) };
            return Ok(());
        }
        if !klp::arch::SUPPORTED {
            return Err(Errno::ENOSYS);
        }
        let write = <klp::arch::Native as klp_arch::Live>::write_text;
        if !self.sealed {
            // SAFETY: the mapping is read + write before sealing and runs nowhere yet
            // (write_text's conditions 1 and 2); the loader's writes are serialised by
            // the core lock its callers hold (3).
            unsafe { write(at as *mut u8, bytes) };
            return Ok(());
        }
        // SAFETY: the text part is read + execute after sealing (Writable's
        // condition 1).
        let _w = unsafe { redirect::text::Writable::new(at, bytes.len() as u64)? };
        // SAFETY: the pages are writable while `_w` lives (1); the bytes written are a
        // call stub or a relocated field of code that no thread can be running: a call
        // to an object that was not loaded until now (2); writes are serialised by the
        // core lock (3).
        unsafe { write(at as *mut u8, bytes) };
        Ok(())
    }

    /// The call stub of symbol `key` that jumps to `target`: its entry (rewritten if it
    /// jumped elsewhere), or a new one.
    pub(crate) fn stub_for(&mut self, key: u64, target: u64) -> Result<u64, Errno> {
        let at = match self.stubs.by_key.get(&key) {
            Some(&(at, t)) if t == target => return Ok(at),
            Some(&(at, _)) => at,
            None => self
                .stubs
                .take(klp::arch::MAX_CALL_STUB as u64)
                .ok_or(Errno::ENOSPC)?,
        };
        let mut code = [0u8; klp::arch::MAX_CALL_STUB];
        let n = Native::call_stub(at, target, &mut code).map_err(|e| Errno::from_ret(e.errno()))?;
        self.write_at(at, code.get(..n).ok_or(Errno::EINVAL)?, true)?;
        self.stubs.by_key.insert(key, (at, target));
        Ok(at)
    }

    /// The address slot of symbol `key` holding `target`: its entry (rewritten if it
    /// held another address), or a new one.
    pub(crate) fn slot_for(&mut self, key: u64, target: u64) -> Result<u64, Errno> {
        let at = match self.slots.by_key.get(&key) {
            Some(&(at, t)) if t == target => return Ok(at),
            Some(&(at, _)) => at,
            None => self.slots.take(8).ok_or(Errno::ENOSPC)?,
        };
        let bytes = match <Native as Arch>::ENDIAN {
            klp::arch::Endian::Little => target.to_le_bytes(),
            klp::arch::Endian::Big => target.to_be_bytes(),
        };
        self.write_at(at, &bytes, false)?;
        self.slots.by_key.insert(key, (at, target));
        Ok(at)
    }

    /// Makes the text part read + execute and the read-only part read-only. From now
    /// on text is written only through [`Image::write_section`].
    pub(crate) fn seal(&mut self) -> Result<(), LoadError> {
        let protect = |(lo, hi): (u64, u64), prot: i32| -> Result<(), LoadError> {
            if hi <= lo {
                return Ok(());
            }
            // SAFETY: `[lo, hi)` is a whole-page part of the mapping this image owns.
            if unsafe { libc::mprotect(lo as *mut libc::c_void, (hi - lo) as usize, prot) } != 0 {
                let errno = std::io::Error::last_os_error()
                    .raw_os_error()
                    .map_or(Errno::EPERM, Errno::from_ret);
                return Err(LoadError::new(
                    errno,
                    format!(
                        "cannot make the patch's code executable ({}): the system refused mprotect; a policy against executable memory (SELinux execmem, PaX) may forbid it",
                        errno_text(errno)
                    ),
                ));
            }
            Ok(())
        };
        protect(self.text, libc::PROT_READ | libc::PROT_EXEC)?;
        protect(self.rodata, libc::PROT_READ)?;
        self.sealed = true;
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `map_near` for this image alone; the loader
        // drops an image only when no thread can run or read it any more (its patch
        // was never enabled, or was disabled and freed).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len as usize) };
    }
}

/// Maps `len` bytes read + write, as close to `[lo, hi)` as free address space allows:
/// hints just below `lo`, then just above `hi`, at growing distances (1 MiB steps out
/// to 4 GiB, then anywhere).
fn map_near(lo: u64, hi: u64, len: u64) -> Result<u64, LoadError> {
    const STEP: u64 = 1 << 20;
    let pg = page();
    let map = |hint: u64, flags: i32| -> Option<u64> {
        // SAFETY: an anonymous private mapping (with `MAP_FIXED_NOREPLACE`: never over
        // an existing mapping) has no memory preconditions.
        let p = unsafe {
            libc::mmap(
                hint as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(p as u64)
    };
    if lo != 0 {
        for k in 1..=4096u64 {
            let below = lo
                .checked_sub(k * STEP)
                .and_then(|h| h.checked_sub(len))
                .map(|h| h & !(pg - 1));
            let above = hi.checked_add(k * STEP).map(|h| h.next_multiple_of(pg));
            for hint in [below, above].into_iter().flatten() {
                if let Some(a) = map(hint, libc::MAP_FIXED_NOREPLACE) {
                    if a == hint {
                        return Ok(a);
                    }
                    // A kernel (or qemu-user) that took the flag as a plain hint.
                    // SAFETY: `a` is the mapping just made, used by nobody.
                    unsafe { libc::munmap(a as *mut libc::c_void, len as usize) };
                }
            }
        }
    }
    map(0, 0).ok_or_else(|| {
        LoadError::new(
            Errno::ENOMEM,
            format!(
                "no memory for the patch's {} KiB ({})",
                len >> 10,
                errno_text(Errno::ENOMEM)
            ),
        )
    })
}
