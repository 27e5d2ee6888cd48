//! Which patch files get in: build ids and signatures.
//!
//! # Signed patches and build ids
//!
//! **Build ids.** A patch names static functions and variables of the objects it
//! patches by name and position, and its replacements were compiled against their
//! source: fed to another build of the same program, the names may still resolve, to
//! code the patch does not know. `klp-convert` records the GNU build id
//! (`NT_GNU_BUILD_ID`) of every target it was given in a `.note.klp.build-id` section
//! (`SHT_NOTE`, not allocated; one note per object: owner `klp`, type 3, description
//! = object name, NUL, build id; see `klp_sig::buildid`). [`patch_build_ids`] reads
//! them, [`running_build_id`] reads an object's build id from its `PT_NOTE` segments in
//! memory, and [`check_build_id`] refuses a patch built for another build with
//! `-ENOEXEC`: what the kernel returns for a module built for another kernel (a
//! `vermagic` mismatch, "version magic '…' should be '…'", and a `module_layout`
//! version mismatch, "disagrees about version of symbol"). The main executable is
//! object `vmlinux` ("the program" in messages), a shared object is named by
//! [`crate::symbols::module_name`]. A patch without build ids (a target without one,
//! `klp-convert --no-build-id`) is not tied to a build.
//!
//! **Signatures** are the user-space counterpart of kernel module signing
//! (`CONFIG_MODULE_SIG`): `klp-sign` (or `klp-convert --sign KEY`) appends an ed25519
//! signature to the ELF file as `scripts/sign-file` appends a module signature:
//!
//! ```text
//! <ELF file> <signer name> <key id: 32> <signature: 64> <info: 12> "~Module signature appended~\n"
//! ```
//!
//! The format — the block laid out as the kernel's `struct module_signature`, the key
//! files, which `*.pub` files of the trusted keys directory count — is defined once,
//! in the `klp_sig` crate, which `klp-sign` writes and checks with too; this module
//! words its refusals as the loader's ([`LoadError`]) and adds the policy. In short:
//! the signed message is the ELF file, every byte before the signer name; a key is
//! identified by its public key (`key id`), people see its *fingerprint*, the first 8
//! bytes in hex. Trusted keys are the `*.pub` files of a directory
//! ([`default_keys_dir`]: `$XDG_CONFIG_HOME/klp/keys`, else `$HOME/.config/klp/keys`);
//! the directory and each file count only when owned by the process's effective uid or
//! root and writable by neither group nor others, and a skipped file is named, with
//! the reason, in the message that needed a key. The build-id notes' layout is
//! `klp_sig::buildid`'s as well.
//!
//! [`check`] decides as the kernel's `module_sig_check` does, with one difference:
//!
//! | file | `require_signature` false | true |
//! |---|---|---|
//! | unsigned | accepted | `-EKEYREJECTED` (the kernel's "Loading of unsigned module is rejected") |
//! | malformed block | `-EBADMSG` | `-EBADMSG` |
//! | unknown algorithm or id type | `-ENOPKG` | `-ENOPKG` |
//! | key not trusted | `-ENOKEY` | `-ENOKEY` |
//! | signature does not match | `-EKEYREJECTED` | `-EKEYREJECTED` |
//! | good signature by a trusted key | accepted, signer named | accepted, signer named |
//!
//! The difference: without enforcement (`sig_enforce=0`) the kernel loads a module
//! with an unknown key (`-ENOKEY`) or unsupported crypto (`-ENOPKG`) and taints itself
//! ("module verification failed"); klp has no taint to show for it, so a file that
//! carries a signature must verify, and only a file without any signature is
//! accepted unchecked. Bad signatures and malformed blocks are refused by the kernel
//! whatever the policy, and here too.
//!
//! The errnos `-ENOKEY` (126), `-EKEYREJECTED` (129), `-EBADMSG` (74) and `-ENOPKG`
//! (65) have no constant in `klp::Errno` (it knows their names); they are built here
//! with [`Errno::from_ret`].

