//! Signed patch files: ed25519 signatures appended as the kernel appends module
//! signatures, the user-space counterpart of `scripts/sign-file` and
//! `CONFIG_MODULE_SIG`.
//!
//! # The file
//!
//! ```text
//! <ELF file> <signer name> <key id> <signature> <info: 12 bytes> "~Module signature appended~\n"
//! ```
//!
//! The *signed message* is the ELF file: every byte before the signer name. The
//! signature is ed25519 (RFC 8032, pure — the message itself, hashed by the
//! algorithm's own SHA-512) over it. `info` has the layout of the kernel's `struct
//! module_signature` (`include/linux/module_signature.h`), the lengths of the three
//! fields before it:
//!
//! ```c
//! struct module_signature {
//!     u8     algo;        /* 1: ed25519 (klp's value; the kernel's pkey_algo list had none) */
//!     u8     hash;        /* 0: none (ed25519 hashes the message itself) */
//!     u8     id_type;     /* 0x80: klp ed25519, key id = the public key (the kernel's
//!                            PKEY_ID_PGP 0, X509 1, PKCS7 2 do not apply) */
//!     u8     signer_len;  /* the signer's (key's) name, 0..255 bytes of UTF-8 */
//!     u8     key_id_len;  /* 32: the ed25519 public key */
//!     u8     __pad[3];    /* 0 */
//!     __be32 sig_len;     /* 64: the ed25519 signature */
//! };
//! ```
//!
//! This is the layout the kernel used before PKCS#7 (Linux 3.7–4.2: signer, key id and
//! signature in the file, their lengths in the info block). A kernel of today that
//! meets such a file stops at `id_type` (`-ENOPKG`, "not signed with expected PKCS#7
//! message") rather than misreading it.
//!
//! A key is identified by its public key (`key id`, 32 bytes); the *fingerprint*
//! shown to people is the first 8 bytes of it in hex. The signer name is what the key
//! was generated as; a verifier names the trusted key's own name, not the block's.
//!
//! # Key files
//!
//! One line of text each, `<kind> <64 hex digits> <name>`:
//!
//! * `NAME.key` (mode 0600): `klp-ed25519-secret <the 32-byte secret seed> NAME`;
//! * `NAME.pub`: `klp-ed25519-public <the 32-byte public key> NAME`.
//!
//! Names are 1 to 64 characters of `A-Z a-z 0-9 . _ - + @`, not starting with `.`.
//!
//! # Trust and errors
//!
//! Trusted keys are the `*.pub` files of one directory (the loader's
//! `$XDG_CONFIG_HOME/klp/keys`, else `$HOME/.config/klp/keys`). A key counts only when
//! the directory and the file are owned by the process's effective uid or root and
//! writable by neither group nor others (a key anyone can replace vouches for
//! nothing); skipped files are named in the message that needs them.
//!
//! Errors are those of the kernel's module signature check (`module_sig_check`,
//! `mod_verify_sig`): a malformed block `-EBADMSG`; an unknown algorithm or id type
//! `-ENOPKG`; a key not among the trusted ones `-ENOKEY`; a signature that does not
//! match `-EKEYREJECTED`; an unsigned file where signatures are required
//! `-EKEYREJECTED` (the kernel's "Loading of unsigned module is rejected").

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// The marker at the end of a signed file (the kernel's `MODULE_SIG_STRING`).
pub const MAGIC: &[u8] = b"~Module signature appended~\n";
/// The size of the info block.
pub const INFO_LEN: usize = 12;
/// `algo`: ed25519.
pub const ALGO_ED25519: u8 = 1;
/// `hash`: none.
pub const HASH_NONE: u8 = 0;
/// `id_type`: a klp ed25519 signature whose key id is the public key.
pub const ID_TYPE_KLP_ED25519: u8 = 0x80;
/// `key_id_len`.
pub const KEY_ID_LEN: usize = 32;
/// `sig_len`.
pub const SIG_LEN: usize = 64;
/// The first word of a secret key file.
pub const SECRET_KIND: &str = "klp-ed25519-secret";
/// The first word of a public key file.
pub const PUBLIC_KIND: &str = "klp-ed25519-public";

