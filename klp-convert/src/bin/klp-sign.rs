//! The `klp-sign` command: keys and signatures of patch files (see the crate's README,
//! `klp_convert::sign` and the format's crate, `klp_sig`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use klp_convert::sign::{self, SignError, TrustedKeys};

/// Signs livepatch files with ed25519 keys, as the kernel's sign-file signs modules:
/// the signature is appended to the file with the kernel's marker, and klpctl load
/// checks it against the trusted public keys.
#[derive(Debug, Parser)]
#[command(name = "klp-sign", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generates a key pair: NAME.key (the secret key, mode 0600) and NAME.pub (the
    /// public key, to put in the trusted keys directory of the programs that load
    /// the patches). NAME may have a directory part; the key is named after the last
    /// part.
    Keygen {
        /// The key files' path without extension.
        name: PathBuf,
    },
    /// Signs FILE with a secret key (a signature already there is replaced).
    Sign {
        /// The secret key (NAME.key).
        #[arg(long)]
        key: PathBuf,
        /// The patch file.
        file: PathBuf,
        /// Where to write the signed file (default: FILE itself).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Checks FILE's signature against the public keys of a directory, as the loader
    /// does (only keys owned by you or root and writable by nobody else count).
    Verify {
        /// The trusted keys directory (default: $XDG_CONFIG_HOME/klp/keys, else
        /// $HOME/.config/klp/keys).
        #[arg(long)]
        keys: Option<PathBuf>,
        /// The patch file.
        file: PathBuf,
    },
}

fn io(path: &Path, what: &str, e: std::io::Error) -> SignError {
    SignError {
        errno: "EIO",
        message: format!("cannot {what} {}: {e} (-EIO)", path.display()),
    }
}

/// Writes `data` to `path` through a temporary file in the same directory, so a
/// failure leaves the old file whole.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), SignError> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(format!(".klp-sign.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data).map_err(|e| io(&tmp, "write", e))?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(&tmp, meta.permissions());
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path, "replace", e)
    })
}

fn run(cli: Cli) -> Result<Vec<String>, SignError> {
    match cli.command {
        Command::Keygen { name } => {
            let (key, secret, public) = sign::keygen(&name)?;
            Ok(vec![
                format!(
                    "key {} (fingerprint {}): secret key {}, public key {}",
                    key.name,
                    key.public().fingerprint(),
                    secret.display(),
                    public.display()
                ),
                "keep the .key file private; put the .pub file in the trusted keys directory \
                 of the programs that load the patches"
                    .to_string(),
            ])
        }
        Command::Sign { key, file, output } => {
            let key = sign::read_secret_key(&key)?;
            let data = std::fs::read(&file).map_err(|e| io(&file, "read", e))?;
            let (signed, old) = sign::sign(&data, &key)?;
            let out = output.unwrap_or_else(|| file.clone());
            write_atomic(&out, &signed)?;
            let mut lines = Vec::new();
            if let Some(old) = old {
                lines.push(format!(
                    "replaced the signature by key {} (fingerprint {})",
                    old.signer,
                    old.fingerprint()
                ));
            }
            lines.push(format!(
                "{}: signed with key {} (fingerprint {})",
                out.display(),
                key.name,
                key.public().fingerprint()
            ));
            Ok(lines)
        }
        Command::Verify { keys, file } => {
            let dir = keys.unwrap_or_else(sign::default_keys_dir);
            let data = std::fs::read(&file).map_err(|e| io(&file, "read", e))?;
            let trusted = TrustedKeys::load(&dir);
            let v = sign::verify(&data, &trusted)?;
            Ok(vec![format!(
                "{}: good signature by trusted key {} (fingerprint {}) over {} bytes",
                file.display(),
                v.key.name,
                v.key.fingerprint(),
                v.signed_len
            )])
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("klp-sign: {e}.");
            ExitCode::FAILURE
        }
    }
}
