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
//! = object name, NUL, build id; see `klp_convert::buildid`). [`patch_build_ids`] reads
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
//! `info` is laid out as the kernel's `struct module_signature` — `algo` (1:
//! ed25519), `hash` (0: none, ed25519 hashes the message itself), `id_type` (0x80:
//! klp ed25519, key id = the public key), `signer_len`, `key_id_len` (32), three zero
//! bytes, `sig_len` (64, big-endian u32) — the pre-PKCS#7 layout with the signer and
//! key id in the file. The signed message is the ELF file: every byte before the
//! signer name. A key is identified by its public key (`key id`); people see its
//! *fingerprint*, the first 8 bytes in hex. Key files are one line of text,
//! `klp-ed25519-public <64 hex digits> <name>` (`NAME.pub`; the secret `NAME.key`,
//! mode 0600, says `klp-ed25519-secret`).
//!
//! Trusted keys are the `*.pub` files of a directory ([`default_keys_dir`]:
//! `$XDG_CONFIG_HOME/klp/keys`, else `$HOME/.config/klp/keys`). The directory and each
//! file count only when owned by the process's effective uid or root and writable by
//! neither group nor others; a skipped file is named, with the reason, in the message
//! that needed a key.
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
//! (65) have no constant in `klp::Errno`; they are built here with
//! [`Errno::from_ret`] and named in the messages by this module.

use std::ffi::CStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, VerifyingKey};
use klp::Errno;
use object::elf;
use object::read::elf::{FileHeader, NoteIterator, SectionHeader as _};
use object::{Endianness, NativeEndian};

use super::{LoadError, errno_text};

/// `-ENOKEY`: required key not available.
pub const ENOKEY: Errno = Errno::from_ret(-126);
/// `-EKEYREJECTED`: key was rejected by service.
pub const EKEYREJECTED: Errno = Errno::from_ret(-129);
/// `-EBADMSG`: not a data message.
pub const EBADMSG: Errno = Errno::from_ret(-74);
/// `-ENOPKG`: package not installed.
pub const ENOPKG: Errno = Errno::from_ret(-65);

/// The section of the build ids.
pub const BUILD_ID_SECTION: &str = ".note.klp.build-id";
/// The build id notes' owner.
pub const BUILD_ID_OWNER: &[u8] = b"klp";
/// The build id notes' type.
pub const NT_KLP_BUILD_ID: u32 = 3;
/// The longest build id accepted.
pub const MAX_BUILD_ID: usize = 64;

/// The marker at the end of a signed file (the kernel's `MODULE_SIG_STRING`).
pub const SIG_MAGIC: &[u8] = b"~Module signature appended~\n";
/// The size of the info block (`struct module_signature`).
pub const SIG_INFO_LEN: usize = 12;
/// `algo`: ed25519.
pub const SIG_ALGO_ED25519: u8 = 1;
/// `hash`: none.
pub const SIG_HASH_NONE: u8 = 0;
/// `id_type`: klp ed25519, the key id is the public key.
pub const SIG_ID_TYPE_KLP_ED25519: u8 = 0x80;
/// `key_id_len`.
pub const SIG_KEY_ID_LEN: usize = 32;
/// `sig_len`.
pub const SIG_LEN: usize = 64;

/// The errno as the messages of this module show it: the names klp's `Errno` lacks
/// too.
pub fn errno_name(e: Errno) -> String {
    match e.0 {
        126 => "-ENOKEY".to_string(),
        129 => "-EKEYREJECTED".to_string(),
        74 => "-EBADMSG".to_string(),
        65 => "-ENOPKG".to_string(),
        _ => errno_text(e),
    }
}

fn error(errno: Errno, text: impl FnOnce(&str) -> String) -> LoadError {
    LoadError::new(errno, text(&errno_name(errno)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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
    let mut notes = NoteIterator::<elf::FileHeader64<Endianness>>::new(
        endian,
        section.sh_addralign(endian),
        data,
    )
    .map_err(|e| malformed_notes(&e.to_string()))?;
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    loop {
        let note = match notes.next() {
            Ok(Some(n)) => n,
            Ok(None) => break,
            Err(e) => return Err(malformed_notes(&e.to_string())),
        };
        if note.name() != BUILD_ID_OWNER || note.n_type(endian).0 != NT_KLP_BUILD_ID {
            continue;
        }
        let desc = note.desc();
        let Some(nul) = desc.iter().position(|&b| b == 0) else {
            return Err(malformed_notes("a note has no NUL after the object name"));
        };
        let (name, id) = (&desc[..nul], &desc[nul + 1..]);
        let name = match std::str::from_utf8(name) {
            Ok(n) if !n.is_empty() => n,
            _ => {
                return Err(malformed_notes(
                    "a note's object name is empty or not UTF-8",
                ));
            }
        };
        if id.is_empty() || id.len() > MAX_BUILD_ID {
            return Err(malformed_notes(&format!(
                "the build id of {name} has {} bytes (1 to {MAX_BUILD_ID} expected)",
                id.len()
            )));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(malformed_notes(&format!("{name} has two notes")));
        }
        out.push((name.to_string(), id.to_vec()));
    }
    Ok(out)
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

/// The trusted keys directory: `$XDG_CONFIG_HOME/klp/keys`, else
/// `$HOME/.config/klp/keys` (relative to the working directory when neither is
/// set).
pub fn default_keys_dir() -> PathBuf {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".config"),
    };
    base.join("klp").join("keys")
}

/// The signature block of a signed file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureBlock {
    /// `algo`.
    pub algo: u8,
    /// `hash`.
    pub hash: u8,
    /// `id_type`.
    pub id_type: u8,
    /// The signer's name as the block has it (informative: a trusted key is found by
    /// its key id).
    pub signer: String,
    /// The key id: the ed25519 public key.
    pub key_id: Vec<u8>,
    /// The ed25519 signature.
    pub signature: Vec<u8>,
}

