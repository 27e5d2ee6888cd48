//! Signed patch files: klp-convert's side (`klp-sign`, `klp-convert --sign`) of the
//! format that [`klp_sig`] defines — the signature block appended as the kernel
//! appends module signatures, key files, the trusted keys directory; see that crate
//! for the layout and the rules. Here: the files on disk (key generation, secret key
//! files) and the messages of the commands, which name the kernel's errno in brackets
//! and say what to do.
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

pub use klp_sig::{
    ALGO_ED25519, HASH_NONE, ID_TYPE_KLP_ED25519, INFO_LEN, KEY_ID_LEN, MAGIC, PUBLIC_KIND,
    PublicKey, SECRET_KIND, SIG_LEN, SecretKey, SignatureBlock, TrustedKeys, default_keys_dir,
    fingerprint, hex, valid_key_name,
};
use klp_sig::{BlockError, KeyError, Rejection};

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

fn key_error(e: KeyError) -> SignError {
    let message = match &e {
        KeyError::Name(name) => format!(
            "'{name}' is not a key name (-EINVAL): use 1 to 64 characters of A-Z, a-z, 0-9, \
             '.', '_', '-', '+', '@', not starting with '.'"
        ),
        KeyError::Random(why) => format!("the random source failed ({why}) (-EIO): try again"),
    };
    err(e.errno(), message)
}

/// Splits a file into its signed part and its signature block (`None`: the file
/// does not end in the marker, i.e. it is not signed): [`klp_sig::split`], its
/// refusals worded for the commands.
pub fn split(file: &[u8]) -> Result<(&[u8], Option<SignatureBlock>), SignError> {
    klp_sig::split(file).map_err(|e| {
        let message = match &e {
            BlockError::Malformed(_) => format!(
                "the signature block is malformed: {e} (-EBADMSG); sign the unsigned file \
                 again with klp-sign"
            ),
            BlockError::Unsupported { .. } => format!(
                "the file is signed with {e} (-ENOPKG): sign the unsigned file with klp-sign"
            ),
        };
        err(e.errno(), message)
    })
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
    Ok((klp_sig::append_signature(elf, key), old))
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
    let key = SecretKey::generate(&name).map_err(key_error)?;
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

/// Checks the signature of a signed `file` against `trusted` ([`klp_sig::verify`]). An
/// unsigned file is refused here (`-EKEYREJECTED`); the loader's policy for unsigned
/// files is its own.
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
    let key = klp_sig::verify(elf, &block, trusted).map_err(|r| {
        let message = match r {
            Rejection::UnknownKey => format!(
                "the file is signed by key '{}' (fingerprint {}), which is not among the \
                 trusted keys of {}{} (-ENOKEY): put that key's .pub file there, or sign the \
                 file with a trusted key",
                block.signer,
                block.fingerprint(),
                trusted.dir.display(),
                trusted.skipped_note()
            ),
            Rejection::InvalidKey(key) => format!(
                "the trusted key '{}' is not a valid ed25519 key (-EKEYREJECTED): replace its \
                 .pub file",
                key.name
            ),
            Rejection::Mismatch(key) => format!(
                "the signature by key '{}' (fingerprint {}) does not match the file \
                 (-EKEYREJECTED): the file was changed after it was signed; use the file \
                 as signed, or sign it again",
                key.name,
                key.fingerprint()
            ),
        };
        err(r.errno(), message)
    })?;
    Ok(Verified {
        key: key.clone(),
        signed_len: elf.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for a patch object: only its first bytes are looked at.
    fn elf() -> Vec<u8> {
        [&b"\x7fELF"[..], &[0x5a; 100]].concat()
    }

    /// `keys` trusted, as if read from `/keys`.
    fn keys(keys: &[PublicKey]) -> TrustedKeys {
        let dir = PathBuf::from("/keys");
        let keys = keys.to_vec();
        TrustedKeys {
            keys,
            dir,
            ..TrustedKeys::default()
        }
    }

    #[test]
    fn signing_replaces_a_block_and_verifying_names_the_key() {
        let k = SecretKey::generate("test-key").unwrap();
        let file = elf();
        let (signed, old) = sign(&file, &k).unwrap();
        assert!(old.is_none());
        assert_eq!(split(&signed).unwrap().0, &file[..]);
        let v = verify(&signed, &keys(&[k.public()])).unwrap();
        assert_eq!(
            (v.key.name.as_str(), v.signed_len),
            ("test-key", file.len())
        );
        let k2 = SecretKey::generate("other").unwrap();
        let (again, old) = sign(&signed, &k2).unwrap();
        assert_eq!(old.unwrap().signer, "test-key");
        assert_eq!(split(&again).unwrap().0, &file[..]);
    }

    #[test]
    fn refusals_name_the_kernels_errnos() {
        let k = SecretKey::generate("k").unwrap();
        let (signed, _) = sign(&elf(), &k).unwrap();
        let trusted = keys(&[k.public()]);
        let mut t = signed.clone();
        t[10] ^= 1;
        let e = verify(&t, &trusted).unwrap_err();
        assert_eq!(e.errno, "EKEYREJECTED");
        assert!(
            e.message
                .contains("does not match the file (-EKEYREJECTED)"),
            "{e}"
        );
        let other = SecretKey::generate("other").unwrap();
        let e = verify(&signed, &keys(&[other.public()])).unwrap_err();
        assert_eq!(e.errno, "ENOKEY");
        assert!(
            e.message.contains("'k'") && e.message.contains("(-ENOKEY)"),
            "{e}"
        );
        let e = verify(&elf(), &trusted).unwrap_err();
        assert_eq!(e.errno, "EKEYREJECTED");
        assert!(e.message.contains("not signed (-EKEYREJECTED)"), "{e}");
        let n = signed.len() - MAGIC.len() - INFO_LEN;
        let mut t = signed.clone();
        t[n + 2] = 2; // PKCS#7
        let e = split(&t).unwrap_err();
        assert_eq!(e.errno, "ENOPKG");
        assert!(
            e.message
                .starts_with("the file is signed with an unsupported scheme (id type 0x2,")
                && e.message
                    .ends_with("(-ENOPKG): sign the unsigned file with klp-sign"),
            "{e}"
        );
        let mut t = signed.clone();
        t[n + 5] = 1; // padding
        let e = split(&t).unwrap_err();
        assert_eq!(e.errno, "EBADMSG");
        assert_eq!(
            e.message,
            "the signature block is malformed: its padding bytes are not zero (-EBADMSG); \
             sign the unsigned file again with klp-sign"
        );
        assert_eq!(sign(b"not elf", &k).unwrap_err().errno, "ENOEXEC");
        let e = key_error(SecretKey::generate("../x").unwrap_err());
        assert_eq!(e.errno, "EINVAL");
        assert!(
            e.message
                .starts_with("'../x' is not a key name (-EINVAL): use 1 to 64"),
            "{e}"
        );
    }
}