/// The signature block of a signed file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureBlock {
    /// `algo`.
    pub algo: u8,
    /// `hash`.
    pub hash: u8,
    /// `id_type`.
    pub id_type: u8,
    /// The signer's name as the block has it.
    pub signer: String,
    /// The key id: the ed25519 public key.
    pub key_id: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
}

impl SignatureBlock {
    /// The key's fingerprint: the first 8 bytes of the key id, in hex.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.key_id)
    }
}

/// The fingerprint of a public key (the first 8 bytes, hex).
pub fn fingerprint(key: &[u8]) -> String {
    hex(&key[..key.len().min(8)])
}

/// Why signing or verifying failed: the kernel's errno name and one sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignError {
    /// `EBADMSG`, `ENOPKG`, `ENOKEY`, `EKEYREJECTED`, or `EINVAL`/`EIO` for bad
    /// arguments and files.
    pub errno: &'static str,
    /// The sentence, which names the errno in brackets and says what to do.
    pub message: String,
}

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SignError {}

fn err(errno: &'static str, message: String) -> SignError {
    SignError { errno, message }
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Whether `name` is a valid key name (see the module documentation).
pub fn valid_key_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+@".contains(&b))
}

/// A secret (signing) key.
#[derive(Debug)]
pub struct SecretKey {
    /// Its name.
    pub name: String,
    key: SigningKey,
}

/// A public (verifying) key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    /// Its name.
    pub name: String,
    /// The key.
    pub key: [u8; 32],
}

impl PublicKey {
    /// Its fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.key)
    }

    /// The `.pub` file's text.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_KIND} {} {}\n", hex(&self.key), self.name)
    }
}