use std::ffi::CStr;
use std::path::Path;

use klp::Errno;
use klp_sig::{BlockError, Rejection, hex};
use object::elf;
use object::read::elf::{FileHeader, NoteIterator, SectionHeader as _};
use object::{Endianness, NativeEndian};

use super::{LoadError, errno_text};

pub use klp_sig::buildid::{
    MAX_LEN as MAX_BUILD_ID, NT_KLP_BUILD_ID, OWNER as BUILD_ID_OWNER, SECTION as BUILD_ID_SECTION,
};
pub use klp_sig::{
    ALGO_ED25519 as SIG_ALGO_ED25519, HASH_NONE as SIG_HASH_NONE,
    ID_TYPE_KLP_ED25519 as SIG_ID_TYPE_KLP_ED25519, INFO_LEN as SIG_INFO_LEN,
    KEY_ID_LEN as SIG_KEY_ID_LEN, MAGIC as SIG_MAGIC, PublicKey as TrustedKey, SIG_LEN,
    SignatureBlock, TrustedKeys, default_keys_dir,
};

/// `-ENOKEY`: required key not available.
pub const ENOKEY: Errno = Errno::from_ret(-126);
/// `-EKEYREJECTED`: key was rejected by service.
pub const EKEYREJECTED: Errno = Errno::from_ret(-129);
/// `-EBADMSG`: not a data message.
pub const EBADMSG: Errno = Errno::from_ret(-74);
/// `-ENOPKG`: package not installed.
pub const ENOPKG: Errno = Errno::from_ret(-65);

/// The errno as the messages of this module show it ([`errno_text`]: klp's `Errno`
/// names the key and signature errnos too).
pub fn errno_name(e: Errno) -> String {
    errno_text(e)
}

fn error(errno: Errno, text: impl FnOnce(&str) -> String) -> LoadError {
    LoadError::new(errno, text(&errno_name(errno)))
}

/// How messages name an object: "the program" for `vmlinux`, else its name.
fn shown(objname: &str) -> String {
    if objname == "vmlinux" {
        "the program".to_string()
    } else {
        objname.to_string()
    }
}

// ---------------------------------------------------------------------------------
// Build ids.

fn malformed_notes(reason: &str) -> LoadError {
    error(Errno::ENOEXEC, |e| {
        format!(
            "the patch's build id notes ({BUILD_ID_SECTION}) are malformed: {reason} ({e}): \
             convert the patch again with klp-convert"
        )
    })
}

/// The `(object, build id)` entries the patch file records (its
/// `.note.klp.build-id`), in file order; none when it has no such section. A
/// damaged section is refused with `-ENOEXEC`, as the kernel refuses a malformed
/// module.
pub fn patch_build_ids(elf: &[u8]) -> Result<Vec<(String, Vec<u8>)>, LoadError> {
    let bad_elf = |e: object::read::Error| {
        error(Errno::ENOEXEC, |n| {
            format!(
                "the patch file is not a valid 64-bit ELF object: {e} ({n}): give the file \
                 klp-convert wrote"
            )
        })
    };
    let header = elf::FileHeader64::<Endianness>::parse(elf).map_err(bad_elf)?;
    let endian = header.endian().map_err(bad_elf)?;
    let sections = header.sections(endian, elf).map_err(bad_elf)?;
    let Some((_, section)) = sections.section_by_name(endian, BUILD_ID_SECTION.as_bytes()) else {
        return Ok(Vec::new());
    };
    if section.sh_type(endian) != elf::SHT_NOTE {
        return Err(malformed_notes("the section is not SHT_NOTE"));
    }
    let data = section
        .data(endian, elf)
        .map_err(|e| malformed_notes(&e.to_string()))?;
    klp_sig::buildid::decode::<elf::FileHeader64<Endianness>>(
        endian,
        section.sh_addralign(endian),
        data,
    )
    .map_err(|reason| malformed_notes(&reason))
}

