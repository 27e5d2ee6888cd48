//! The `klp-convert` command: see the crate's README.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use klp_convert::manifest::CALLBACK_KINDS;
use klp_convert::{
    ConvertReason, Decision, Error, KeepReason, Manifest, Options, TargetInput, convert,
    parse_target_arg,
};

/// Turns an ordinarily compiled patch object into a livepatch object: references the
/// loader cannot resolve (static symbols, hidden symbols, symbols of objects that may
/// not be loaded) become .klp.sym symbols with their relocations in .klp.rela sections.
#[derive(Debug, Parser)]
#[command(name = "klp-convert", version)]
struct Cli {
    /// The patch object (ET_REL: a .o or .ko from gcc or rustc).
    input: PathBuf,

    /// Where to write the livepatch object.
    #[arg(short, long)]
    output: PathBuf,

    /// A binary the patch applies to, as NAME=PATH: an executable, shared object,
    /// vmlinux or .ko, or a System.map-style list ("ADDRESS TYPE NAME", kallsyms
    /// [module] tags allowed). NAME is vmlinux for the kernel or the main executable,
    /// else the module's name. NAME= may be left out for vmlinux*, System.map*,
    /// NAME.ko and NAME.so* files. Repeat for each object.
    #[arg(short, long = "target", value_name = "[NAME=]PATH")]
    targets: Vec<String>,

    /// A JSON manifest choosing definitions ({"symbols": {"foo": {"object":
    /// "vmlinux", "sympos": 2, "file": "bar.c"}}}), listing symbols to convert
    /// anyway ("force_klp") or to leave alone ("keep"), and describing the patch
    /// ({"patch": {"objects": [{"object": "vmlinux", "funcs": [{"old": "f", "new":
    /// "new_f"}]}]}}: written as .init.klp_objects / .init.klp_funcs).
    #[arg(short, long)]
    manifest: Option<PathBuf>,

    /// Convert this symbol even if the loader could resolve it (adds to the
    /// manifest's "force_klp").
    #[arg(long, value_name = "SYMBOL")]
    force_klp: Vec<String>,

    /// Leave this symbol an ordinary undefined symbol (adds to the manifest's "keep").
    #[arg(long, value_name = "SYMBOL")]
    keep: Vec<String>,

    /// Leave symbols that no target defines as ordinary undefined symbols, with a
    /// warning, instead of refusing.
    #[arg(long)]
    keep_unresolved: bool,

    /// Record no build ids: without it, the GNU build id of every ELF target is
    /// written into .note.klp.build-id, and the loader refuses the patch for another
    /// build of that object.
    #[arg(long)]
    no_build_id: bool,

    /// Also replace each function of a target into which the compiler inlined a
    /// replaced function (read from the target's debug information: build it with -g);
    /// the patch must define a fixed copy of each under the same name.
    #[arg(long)]
    patch_callers: bool,

    /// Sign the output with this secret key (a NAME.key file of klp-sign keygen):
    /// the signature is appended as the kernel appends module signatures.
    #[arg(long, value_name = "KEY")]
    sign: Option<PathBuf>,