impl SecretKey {
    /// A new key from the operating system's random source.
    pub fn generate(name: &str) -> Result<SecretKey, SignError> {
        if !valid_key_name(name) {
            return Err(err(
                "EINVAL",
                format!(
                    "'{name}' is not a key name (-EINVAL): use 1 to 64 characters of A-Z, a-z, \
                     0-9, '.', '_', '-', '+', '@', not starting with '.'"
                ),
            ));
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| {
            err(
                "EIO",
                format!("the random source failed ({e}) (-EIO): try again"),
            )
        })?;
        Ok(SecretKey {
            name: name.to_string(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Reads a `.key` file's text.
    pub fn from_text(text: &str) -> Result<SecretKey, String> {
        let (seed, name) = parse_key_line(text, SECRET_KIND)?;
        Ok(SecretKey {
            name,
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The `.key` file's text.
    pub fn to_text(&self) -> String {
        format!(
            "{SECRET_KIND} {} {}\n",
            hex(&self.key.to_bytes()),
            self.name
        )
    }

    /// Its public half.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key().to_bytes(),
        }
    }
}

impl PublicKey {
    /// Reads a `.pub` file's text.
    pub fn from_text(text: &str) -> Result<PublicKey, String> {
        let (key, name) = parse_key_line(text, PUBLIC_KIND)?;
        VerifyingKey::from_bytes(&key)
            .map_err(|_| "its key is not a point of the ed25519 curve".to_string())?;
        Ok(PublicKey { name, key })
    }
}

fn parse_key_line(text: &str, kind: &str) -> Result<([u8; 32], String), String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let (Some(line), None) = (lines.next(), lines.next()) else {
        return Err("it is not one line of text".to_string());
    };
    let f: Vec<&str> = line.split_whitespace().collect();
    let [k, key, name] = f.as_slice() else {
        return Err(format!(
            "it is not \"{kind} <64 hex digits> <name>\" ({} fields)",
            f.len()
        ));
    };
    if *k != kind {
        return Err(format!("it starts with '{k}', not {kind}"));
    }
    let Some(key) = unhex32(key) else {
        return Err("its key is not 64 hex digits".to_string());
    };
    if !valid_key_name(name) {
        return Err(format!("its name '{name}' is not a valid key name"));
    }
    Ok((key, name.to_string()))
}

/// Splits a file into its signed part and its signature block (`None`: the file
/// does not end in the marker, i.e. it is not signed).
pub fn split(file: &[u8]) -> Result<(&[u8], Option<SignatureBlock>), SignError> {
    let Some(rest) = file.strip_suffix(MAGIC) else {
        return Ok((file, None));
    };
    let bad = |reason: String| {
        err(
            "EBADMSG",
            format!(
                "the signature block is malformed: {reason} (-EBADMSG); sign the unsigned \
                 file again with klp-sign"
            ),
        )
    };
    let Some(body_len) = rest.len().checked_sub(INFO_LEN) else {
        return Err(bad(format!(
            "the file ends in the signature marker, and has only {} bytes before it, fewer \
             than the {INFO_LEN}-byte info block",
            rest.len()
        )));
    };
    let info = &rest[body_len..];
    let (algo, hash, id_type, signer_len, key_id_len) =
        (info[0], info[1], info[2], info[3], info[4]);
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let fields = usize::from(signer_len) + usize::from(key_id_len) + sig_len;
    // mod_check_sig: the signature must leave a non-empty module before it.
    if fields >= body_len {
        return Err(bad(format!(
            "its fields take {fields} bytes and the file has {body_len} before the info block"
        )));
    }
    if id_type != ID_TYPE_KLP_ED25519 || algo != ALGO_ED25519 || hash != HASH_NONE {
        return Err(err(
            "ENOPKG",
            format!(
                "the file is signed with an unsupported scheme (id type {id_type:#x}, algorithm \
                 {algo}, hash {hash}; klp-sign writes id type {ID_TYPE_KLP_ED25519:#x}, \
                 algorithm {ALGO_ED25519}, hash {HASH_NONE}) (-ENOPKG): sign the unsigned file \
                 with klp-sign"
            ),
        ));
    }
    if info[5..8] != [0, 0, 0] {
        return Err(bad("its padding bytes are not zero".to_string()));
    }
    if usize::from(key_id_len) != KEY_ID_LEN || sig_len != SIG_LEN {
        return Err(bad(format!(
            "its key id has {key_id_len} bytes and its signature {sig_len} (an ed25519 key has \
             {KEY_ID_LEN}, a signature {SIG_LEN})"
        )));
    }
    let start = body_len - fields;
    let signer_end = start + usize::from(signer_len);
    let key_end = signer_end + KEY_ID_LEN;
    let Ok(signer) = std::str::from_utf8(&rest[start..signer_end]) else {
        return Err(bad("its signer name is not UTF-8".to_string()));
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

/// Signs `file` with `key`: the signed file, and the block it replaced when `file`
/// was signed already (its signature is dropped; the new one covers the same ELF
/// bytes). `file` must be an ELF file.
pub fn sign(file: &[u8], key: &SecretKey) -> Result<(Vec<u8>, Option<SignatureBlock>), SignError> {
    let (elf, old) = split(file)?;
    if !elf.starts_with(b"\x7fELF") {
        return Err(err(
            "ENOEXEC",
            "the file to sign is not an ELF file (-ENOEXEC): sign the patch object \
             klp-convert wrote"
                .to_string(),
        ));
    }
    let signature = key.key.sign(elf).to_bytes();
    let name = key.name.as_bytes();
    let mut out = Vec::with_capacity(elf.len() + name.len() + 32 + 64 + INFO_LEN + MAGIC.len());
    out.extend_from_slice(elf);
    out.extend_from_slice(name);
    out.extend_from_slice(&key.key.verifying_key().to_bytes());
    out.extend_from_slice(&signature);
    out.extend_from_slice(&[
        ALGO_ED25519,
        HASH_NONE,
        ID_TYPE_KLP_ED25519,
        name.len() as u8,
        KEY_ID_LEN as u8,
        0,
        0,
        0,
    ]);
    out.extend_from_slice(&(SIG_LEN as u32).to_be_bytes());
    out.extend_from_slice(MAGIC);
    Ok((out, old))
}

/// The trusted keys of a directory, and the files skipped with the reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    /// The directory.
    pub dir: PathBuf,
    /// The keys, by file name order.
    pub keys: Vec<PublicKey>,
    /// "FILE (reason)" for each `*.pub` file (or the directory) not counted.
    pub skipped: Vec<String>,
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why a file or directory with this metadata cannot vouch for a key, if it cannot.
fn untrusted(meta: &std::fs::Metadata) -> Option<String> {
    let uid = effective_uid();
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

impl TrustedKeys {
    /// Reads the `*.pub` files of `dir` (see the module documentation for which count).
    pub fn load(dir: &Path) -> TrustedKeys {
        let mut out = TrustedKeys {
            dir: dir.to_path_buf(),
            ..TrustedKeys::default()
        };
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
                    out.skipped.push(format!("{} ({why})", dir.display()));
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

    /// The key whose public key is `key_id`.
    pub fn find(&self, key_id: &[u8]) -> Option<&PublicKey> {
        self.keys.iter().find(|k| k.key[..] == *key_id)
    }

    /// "; skipped: a (why), b (why)" or "", for messages.
    pub fn skipped_note(&self) -> String {
        if self.skipped.is_empty() {
            String::new()
        } else {
            format!(" (skipped: {})", self.skipped.join(", "))
        }
    }
}

/// Opens, checks (on the opened file) and parses one public key file.
fn read_key_file(path: &Path) -> Result<PublicKey, String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_string());
    }
    if let Some(why) = untrusted(&meta) {
        return Err(why);
    }
    if meta.len() > 4096 {
        return Err("larger than a key file".to_string());
    }
    let mut text = String::new();
    f.read_to_string(&mut text)
        .map_err(|_| "not a text file".to_string())?;
    PublicKey::from_text(&text)
}

/// Reads a secret key file; refused when its group or others may read it (anyone
/// who read it can sign patches), as `ssh` refuses such a key.
pub fn read_secret_key(path: &Path) -> Result<SecretKey, SignError> {
    let shown = path.display();
    let io = |e: std::io::Error| {
        err(
            "EIO",
            format!(
                "cannot read the secret key {shown}: {e} (-EIO); give a NAME.key file that klp-sign keygen wrote"
            ),
        )
    };
    let f = File::open(path).map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    if meta.mode() & 0o077 != 0 {
        return Err(err(
            "EACCES",
            format!(
                "the secret key {shown} may be read by its group or others (mode {:o}) \
                 (-EACCES): chmod 600 {shown}, or generate a new key if others may have read it",
                meta.mode() & 0o7777
            ),
        ));
    }
    let mut text = String::new();
    f.take(4096).read_to_string(&mut text).map_err(io)?;
    SecretKey::from_text(&text).map_err(|why| {
        err(
            "EINVAL",
            format!(
                "{shown} is not a klp secret key: {why} (-EINVAL); give a NAME.key file that \
                 klp-sign keygen wrote"
            ),
        )
    })
}

/// Generates a key named after the last component of `base` and writes `base.key`
/// (mode 0600) and `base.pub` (0644); an existing file is never overwritten.
pub fn keygen(base: &Path) -> Result<(SecretKey, PathBuf, PathBuf), SignError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let key = SecretKey::generate(&name)?;
    let with = |ext: &str| {
        let mut p = base.as_os_str().to_os_string();
        p.push(ext);
        PathBuf::from(p)
    };
    let (secret, public) = (with(".key"), with(".pub"));
    let create = |path: &Path, mode: u32, text: &str| -> Result<(), SignError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| {
                err(
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        "EEXIST"
                    } else {
                        "EIO"
                    },
                    format!(
                        "cannot create {}: {e} (-{}): choose another NAME, or remove the old \
                         key files first",
                        path.display(),
                        if e.kind() == std::io::ErrorKind::AlreadyExists {
                            "EEXIST"
                        } else {
                            "EIO"
                        }
                    ),
                )
            })?;
        f.write_all(text.as_bytes()).map_err(|e| {
            err(
                "EIO",
                format!("cannot write {}: {e} (-EIO)", path.display()),
            )
        })
    };
    if public.exists() {
        return Err(err(
            "EEXIST",
            format!(
                "{} exists (-EEXIST): choose another NAME, or remove the old key files first",
                public.display()
            ),
        ));
    }
    create(&secret, 0o600, &key.to_text())?;
    if let Err(e) = create(&public, 0o644, &key.public().to_text()) {
        let _ = std::fs::remove_file(&secret);
        return Err(e);
    }
    Ok((key, secret, public))
}

/// A good signature: the trusted key that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The key (its trusted file's name and key).
    pub key: PublicKey,
    /// The size of the signed ELF part.
    pub signed_len: usize,
}