/// What [`running_object`] found.
struct Found {
    /// The object's build id, if its notes have one.
    id: Option<Vec<u8>>,
}

/// The GNU build id in the `PT_NOTE` segments of the object `info` describes.
///
/// # Safety
///
/// `info` must be a `dl_iterate_phdr` entry, used during its callback (the object
/// cannot be unloaded meanwhile).
unsafe fn build_id_in_memory(info: &libc::dl_phdr_info) -> Option<Vec<u8>> {
    if info.dlpi_phdr.is_null() {
        return None;
    }
    // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers of a loaded object,
    // valid during the callback (the caller's contract).
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
    for note in phdrs.iter().filter(|p| p.p_type == libc::PT_NOTE) {
        // Only notes inside the file-backed part of a readable loaded segment are
        // mapped for certain.
        let (start, size) = (note.p_vaddr, note.p_memsz);
        let Some(end) = start.checked_add(size) else {
            continue;
        };
        let mapped = phdrs.iter().any(|l| {
            l.p_type == libc::PT_LOAD
                && l.p_flags & libc::PF_R != 0
                && start >= l.p_vaddr
                && l.p_vaddr
                    .checked_add(l.p_filesz)
                    .is_some_and(|lend| end <= lend)
        });
        if !mapped || size == 0 || size > 1 << 20 {
            continue;
        }
        let addr = info.dlpi_addr.wrapping_add(start) as usize;
        // SAFETY: [addr, addr + size) lies in the file-backed part of a readable
        // PT_LOAD segment of an object that stays loaded during the callback, so it
        // is mapped and readable; the bytes are only read (copied) here.
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, size as usize) };
        let Ok(mut notes) =
            NoteIterator::<elf::FileHeader64<NativeEndian>>::new(NativeEndian, note.p_align, bytes)
        else {
            continue;
        };
        while let Ok(Some(n)) = notes.next() {
            if n.name() == elf::ELF_NOTE_GNU && n.n_type(NativeEndian) == elf::NT_GNU_BUILD_ID {
                let id = n.desc();
                if !id.is_empty() && id.len() <= MAX_BUILD_ID {
                    return Some(id.to_vec());
                }
            }
        }
    }
    None
}

/// The object named `objname` among the loaded objects (`vmlinux`: the main
/// executable, the first `dl_iterate_phdr` entry); `None` when none is loaded.
fn running_object(objname: &str) -> Option<Found> {
    struct Search<'a> {
        name: &'a str,
        index: usize,
        found: Option<Found>,
    }
    unsafe extern "C" fn cb(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the `&mut Search` passed below, alive for the whole
        // `dl_iterate_phdr` call; `info` points to a valid entry for this callback.
        let (search, info) = unsafe { (&mut *(data as *mut Search<'_>), &*info) };
        let main = search.index == 0;
        search.index += 1;
        let name = if main {
            "vmlinux".to_string()
        } else if info.dlpi_name.is_null() {
            return 0;
        } else {
            // SAFETY: a non-null `dlpi_name` is a NUL-terminated string owned by the
            // dynamic linker, valid during the callback.
            let path = unsafe { CStr::from_ptr(info.dlpi_name) }.to_string_lossy();
            if path.is_empty() {
                return 0;
            }
            crate::symbols::module_name(&path)
        };
        if name != search.name {
            return 0;
        }
        search.found = Some(Found {
            // SAFETY: `info` is this callback's entry, used during the callback.
            id: unsafe { build_id_in_memory(info) },
        });
        1
    }
    let mut search = Search {
        name: objname,
        index: 0,
        found: None,
    };
    // SAFETY: `cb` matches the callback type and only uses `data` as the `Search`
    // passed here, which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(cb),
            &mut search as *mut Search<'_> as *mut libc::c_void,
        )
    };
    search.found
}

