//! A patch module's sections "loaded" at made-up addresses, for the core's ELF code.

use klp::elf::PatchObject;
use klp::elf::reloc::PatchImage;
use klp::{Addr, Errno, KResult};

/// Where the first loaded section goes; the next ones follow 4 KiB apart.
pub const TEXT_ADDR: u64 = 0x1000_0000;

/// The loaded sections: index → (address, bytes).
pub struct Image {
    /// Per section: its address and bytes, if loaded.
    pub secs: Vec<Option<(u64, Vec<u8>)>>,
    /// Section writes so far.
    pub writes: usize,
}

impl Image {
    /// Loads every allocated section of `obj` (not the livepatch relocation sections).
    pub fn load(obj: &PatchObject<'_>) -> Image {
        Self::load_lenient(obj)
    }

    /// Like [`Image::load`], for any object: a section whose contents cannot be read
    /// is not loaded.
    pub fn load_lenient(obj: &PatchObject<'_>) -> Image {
        let mut secs = Vec::new();
        let mut next = TEXT_ADDR;
        for s in obj.sections() {
            match s {
                Ok(s) if s.is_alloc() && !s.is_klp_rela() => match obj.section_data(s.index) {
                    Ok(d) => {
                        secs.push(Some((next, d.to_vec())));
                        next += 0x1000;
                    }
                    Err(_) => secs.push(None),
                },
                _ => secs.push(None),
            }
        }
        Image { secs, writes: 0 }
    }

    pub fn bytes(&self, i: usize) -> &[u8] {
        &self.secs[i].as_ref().expect("loaded").1
    }
}

impl PatchImage for Image {
    fn section_addr(&self, index: usize) -> Option<Addr> {
        self.secs.get(index)?.as_ref().map(|s| s.0)
    }
    fn section_bytes(&self, index: usize) -> Option<&[u8]> {
        self.secs.get(index)?.as_ref().map(|s| s.1.as_slice())
    }
    fn write_section(&mut self, index: usize, bytes: &[u8]) -> KResult<()> {
        let s = self
            .secs
            .get_mut(index)
            .and_then(Option::as_mut)
            .ok_or(Errno::EINVAL)?;
        assert_eq!(s.1.len(), bytes.len());
        s.1.copy_from_slice(bytes);
        self.writes += 1;
        Ok(())
    }
}