impl SignatureBlock {
    /// The key's fingerprint: the first 8 bytes of the key id, in hex.
    pub fn fingerprint(&self) -> String {
        hex(&self.key_id[..self.key_id.len().min(8)])
    }
}

fn bad_block(reason: &str) -> LoadError {
    error(EBADMSG, |e| {
        format!(
            "the patch's signature block is malformed: {reason} ({e}): sign the unsigned \
             patch again with klp-sign"
        )
    })
}

/// Splits a patch file into its ELF part (the signed bytes) and its signature block
/// (`None`: the file does not end in the marker, it is not signed). A damaged block is
/// `-EBADMSG`, an unknown algorithm or id type `-ENOPKG` (the kernel's
/// `mod_check_sig`).
pub fn split_signed(file: &[u8]) -> Result<(&[u8], Option<SignatureBlock>), LoadError> {
    let Some(rest) = file.strip_suffix(SIG_MAGIC) else {
        return Ok((file, None));
    };
    let Some(body_len) = rest.len().checked_sub(SIG_INFO_LEN) else {
        return Err(bad_block(&format!(
            "the file ends in the signature marker and has {} bytes before it, fewer than \
             the {SIG_INFO_LEN}-byte info block",
            rest.len()
        )));
    };
    let info = &rest[body_len..];
    let (algo, hash, id_type, signer_len, key_id_len) =
        (info[0], info[1], info[2], info[3], info[4]);
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let fields = usize::from(signer_len) + usize::from(key_id_len) + sig_len;
    if fields >= body_len {
        return Err(bad_block(&format!(
            "its fields take {fields} bytes and the file has {body_len} before the info block"
        )));
    }
    if id_type != SIG_ID_TYPE_KLP_ED25519 || algo != SIG_ALGO_ED25519 || hash != SIG_HASH_NONE {
        return Err(error(ENOPKG, |e| {
            format!(
                "the patch is signed with an unsupported scheme (id type {id_type:#x}, \
                 algorithm {algo}, hash {hash}; klp-sign writes id type \
                 {SIG_ID_TYPE_KLP_ED25519:#x}, algorithm {SIG_ALGO_ED25519}, hash \
                 {SIG_HASH_NONE}) ({e}): sign the unsigned patch with klp-sign"
            )
        }));
    }
    if info[5..8] != [0, 0, 0] {
        return Err(bad_block("its padding bytes are not zero"));
    }
    if usize::from(key_id_len) != SIG_KEY_ID_LEN || sig_len != SIG_LEN {
        return Err(bad_block(&format!(
            "its key id has {key_id_len} bytes and its signature {sig_len} (an ed25519 key \
             has {SIG_KEY_ID_LEN}, a signature {SIG_LEN})"
        )));
    }
    let start = body_len - fields;
    let signer_end = start + usize::from(signer_len);
    let key_end = signer_end + SIG_KEY_ID_LEN;
    let Ok(signer) = std::str::from_utf8(&rest[start..signer_end]) else {
        return Err(bad_block("its signer name is not UTF-8"));
    };
    Ok((
        &file[..start],
        Some(SignatureBlock {
            algo,
            hash,
            id_type,
            signer: signer.to_string(),
            key_id: rest[signer_end..key_end].to_vec(),
            signature: rest[key_end..body_len].to_vec(),
        }),
    ))
}

/// One trusted public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedKey {
    /// Its name (from its file's line).
    pub name: String,
    /// The ed25519 public key.
    pub key: [u8; 32],
}