/// The GNU build id of the loaded object `objname` (`vmlinux` for the main
/// executable, else a shared object's [`crate::symbols::module_name`]), read from its
/// `PT_NOTE` segments in memory; `None` when no such object is loaded or it has no
/// build id.
pub fn running_build_id(objname: &str) -> Option<Vec<u8>> {
    running_object(objname).and_then(|f| f.id)
}

/// Checks that the loaded object `objname` is the build the patch was made for
/// (`expected`, from [`patch_build_ids`]): `-ENOEXEC` when its build id differs or it
/// has none. `Ok(())` when no object of that name is loaded: the loader checks it
/// again when it arrives.
pub fn check_build_id(objname: &str, expected: &[u8]) -> Result<(), LoadError> {
    let Some(found) = running_object(objname) else {
        return Ok(());
    };
    compare_build_id(objname, expected, found.id.as_deref())
}

/// The decision of [`check_build_id`] for an object whose build id is `running`.
pub fn compare_build_id(
    objname: &str,
    expected: &[u8],
    running: Option<&[u8]>,
) -> Result<(), LoadError> {
    let who = shown(objname);
    match running {
        Some(id) if id == expected => Ok(()),
        Some(id) => Err(error(Errno::ENOEXEC, |e| {
            let has = if objname == "vmlinux" {
                "the program has".to_string()
            } else {
                format!("{objname} has")
            };
            format!(
                "the patch was built for another build of {who} (build id {}, {has} {}) \
                 ({e}): rebuild the patch against the binary that runs",
                hex(expected),
                hex(id)
            )
        })),
        None => Err(error(Errno::ENOEXEC, |e| {
            format!(
                "the patch was built for the build {} of {who}, and {who} that runs has no \
                 build id ({e}): link it with a build id (-Wl,--build-id) and rebuild the \
                 patch against it, or convert the patch with klp-convert --no-build-id",
                hex(expected)
            )
        })),
    }
}

