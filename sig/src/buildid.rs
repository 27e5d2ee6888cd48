//! Build-id notes: which build of each object a patch was made for.
//!
//! A livepatch refers to static functions and variables of the objects it patches by
//! name and position, and its replacements were compiled against their source. Fed to
//! another build of the same program, the names may still resolve, to code the patch
//! does not know. The kernel refuses a module built for another kernel by its
//! `vermagic` and `module_layout` version; a process's objects carry a GNU build id
//! (`NT_GNU_BUILD_ID`, `ld --build-id`), so klp-convert records, for every target that
//! has one, the object's name and build id ([`encode`]), and the user-space loader
//! reads them back ([`decode`]) and compares them with the objects that run.
//!
//! The record is a note section, `.note.klp.build-id` (`SHT_NOTE`, flags 0 — not
//! `SHF_ALLOC`, so the kernel's module loader neither lays it out nor lists it in
//! `/sys/module/*/notes`; `sh_addralign` 4), one note per object, in target order:
//!
//! ```text
//! n_namesz = 4           "klp\0"
//! n_descsz = len(object name) + 1 + len(build id)
//! n_type   = 3           NT_KLP_BUILD_ID (NT_GNU_BUILD_ID's number, under klp's owner)
//! desc     = object name, NUL, the build id's bytes (as the object's note has them)
//! ```
//!
//! Every word is in the patch object's byte order; the name and the description are
//! each padded with zeros to a multiple of 4 bytes (the gABI's note layout, as
//! `readelf -n` reads it). A reader skips notes of other owners or types.

use object::Endianness;
use object::read::elf::{FileHeader, NoteIterator};

pub use crate::hex;

/// The section's name.
pub const SECTION: &str = ".note.klp.build-id";

/// The notes' owner (`n_name` without its NUL).
pub const OWNER: &[u8] = b"klp";

/// The notes' type: `NT_GNU_BUILD_ID`'s number, under klp's owner (`readelf -n`
/// shows it as an unknown type with its data, rather than as `NT_VERSION`).
pub const NT_KLP_BUILD_ID: u32 = 3;

/// The longest build id accepted (`ld --build-id=0x…` allows any length; sha1 gives 20
/// bytes, md5 and uuid 16).
pub const MAX_LEN: usize = 64;

fn put_u32(out: &mut Vec<u8>, endian: Endianness, v: u32) {
    out.extend_from_slice(&match endian {
        Endianness::Little => v.to_le_bytes(),
        Endianness::Big => v.to_be_bytes(),
    });
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The contents of `.note.klp.build-id` for `(object name, build id)` entries, in
/// `endian` byte order (see the module documentation).
pub fn encode(endian: Endianness, entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, id) in entries {
        let desc_len = name.len() + 1 + id.len();
        put_u32(&mut out, endian, OWNER.len() as u32 + 1);
        put_u32(&mut out, endian, desc_len as u32);
        put_u32(&mut out, endian, NT_KLP_BUILD_ID);
        out.extend_from_slice(OWNER);
        out.push(0);
        pad4(&mut out);
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(id);
        pad4(&mut out);
    }
    out
}

/// Reads the `(object name, build id)` entries of a `.note.klp.build-id` section's
/// contents (`align` = its `sh_addralign`), in file order. Notes of other owners or
/// types are skipped; a damaged note, an entry without a name or id, or an object
/// named twice is an error that says what is wrong.
pub fn decode<Elf: FileHeader>(
    endian: Elf::Endian,
    align: Elf::Word,
    data: &[u8],
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut notes = NoteIterator::<Elf>::new(endian, align, data).map_err(|e| e.to_string())?;
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    while let Some(note) = notes.next().map_err(|e| e.to_string())? {
        if note.name() != OWNER || note.n_type(endian).0 != NT_KLP_BUILD_ID {
            continue;
        }
        let desc = note.desc();
        let Some(nul) = desc.iter().position(|&b| b == 0) else {
            return Err("a build id note has no NUL after the object name".to_string());
        };
        let (name, id) = (&desc[..nul], &desc[nul + 1..]);
        let Ok(name) = std::str::from_utf8(name) else {
            return Err("a build id note's object name is not UTF-8".to_string());
        };
        if name.is_empty() {
            return Err("a build id note has an empty object name".to_string());
        }
        if id.is_empty() || id.len() > MAX_LEN {
            return Err(format!(
                "the build id of {name} has {} bytes (1 to {MAX_LEN} expected)",
                id.len()
            ));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(format!("{name} has two build id notes"));
        }
        out.push((name.to_string(), id.to_vec()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::elf;

    #[test]
    fn notes_round_trip_in_both_byte_orders_and_are_padded() {
        let entries = vec![
            ("vmlinux".to_string(), vec![0x1a, 0x2b, 0x3c]),
            ("libfoo".to_string(), (0u8..20).collect()),
        ];
        for endian in [Endianness::Little, Endianness::Big] {
            let data = encode(endian, &entries);
            // 12-byte header, "klp\0", "vmlinux\0" + 3 bytes padded to 12.
            assert_eq!(&data[12..16], b"klp\0");
            assert_eq!(&data[16..24], b"vmlinux\0");
            assert_eq!(&data[24..28], &[0x1a, 0x2b, 0x3c, 0]);
            let n = |at: usize| {
                let b = [data[at], data[at + 1], data[at + 2], data[at + 3]];
                match endian {
                    Endianness::Little => u32::from_le_bytes(b),
                    Endianness::Big => u32::from_be_bytes(b),
                }
            };
            assert_eq!((n(0), n(4), n(8)), (4, 11, NT_KLP_BUILD_ID));
            assert!(data.len().is_multiple_of(4));
            let back = decode::<elf::FileHeader64<Endianness>>(endian, 4, &data).unwrap();
            assert_eq!(back, entries);
        }
        assert_eq!(hex(&[0x1a, 0x02]), "1a02");
    }

    #[test]
    fn damaged_notes_are_errors_and_foreign_notes_are_skipped() {
        let le = Endianness::Little;
        let d = |data: &[u8]| decode::<elf::FileHeader64<Endianness>>(le, 4, data);
        let good = encode(le, &[("vmlinux".to_string(), vec![1, 2])]);
        assert!(d(&good[..good.len() - 4]).is_err());
        let mut no_nul = good.clone();
        no_nul[16 + 7] = b'x';
        // "vmlinuxx" then the id bytes 1, 2: no NUL in the description.
        assert!(d(&no_nul).unwrap_err().contains("no NUL"));
        let twice = [good.clone(), good.clone()].concat();
        assert!(d(&twice).unwrap_err().contains("two build id notes"));
        let mut other = good.clone();
        other[12] = b'X';
        assert_eq!(d(&other).unwrap(), vec![]);
        let no_id = encode(le, &[("vmlinux".to_string(), vec![])]);
        assert!(d(&no_id).unwrap_err().contains("0 bytes"));
        let no_name = encode(le, &[(String::new(), vec![1])]);
        assert!(d(&no_name).unwrap_err().contains("empty object name"));
    }
}