/// The trusted keys of a directory, and what was skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    /// The keys, in file name order.
    pub keys: Vec<TrustedKey>,
    /// `FILE (reason)` for every `*.pub` file (or the directory) that does not count.
    pub skipped: Vec<String>,
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why a file or directory with this metadata cannot vouch for a key, if it cannot.
fn untrusted(meta: &std::fs::Metadata) -> Option<String> {
    let uid = euid();
    if meta.uid() != uid && meta.uid() != 0 {
        return Some(format!(
            "owned by uid {}, not by uid {uid} or root",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "writable by its group or others, mode {:o}",
            meta.mode() & 0o7777
        ));
    }
    None
}

fn parse_public_key(text: &str) -> Result<TrustedKey, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let (Some(line), None) = (lines.next(), lines.next()) else {
        return Err("not one line of text".to_string());
    };
    let f: Vec<&str> = line.split_whitespace().collect();
    let [kind, key, name] = f.as_slice() else {
        return Err("not \"klp-ed25519-public <64 hex digits> <name>\"".to_string());
    };
    if *kind != "klp-ed25519-public" {
        return Err(format!("starts with '{kind}', not klp-ed25519-public"));
    }
    if key.len() != 64 || !key.is_ascii() {
        return Err("its key is not 64 hex digits".to_string());
    }
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = key
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(|| "its key is not 64 hex digits".to_string())?;
    }
    VerifyingKey::from_bytes(&bytes).map_err(|_| "its key is not an ed25519 key".to_string())?;
    Ok(TrustedKey {
        name: name.to_string(),
        key: bytes,
    })
}

fn read_key_file(path: &Path) -> Result<TrustedKey, String> {
    // Opened first, then checked and read through the same descriptor: the checked
    // file is the one read.
    let f = File::open(path).map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_string());
    }
    if let Some(why) = untrusted(&meta) {
        return Err(why);
    }
    let mut text = String::new();
    f.take(4096)
        .read_to_string(&mut text)
        .map_err(|_| "not a text file".to_string())?;
    parse_public_key(&text)
}

impl TrustedKeys {
    /// Reads the `*.pub` files of `dir`; only those the module documentation says
    /// count are kept, the others are listed in `skipped`.
    pub fn load(dir: &Path) -> TrustedKeys {
        let mut out = TrustedKeys::default();
        match std::fs::metadata(dir) {
            Err(e) => {
                out.skipped.push(format!("{} ({e})", dir.display()));
                return out;
            }
            Ok(m) if !m.is_dir() => {
                out.skipped
                    .push(format!("{} (not a directory)", dir.display()));
                return out;
            }
            Ok(m) => {
                if let Some(why) = untrusted(&m) {
                    out.skipped
                        .push(format!("the directory {} ({why})", dir.display()));
                    return out;
                }
            }
        }
        let mut names: Vec<std::ffi::OsString> = match std::fs::read_dir(dir) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect(),
            Err(e) => {
                out.skipped.push(format!("{} ({e})", dir.display()));
                return out;
            }
        };
        names.sort();
        for name in names {
            let shown = name.to_string_lossy().into_owned();
            if !shown.ends_with(".pub") {
                continue;
            }
            match read_key_file(&dir.join(&name)) {
                Ok(k) => out.keys.push(k),
                Err(why) => out.skipped.push(format!("{shown} ({why})")),
            }
        }
        out
    }
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
    let Some(key) = trusted.keys.iter().find(|k| k.key[..] == block.key_id[..]) else {
        let skipped = if trusted.skipped.is_empty() {
            String::new()
        } else {
            format!("; skipped: {}", trusted.skipped.join(", "))
        };
        return Err(error(ENOKEY, |e| {
            format!(
                "the patch is signed by key '{}' (fingerprint {}), which is not among the \
                 {} trusted keys of {}{skipped} ({e}): put that key's .pub file there, or \
                 sign the patch with a trusted key",
                block.signer,
                block.fingerprint(),
                trusted.keys.len(),
                keys_dir.display()
            )
        }));
    };
    let rejected = || {
        error(EKEYREJECTED, |e| {
            format!(
                "the patch's signature by key '{}' (fingerprint {}) does not match its \
                 contents ({e}): the file was changed after it was signed; load the file as \
                 it was signed, or sign it again",
                key.name,
                block.fingerprint()
            )
        })
    };
    let vk = VerifyingKey::from_bytes(&key.key).map_err(|_| rejected())?;
    let mut sig = [0u8; SIG_LEN];
    sig.copy_from_slice(&block.signature);
    vk.verify_strict(elf, &Signature::from_bytes(&sig))
        .map_err(|_| rejected())?;
    Ok((elf, Some(key.name.clone())))
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
        assert!(e.message.contains("(-EBADMSG)"), "{e}");
        // A PKCS#7 block of a kernel module: id_type 2, lengths 0, sig_len 4.
        let mut f = b"\x7fELF....".to_vec();
        f.extend_from_slice(&[9, 9, 9, 9]);
        f.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 4]);
        f.extend_from_slice(SIG_MAGIC);
        let e = split_signed(&f).unwrap_err();
        assert_eq!(e.errno, ENOPKG, "{e}");
    }
}