    /// Print what happens to each undefined symbol, each .klp.rela section, each
    /// relaxed GOT reference and each target's build id.
    #[arg(short, long)]
    verbose: bool,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn run(cli: &Cli) -> Result<Vec<String>, Error> {
    let mut manifest = match &cli.manifest {
        Some(path) => {
            let text = read(path)?;
            let text = String::from_utf8(text).map_err(|_| Error::Manifest {
                reason: format!("{} is not UTF-8 text", path.display()),
            })?;
            Manifest::from_json(&text)?
        }
        None => Manifest::default(),
    };
    manifest.force_klp.extend(cli.force_klp.iter().cloned());
    manifest.keep.extend(cli.keep.iter().cloned());

    let patch = read(&cli.input)?;
    let mut files = Vec::new();
    for arg in &cli.targets {
        let (name, path) = parse_target_arg(arg)?;
        let data = read(&PathBuf::from(&path))?;
        files.push((name, path, data));
    }
    let targets: Vec<TargetInput<'_>> = files
        .iter()
        .map(|(name, path, data)| TargetInput {
            name: name.clone(),
            file: path.clone(),
            data,
        })
        .collect();
    let options = Options {
        keep_unresolved: cli.keep_unresolved,
        no_build_id: cli.no_build_id,
        patch_callers: cli.patch_callers,
    };
    // The key is read before converting: a bad key leaves no output behind.
    let key = match &cli.sign {
        Some(path) => Some(
            klp_convert::sign::read_secret_key(path)
                .map_err(|e| Error::Signing { message: e.message })?,
        ),
        None => None,
    };
    let input = cli.input.display().to_string();
    let out = convert(&input, &patch, &targets, &manifest, &options)?;
    let data = match &key {
        Some(key) => {
            klp_convert::sign::sign(&out.data, key)
                .map_err(|e| Error::Signing { message: e.message })?
                .0
        }
        None => out.data.clone(),
    };
    std::fs::write(&cli.output, &data).map_err(|e| Error::Io {
        path: cli.output.display().to_string(),
        reason: e.to_string(),
    })?;

    let mut lines = Vec::new();
    if cli.verbose {
        for s in &out.report.symbols {
            lines.push(match &s.decision {
                Decision::Convert {
                    klp_name, reason, ..
                } => {
                    let why = match reason {
                        ConvertReason::Local => "a static symbol",
                        ConvertReason::Hidden => "a hidden symbol",
                        ConvertReason::OtherObject => "in an object that may not be loaded",
                        ConvertReason::NotExported => "not resolved by the loader (not exported)",
                        ConvertReason::Forced => "forced by the manifest",
                    };
                    format!("{} -> {klp_name} ({why})", s.name)
                }
                Decision::Keep { reason, object } => {
                    let why = match reason {
                        KeepReason::Manifest => "kept by the manifest".to_string(),
                        KeepReason::LoaderProvided => "provided by the linker/loader".to_string(),
                        KeepReason::Resolvable => format!(
                            "resolved by the loader of {}",
                            object.as_deref().unwrap_or("vmlinux")
                        ),
                        KeepReason::Unresolved => "defined by no target".to_string(),
                    };
                    format!("{} stays undefined ({why})", s.name)
                }
            });
        }
        for k in &out.report.sections {
            lines.push(format!(
                "{}: {} relocation(s) of {} against {}",
                k.name,
                k.relocations.len(),
                k.target,
                k.object
            ));
        }
        for r in &out.report.relaxed {
            let name = |t| {
                klp_convert::reloc::type_name(out.report.arch, t)
                    .map_or_else(|| t.to_string(), str::to_string)
            };
            lines.push(format!(
                "{}+{:#x}: {} -> {} against {} (relaxed: {})",
                r.section,
                r.offset,
                name(r.from),
                name(r.to),
                r.symbol,
                r.rewrite
            ));
        }
        for b in &out.report.build_ids {
            lines.push(match (&b.id, b.recorded) {
                (Some(id), true) => format!(
                    "{}: build id {} recorded (.note.klp.build-id)",
                    b.object,
                    klp_convert::buildid::hex(id)
                ),
                (Some(id), false) => format!(
                    "{}: build id {} not recorded (--no-build-id)",
                    b.object,
                    klp_convert::buildid::hex(id)
                ),
                (None, _) => format!(
                    "{}: no build id recorded ({} has no NT_GNU_BUILD_ID note), so the patch \
                     is not tied to one build of it",
                    b.object, b.file
                ),
            });
        }
        if let Some(key) = &key {
            lines.push(format!(
                "signed with key {} (fingerprint {})",
                key.name,
                key.public().fingerprint()
            ));
        }
        if out.report.modinfo_added {
            lines.push(".modinfo: added livepatch=Y".to_string());
        }
        if let Some(d) = &out.report.description {
            lines.push(format!(
                "patch description: {} object(s){}",
                d.objects.len(),
                if d.replace {
                    ", atomic replace (.modinfo klp_replace=Y)"
                } else {
                    ""
                }
            ));
            for o in &d.objects {
                lines.push(format!(
                    "  {}{}",
                    o.name,
                    if o.checked {
                        ""
                    } else {
                        " (not checked: no target)"
                    }
                ));
                for f in &o.funcs {
                    lines.push(format!("    {},{} -> {}", f.old, f.sympos, f.new));
                }
                for (kind, cb) in CALLBACK_KINDS.iter().zip(&o.callbacks) {
                    if let Some(cb) = cb {
                        lines.push(format!("    {kind}: {cb}"));
                    }
                }
            }
        }
    }
    for w in &out.report.warnings {
        lines.push(format!("klp-convert: warning: {w}."));
    }
    Ok(lines)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(lines) => {
            for l in lines {
                eprintln!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("klp-convert: {e}");
            ExitCode::FAILURE
        }
    }
}