/// Checks every build id the patch file records against the loaded objects
/// ([`check_build_id`]); objects not loaded are left for their arrival.
pub fn check_build_ids(elf: &[u8]) -> Result<(), LoadError> {
    for (objname, id) in patch_build_ids(elf)? {
        check_build_id(&objname, &id)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Signatures.

/// Splits a patch file into its ELF part (the signed bytes) and its signature block
/// (`None`: the file does not end in the marker, it is not signed): [`klp_sig::split`].
/// A damaged block is `-EBADMSG`, an unknown algorithm or id type `-ENOPKG` (the
/// kernel's `mod_check_sig`).
pub fn split_signed(file: &[u8]) -> Result<(&[u8], Option<SignatureBlock>), LoadError> {
    klp_sig::split(file).map_err(|b| match &b {
        BlockError::Malformed(_) => error(EBADMSG, |e| {
            format!(
                "the patch's signature block is malformed: {b} ({e}): sign the unsigned \
                 patch again with klp-sign"
            )
        }),
        BlockError::Unsupported { .. } => error(ENOPKG, |e| {
            format!("the patch is signed with {b} ({e}): sign the unsigned patch with klp-sign")
        }),
    })
}

/// Checks a patch file's signature (see the module documentation for the policy):
/// the ELF part (without the signature) and the trusted key's name when it is
/// signed by one.
pub fn check<'a>(
    file: &'a [u8],
    require_signature: bool,
    keys_dir: &Path,
) -> Result<(&'a [u8], Option<String>), LoadError> {
    let (elf, block) = split_signed(file)?;
    let Some(block) = block else {
        if require_signature {
            return Err(error(EKEYREJECTED, |e| {
                format!(
                    "the patch is not signed ({e}): sign it with klp-sign and put the public \
                     key in {}",
                    keys_dir.display()
                )
            }));
        }
        return Ok((elf, None));
    };
    let trusted = TrustedKeys::load(keys_dir);
    match klp_sig::verify(elf, &block, &trusted) {
        Ok(key) => Ok((elf, Some(key.name.clone()))),
        Err(Rejection::UnknownKey) => {
            let skipped = if trusted.skipped.is_empty() {
                String::new()
            } else {
                format!("; skipped: {}", trusted.skipped.join(", "))
            };
            Err(error(ENOKEY, |e| {
                format!(
                    "the patch is signed by key '{}' (fingerprint {}), which is not among the \
                     {} trusted keys of {}{skipped} ({e}): put that key's .pub file there, or \
                     sign the patch with a trusted key",
                    block.signer,
                    block.fingerprint(),
                    trusted.keys.len(),
                    keys_dir.display()
                )
            }))
        }
        Err(Rejection::InvalidKey(key) | Rejection::Mismatch(key)) => {
            Err(error(EKEYREJECTED, |e| {
                format!(
                    "the patch's signature by key '{}' (fingerprint {}) does not match its \
                     contents ({e}): the file was changed after it was signed; load the file \
                     as it was signed, or sign it again",
                    key.name,
                    block.fingerprint()
                )
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names_and_values() {
        assert_eq!(ENOKEY.to_kernel(), -126);
        assert_eq!(EKEYREJECTED.to_kernel(), -129);
        assert_eq!(EBADMSG.to_kernel(), -74);
        assert_eq!(ENOPKG.to_kernel(), -65);
        assert_eq!(errno_name(ENOKEY), "-ENOKEY");
        assert_eq!(errno_name(Errno::ENOEXEC), "-ENOEXEC");
    }

    #[test]
    fn build_id_messages_name_the_program_or_the_library() {
        assert!(compare_build_id("vmlinux", &[1, 2], Some(&[1, 2])).is_ok());
        let e = compare_build_id("vmlinux", &[0x1a, 0x2b], Some(&[0x3c, 0x4d])).unwrap_err();
        assert_eq!(e.errno, Errno::ENOEXEC);
        assert_eq!(
            e.message,
            "the patch was built for another build of the program (build id 1a2b, the \
             program has 3c4d) (-ENOEXEC): rebuild the patch against the binary that runs"
        );
        let e = compare_build_id("libfoo", &[1], Some(&[2])).unwrap_err();
        assert!(
            e.message
                .contains("another build of libfoo (build id 01, libfoo has 02)"),
            "{e}"
        );
        let e = compare_build_id("vmlinux", &[1], None).unwrap_err();
        assert!(e.message.contains("has no build id (-ENOEXEC)"), "{e}");
    }

    #[test]
    fn split_refuses_damaged_blocks() {
        assert_eq!(
            split_signed(b"\x7fELF...").unwrap(),
            (&b"\x7fELF..."[..], None)
        );
        let e = split_signed(SIG_MAGIC).unwrap_err();
        assert_eq!(e.errno, EBADMSG);
        assert_eq!(
            e.message,
            "the patch's signature block is malformed: the file ends in the signature marker \
             and has 0 bytes before it, fewer than the 12-byte info block (-EBADMSG): sign \
             the unsigned patch again with klp-sign"
        );
        // A PKCS#7 block of a kernel module: id_type 2, lengths 0, sig_len 4.
        let mut f = b"\x7fELF....".to_vec();
        f.extend_from_slice(&[9, 9, 9, 9]);
        f.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 4]);
        f.extend_from_slice(SIG_MAGIC);
        let e = split_signed(&f).unwrap_err();
        assert_eq!(e.errno, ENOPKG, "{e}");
        assert_eq!(
            e.message,
            "the patch is signed with an unsupported scheme (id type 0x2, algorithm 0, hash \
             0; klp-sign writes id type 0x80, algorithm 1, hash 0) (-ENOPKG): sign the \
             unsigned patch with klp-sign"
        );
    }
}