/// Checks the signature of a signed `file` against `trusted`. An unsigned file is
/// refused here (`-EKEYREJECTED`); the loader's policy for unsigned files is its own.
pub fn verify(file: &[u8], trusted: &TrustedKeys) -> Result<Verified, SignError> {
    let (elf, block) = split(file)?;
    let Some(block) = block else {
        return Err(err(
            "EKEYREJECTED",
            format!(
                "the file is not signed (-EKEYREJECTED): sign it with klp-sign and put the \
                 public key in {}",
                trusted.dir.display()
            ),
        ));
    };
    let Some(key) = trusted.find(&block.key_id) else {
        return Err(err(
            "ENOKEY",
            format!(
                "the file is signed by key '{}' (fingerprint {}), which is not among the \
                 trusted keys of {}{} (-ENOKEY): put that key's .pub file there, or sign the \
                 file with a trusted key",
                block.signer,
                block.fingerprint(),
                trusted.dir.display(),
                trusted.skipped_note()
            ),
        ));
    };
    let vk = VerifyingKey::from_bytes(&key.key).map_err(|_| {
        err(
            "EKEYREJECTED",
            format!(
                "the trusted key '{}' is not a valid ed25519 key (-EKEYREJECTED): replace its \
                 .pub file",
                key.name
            ),
        )
    })?;
    let mut sig = [0u8; SIG_LEN];
    sig.copy_from_slice(&block.signature);
    vk.verify_strict(elf, &Signature::from_bytes(&sig))
        .map_err(|_| {
            err(
                "EKEYREJECTED",
                format!(
                    "the signature by key '{}' (fingerprint {}) does not match the file \
                     (-EKEYREJECTED): the file was changed after it was signed; use the file \
                     as signed, or sign it again",
                    key.name,
                    key.fingerprint()
                ),
            )
        })?;
    Ok(Verified {
        key: key.clone(),
        signed_len: elf.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf() -> Vec<u8> {
        let mut v = b"\x7fELF".to_vec();
        v.extend((0u8..200).map(|i| i.wrapping_mul(7)));
        v
    }

    fn keys(k: &[PublicKey]) -> TrustedKeys {
        TrustedKeys {
            dir: PathBuf::from("/keys"),
            keys: k.to_vec(),
            skipped: vec![],
        }
    }

    #[test]
    fn layout_is_the_kernels_with_the_fields_before_the_info_block() {
        let k = SecretKey::generate("test-key").unwrap();
        let file = elf();
        let (signed, old) = sign(&file, &k).unwrap();
        assert!(old.is_none());
        let n = file.len();
        assert_eq!(&signed[..n], &file[..]);
        assert_eq!(&signed[n..n + 8], b"test-key");
        assert_eq!(&signed[n + 8..n + 40], &k.public().key);
        let info = &signed[n + 104..n + 116];
        assert_eq!(info, &[1, 0, 0x80, 8, 32, 0, 0, 0, 0, 0, 0, 64]);
        assert_eq!(&signed[n + 116..], MAGIC);
        let (part, block) = split(&signed).unwrap();
        assert_eq!(part, &file[..]);
        let block = block.unwrap();
        assert_eq!(block.signer, "test-key");
        assert_eq!(block.fingerprint(), hex(&k.public().key[..8]));
        // Verified; re-signing replaces the block.
        let v = verify(&signed, &keys(&[k.public()])).unwrap();
        assert_eq!((v.key.name.as_str(), v.signed_len), ("test-key", n));
        let k2 = SecretKey::generate("other").unwrap();
        let (again, old) = sign(&signed, &k2).unwrap();
        assert_eq!(old.unwrap().signer, "test-key");
        assert_eq!(split(&again).unwrap().0, &file[..]);
    }

    #[test]
    fn refusals_carry_the_kernels_errnos() {
        let k = SecretKey::generate("k").unwrap();
        let (signed, _) = sign(&elf(), &k).unwrap();
        let trusted = keys(&[k.public()]);
        // Every byte of the signed part, the key id and the signature matters.
        for at in [0, 10, 150, 203, 205, 210, 240, 268] {
            let mut t = signed.clone();
            t[at] ^= 1;
            let e = verify(&t, &trusted).unwrap_err();
            assert!(matches!(e.errno, "EKEYREJECTED" | "ENOKEY"), "{at}: {e}");
        }
        // A changed signer name only: the key id still finds the key.
        let mut t = signed.clone();
        t[204] = b'x';
        assert!(verify(&t, &trusted).is_ok());
        let other = SecretKey::generate("other").unwrap();
        let e = verify(&signed, &keys(&[other.public()])).unwrap_err();
        assert_eq!(e.errno, "ENOKEY");
        assert!(
            e.message.contains("'k'") && e.message.contains("(-ENOKEY)"),
            "{e}"
        );
        let e = verify(&elf(), &trusted).unwrap_err();
        assert_eq!(e.errno, "EKEYREJECTED");
        let n = signed.len() - MAGIC.len() - INFO_LEN;
        let mut t = signed.clone();
        t[n + 2] = 2; // PKCS#7
        assert_eq!(split(&t).unwrap_err().errno, "ENOPKG");
        let mut t = signed.clone();
        t[n + 5] = 1; // padding
        assert_eq!(split(&t).unwrap_err().errno, "EBADMSG");
        let mut t = signed.clone();
        t[n + 8] = 0x10; // sig_len beyond the file
        assert_eq!(split(&t).unwrap_err().errno, "EBADMSG");
        let mut t = signed.clone();
        t[n + 11] = 63;
        assert_eq!(split(&t).unwrap_err().errno, "EBADMSG");
        assert_eq!(split(MAGIC).unwrap_err().errno, "EBADMSG");
        assert!(sign(b"not elf", &k).is_err());
    }

    #[test]
    fn key_files_round_trip_and_bad_ones_are_refused() {
        let k = SecretKey::generate("a.b-c").unwrap();
        let back = SecretKey::from_text(&k.to_text()).unwrap();
        assert_eq!(back.public(), k.public());
        assert_eq!(
            PublicKey::from_text(&k.public().to_text()).unwrap(),
            k.public()
        );
        assert!(PublicKey::from_text(&k.to_text()).is_err());
        assert!(SecretKey::from_text(&k.public().to_text()).is_err());
        assert!(PublicKey::from_text("klp-ed25519-public 00 x\n").is_err());
        assert!(SecretKey::generate("../x").is_err());
        assert!(SecretKey::generate(".hidden").is_err());
        assert!(SecretKey::generate("").is_err());
    }
}
