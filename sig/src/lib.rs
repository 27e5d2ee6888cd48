//! What ties a klp patch file to its signer and to the builds it was made for: the
//! signature block (this module) and the build-id notes ([`buildid`]). One
//! definition of both formats, written by `klp-convert` / `klp-sign`
//! (`klp_convert::sign`, `klp_convert::buildid`) and read by the process loader
//! (`klp_user::loader::verify`). The messages people read stay with each side: the
//! errors here say what is wrong ([`BlockError`], [`Rejection`], [`KeyError`]) and
//! each side words them as its own (klp-convert's `SignError`, the loader's
//! `LoadError`).
//!
//! Signed patch files carry ed25519 signatures appended as the kernel appends module
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
//! Trusted keys are the `*.pub` files of one directory ([`default_keys_dir`]:
//! `$XDG_CONFIG_HOME/klp/keys`, else `$HOME/.config/klp/keys`). A key counts only when
//! the directory and the file are owned by the process's effective uid or root and
//! writable by neither group nor others (a key anyone can replace vouches for
//! nothing); skipped files are listed with the reason ([`TrustedKeys::skipped`]) for
//! the message that needs them.
//!
//! Errors are those of the kernel's module signature check (`module_sig_check`,
//! `mod_verify_sig`): a malformed block `-EBADMSG`; an unknown algorithm or id type
//! `-ENOPKG` ([`BlockError`]); a key not among the trusted ones `-ENOKEY`; a
//! signature that does not match `-EKEYREJECTED` ([`Rejection`]). Whether an unsigned
//! file is accepted is each side's policy.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

pub mod buildid;

/// The marker at the end of a signed file (the kernel's `MODULE_SIG_STRING`).
pub const MAGIC: &[u8] = b"~Module signature appended~\n";
/// The size of the info block (`struct module_signature`).
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
/// The largest key file read.
const MAX_KEY_FILE: u64 = 4096;

/// Lowercase hex, no separators (as `readelf -n` prints build ids).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The fingerprint of a public key: its first 8 bytes, in hex.
pub fn fingerprint(key: &[u8]) -> String {
    hex(&key[..key.len().min(8)])
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

/// Whether `name` is a valid key name (see the crate documentation).
pub fn valid_key_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+@".contains(&b))
}

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

// ---------------------------------------------------------------------------------
// The block.

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
        fingerprint(&self.key_id)
    }
}

/// Why a file's signature block cannot be read (the kernel's `mod_check_sig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockError {
    /// The block is damaged (`-EBADMSG`); the reason, a clause ("its padding bytes are
    /// not zero").
    Malformed(String),
    /// The block is of another scheme (`-ENOPKG`): a kernel module's PKCS#7
    /// signature, say.
    Unsupported {
        /// `id_type`.
        id_type: u8,
        /// `algo`.
        algo: u8,
        /// `hash`.
        hash: u8,
    },
}

impl BlockError {
    /// The kernel's errno name: `EBADMSG` or `ENOPKG`.
    pub fn errno(&self) -> &'static str {
        match self {
            BlockError::Malformed(_) => "EBADMSG",
            BlockError::Unsupported { .. } => "ENOPKG",
        }
    }
}

/// [`BlockError::Malformed`]: the reason; [`BlockError::Unsupported`]: "an
/// unsupported scheme (id type …, algorithm …, hash …; klp-sign writes …)".
impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockError::Malformed(reason) => f.write_str(reason),
            BlockError::Unsupported {
                id_type,
                algo,
                hash,
            } => write!(
                f,
                "an unsupported scheme (id type {id_type:#x}, algorithm {algo}, hash {hash}; \
                 klp-sign writes id type {ID_TYPE_KLP_ED25519:#x}, algorithm {ALGO_ED25519}, \
                 hash {HASH_NONE})"
            ),
        }
    }
}

impl std::error::Error for BlockError {}

