//! Build ids: which build of each object a patch was made for.
//!
//! A livepatch refers to static functions and variables of the objects it patches by
//! name and position, and its replacements were compiled against their source. Fed to
//! another build of the same program, the names may still resolve, to code the patch
//! does not know. The kernel refuses a module built for another kernel by its
//! `vermagic` and `module_layout` version; a process's objects carry a GNU build id
//! (`NT_GNU_BUILD_ID`, `ld --build-id`), so klp-convert records, for every target that
//! has one, the object's name and build id, and the user-space loader compares them
//! with the objects that run.
//!
//! The record is a note section, `.note.klp.build-id`, one note per object: its
//! layout, [`encode`] and [`decode`] live in [`klp_sig::buildid`] (the loader reads the
//! notes with the same code) and are re-exported here. This module reads the
//! targets' own build ids ([`gnu_build_id`]).

use object::elf;
use object::read::elf::{FileHeader, NoteIterator, ProgramHeader as _, SectionHeader as _};
use object::{Endianness, FileKind};

pub use klp_sig::buildid::{MAX_LEN, NT_KLP_BUILD_ID, OWNER, SECTION, decode, encode, hex};

/// The GNU build id of an ELF file (its `NT_GNU_BUILD_ID` note, from a `SHT_NOTE`
/// section, else from a `PT_NOTE` segment), `Ok(None)` when it has none. `Err` says
/// why the file's notes cannot be read.
pub fn gnu_build_id(data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    match FileKind::parse(data) {
        Ok(FileKind::Elf64) => find::<elf::FileHeader64<Endianness>>(data),
        Ok(FileKind::Elf32) => find::<elf::FileHeader32<Endianness>>(data),
        Ok(_) => Err("it is not an ELF file".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn in_notes<Elf: FileHeader>(
    endian: Elf::Endian,
    mut notes: NoteIterator<'_, Elf>,
) -> Result<Option<Vec<u8>>, String> {
    while let Some(note) = notes.next().map_err(|e| e.to_string())? {
        if note.name() == elf::ELF_NOTE_GNU && note.n_type(endian) == elf::NT_GNU_BUILD_ID {
            let id = note.desc();
            if id.is_empty() || id.len() > MAX_LEN {
                return Err(format!(
                    "its build id note has {} bytes (1 to {MAX_LEN} expected)",
                    id.len()
                ));
            }
            return Ok(Some(id.to_vec()));
        }
    }
    Ok(None)
}

fn find<Elf: FileHeader<Endian = Endianness>>(data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let header = Elf::parse(data).map_err(|e| e.to_string())?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    let sections = header.sections(endian, data).map_err(|e| e.to_string())?;
    let mut saw_note_section = false;
    for s in sections.iter() {
        if let Some(notes) = s.notes(endian, data).map_err(|e| e.to_string())? {
            saw_note_section = true;
            if let Some(id) = in_notes(endian, notes)? {
                return Ok(Some(id));
            }
        }
    }
    if saw_note_section {
        return Ok(None);
    }
    // A file without section headers (or without note sections): its segments.
    for ph in header
        .program_headers(endian, data)
        .map_err(|e| e.to_string())?
    {
        if let Some(notes) = ph.notes(endian, data).map_err(|e| e.to_string())?
            && let Some(id) = in_notes(endian, notes)?
        {
            return Ok(Some(id));
        }
    }
    Ok(None)
}