/// Splits a file into its signed part (the ELF file) and its signature block
/// (`None`: the file does not end in the marker, i.e. it is not signed).
pub fn split(file: &[u8]) -> Result<(&[u8], Option<SignatureBlock>), BlockError> {
    let Some(rest) = file.strip_suffix(MAGIC) else {
        return Ok((file, None));
    };
    let bad = |reason: String| BlockError::Malformed(reason);
    let Some(body_len) = rest.len().checked_sub(INFO_LEN) else {
        return Err(bad(format!(
            "the file ends in the signature marker and has {} bytes before it, fewer than \
             the {INFO_LEN}-byte info block",
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
        return Err(BlockError::Unsupported {
            id_type,
            algo,
            hash,
        });
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

/// The signed file: `elf` (the message, every byte of it) followed by `key`'s
/// signature block. `elf` must not carry a block already ([`split`] takes it off).
pub fn append_signature(elf: &[u8], key: &SecretKey) -> Vec<u8> {
    let signature = key.key.sign(elf).to_bytes();
    let name = key.name.as_bytes();
    let mut out =
        Vec::with_capacity(elf.len() + name.len() + KEY_ID_LEN + SIG_LEN + INFO_LEN + MAGIC.len());
    out.extend_from_slice(elf);
    out.extend_from_slice(name);
    out.extend_from_slice(&key.key.verifying_key().to_bytes());
    out.extend_from_slice(&signature);
    out.extend_from_slice(&[
        ALGO_ED25519,
        HASH_NONE,
        ID_TYPE_KLP_ED25519,
        // A valid key name has at most 64 bytes.
        name.len() as u8,
        KEY_ID_LEN as u8,
        0,
        0,
        0,
    ]);
    out.extend_from_slice(&(SIG_LEN as u32).to_be_bytes());
    out.extend_from_slice(MAGIC);
    out
}

// ---------------------------------------------------------------------------------
// Keys.

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
    /// Its name (from its file's line).
    pub name: String,
    /// The ed25519 public key.
    pub key: [u8; 32],
}

/// Why [`SecretKey::generate`] made no key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// The name is not a valid key name (`-EINVAL`).
    Name(String),
    /// The operating system's random source failed (`-EIO`): its error.
    Random(String),
}

impl KeyError {
    /// The errno name: `EINVAL` or `EIO`.
    pub fn errno(&self) -> &'static str {
        match self {
            KeyError::Name(_) => "EINVAL",
            KeyError::Random(_) => "EIO",
        }
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Name(name) => write!(
                f,
                "'{name}' is not a key name: use 1 to 64 characters of A-Z, a-z, 0-9, '.', \
                 '_', '-', '+', '@', not starting with '.'"
            ),
            KeyError::Random(e) => write!(f, "the random source failed ({e})"),
        }
    }
}

impl std::error::Error for KeyError {}

impl SecretKey {
    /// A new key from the operating system's random source.
    pub fn generate(name: &str) -> Result<SecretKey, KeyError> {
        if !valid_key_name(name) {
            return Err(KeyError::Name(name.to_string()));
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SecretKey {
            name: name.to_string(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Reads a `.key` file's text; `Err` says what is wrong with it ("it is not one
    /// line of text").
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
    /// Reads a `.pub` file's text; `Err` says what is wrong with it.
    pub fn from_text(text: &str) -> Result<PublicKey, String> {
        let (key, name) = parse_key_line(text, PUBLIC_KIND)?;
        VerifyingKey::from_bytes(&key)
            .map_err(|_| "its key is not a point of the ed25519 curve".to_string())?;
        Ok(PublicKey { name, key })
    }

    /// The `.pub` file's text.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_KIND} {} {}\n", hex(&self.key), self.name)
    }

    /// Its fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.key)
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

// ---------------------------------------------------------------------------------
// Trust.

/// The trusted keys of a directory, and the files skipped with the reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    /// The directory.
    pub dir: PathBuf,
    /// The keys, in file name order.
    pub keys: Vec<PublicKey>,
    /// `FILE (reason)` for every `*.pub` file (or the directory) that does not count.
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

/// Opens, checks (on the opened file: the checked file is the one read) and parses
/// one public key file.
fn read_key_file(path: &Path) -> Result<PublicKey, String> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_string());
    }
    if let Some(why) = untrusted(&meta) {
        return Err(why);
    }
    if meta.len() > MAX_KEY_FILE {
        return Err("larger than a key file".to_string());
    }
    let mut text = String::new();
    f.take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(|_| "not a text file".to_string())?;
    PublicKey::from_text(&text)
}

impl TrustedKeys {
    /// Reads the `*.pub` files of `dir`; only those the crate documentation says
    /// count are kept, the others are listed in `skipped`.
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

    /// The key whose public key is `key_id`.
    pub fn find(&self, key_id: &[u8]) -> Option<&PublicKey> {
        self.keys.iter().find(|k| k.key[..] == *key_id)
    }

    /// `" (skipped: a (why), b (why))"`, or `""` when nothing was skipped.
    pub fn skipped_note(&self) -> String {
        if self.skipped.is_empty() {
            String::new()
        } else {
            format!(" (skipped: {})", self.skipped.join(", "))
        }
    }
}

/// Why a signature block does not vouch for its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection<'k> {
    /// No trusted key has the block's key id (`-ENOKEY`).
    UnknownKey,
    /// The trusted key with that id is not a valid ed25519 key (`-EKEYREJECTED`; a
    /// key read by [`TrustedKeys::load`] always is).
    InvalidKey(&'k PublicKey),
    /// The signature by that key does not match the signed part (`-EKEYREJECTED`).
    Mismatch(&'k PublicKey),
}

impl Rejection<'_> {
    /// The kernel's errno name: `ENOKEY` or `EKEYREJECTED`.
    pub fn errno(&self) -> &'static str {
        match self {
            Rejection::UnknownKey => "ENOKEY",
            Rejection::InvalidKey(_) | Rejection::Mismatch(_) => "EKEYREJECTED",
        }
    }
}

/// Checks `block` (from [`split`]) over `elf`, the file's signed part, against the
/// `trusted` keys: the key that made the signature.
pub fn verify<'k>(
    elf: &[u8],
    block: &SignatureBlock,
    trusted: &'k TrustedKeys,
) -> Result<&'k PublicKey, Rejection<'k>> {
    let key = trusted.find(&block.key_id).ok_or(Rejection::UnknownKey)?;
    let vk = VerifyingKey::from_bytes(&key.key).map_err(|_| Rejection::InvalidKey(key))?;
    let sig =
        <[u8; SIG_LEN]>::try_from(&block.signature[..]).map_err(|_| Rejection::Mismatch(key))?;
    vk.verify_strict(elf, &Signature::from_bytes(&sig))
        .map_err(|_| Rejection::Mismatch(key))?;
    Ok(key)
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

    /// `file`'s block checked against `trusted`: the key's name, or the errno name.
    fn check(file: &[u8], trusted: &TrustedKeys) -> Result<String, &'static str> {
        let (elf, block) = split(file).map_err(|e| e.errno())?;
        let block = block.ok_or("unsigned")?;
        verify(elf, &block, trusted)
            .map(|k| k.name.clone())
            .map_err(|e| e.errno())
    }

    #[test]
    fn layout_is_the_kernels_with_the_fields_before_the_info_block() {
        let k = SecretKey::generate("test-key").unwrap();
        let file = elf();
        let signed = append_signature(&file, &k);
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
        assert_eq!(block.fingerprint(), k.public().fingerprint());
        assert_eq!(check(&signed, &keys(&[k.public()])).unwrap(), "test-key");
        assert_eq!(split(&file).unwrap(), (&file[..], None));
    }

    #[test]
    fn refusals_carry_the_kernels_errnos() {
        let k = SecretKey::generate("k").unwrap();
        let signed = append_signature(&elf(), &k);
        let trusted = keys(&[k.public()]);
        // Every byte of the signed part, the key id and the signature matters.
        for at in [0, 10, 150, 203, 205, 210, 240, 268] {
            let mut t = signed.clone();
            t[at] ^= 1;
            let e = check(&t, &trusted).unwrap_err();
            assert!(matches!(e, "EKEYREJECTED" | "ENOKEY"), "{at}: {e}");
        }
        // A changed signer name only: the key id still finds the key.
        let mut t = signed.clone();
        t[204] = b'x';
        assert_eq!(check(&t, &trusted).unwrap(), "k");
        let other = SecretKey::generate("other").unwrap();
        assert_eq!(check(&signed, &keys(&[other.public()])), Err("ENOKEY"));
        let n = signed.len() - MAGIC.len() - INFO_LEN;
        let mut t = signed.clone();
        t[n + 2] = 2; // PKCS#7
        let e = split(&t).unwrap_err();
        assert_eq!(
            e,
            BlockError::Unsupported {
                id_type: 2,
                algo: 1,
                hash: 0
            }
        );
        assert_eq!(e.errno(), "ENOPKG");
        assert_eq!(
            e.to_string(),
            "an unsupported scheme (id type 0x2, algorithm 1, hash 0; klp-sign writes id type \
             0x80, algorithm 1, hash 0)"
        );
        let mut t = signed.clone();
        t[n + 5] = 1; // padding
        assert_eq!(
            split(&t).unwrap_err(),
            BlockError::Malformed("its padding bytes are not zero".to_string())
        );
        let mut t = signed.clone();
        t[n + 8] = 0x10; // sig_len beyond the file
        assert_eq!(split(&t).unwrap_err().errno(), "EBADMSG");
        let mut t = signed.clone();
        t[n + 11] = 63;
        assert_eq!(split(&t).unwrap_err().errno(), "EBADMSG");
        assert_eq!(split(MAGIC).unwrap_err().errno(), "EBADMSG");
        // A key that is no ed25519 point, and a short signature: rejected, not a panic.
        let (elf, block) = split(&signed).unwrap();
        let mut block = block.unwrap();
        let bad = keys(&[PublicKey {
            name: "bad".to_string(),
            key: block.key_id.clone().try_into().unwrap(),
        }]);
        block.signature.pop();
        assert_eq!(
            verify(elf, &block, &bad),
            Err(Rejection::Mismatch(&bad.keys[0]))
        );
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
        assert_eq!(
            SecretKey::generate("../x").unwrap_err(),
            KeyError::Name("../x".to_string())
        );
        assert!(SecretKey::generate(".hidden").is_err());
        assert!(SecretKey::generate("").is_err());
        assert_eq!(
            PublicKey::from_text("one\ntwo\n").unwrap_err(),
            "it is not one line of text"
        );
    }

    #[test]
    fn trusted_keys_count_only_when_nobody_else_can_replace_them() {
        use std::os::unix::fs::PermissionsExt;
        let chmod = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let d = std::env::temp_dir().join(format!("klp-sig-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        chmod(&d, 0o755);
        let k = SecretKey::generate("alice").unwrap();
        std::fs::write(d.join("alice.pub"), k.public().to_text()).unwrap();
        chmod(&d.join("alice.pub"), 0o644);
        std::fs::write(d.join("notes.txt"), "not a key").unwrap();
        std::fs::write(d.join("junk.pub"), "junk\n").unwrap();
        chmod(&d.join("junk.pub"), 0o644);
        let t = TrustedKeys::load(&d);
        assert_eq!(t.keys, vec![k.public()]);
        assert_eq!(
            t.skipped,
            vec!["junk.pub (it is not \"klp-ed25519-public <64 hex digits> <name>\" (1 fields))"]
        );
        assert_eq!(t.find(&k.public().key), Some(&t.keys[0]));
        chmod(&d.join("alice.pub"), 0o664);
        let t = TrustedKeys::load(&d);
        assert!(t.keys.is_empty());
        assert!(
            t.skipped_note()
                .contains("alice.pub (writable by its group or others, mode 664)"),
            "{t:?}"
        );
        chmod(&d, 0o775);
        let t = TrustedKeys::load(&d);
        assert_eq!(
            t.skipped,
            vec![format!(
                "the directory {} (writable by its group or others, mode 775)",
                d.display()
            )]
        );
        let t = TrustedKeys::load(&d.join("nowhere"));
        assert!(t.skipped[0].contains("nowhere ("), "{t:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
