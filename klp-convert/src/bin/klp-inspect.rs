//! The `klp-inspect` command: shows a livepatch object (see the crate's README).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use klp_convert::inspect::{InspectError, inspect, render_json, render_text};
use klp_convert::{Error, TargetInput, parse_target_arg};

/// Shows a livepatch object as the livepatch core reads it: its header and
/// .modinfo, the patch description (objects, replaced functions, callbacks) and
/// every .klp.rela section entry by entry, with each .klp.sym symbol resolved in
/// the targets given, and the problems found.
#[derive(Debug, Parser)]
#[command(name = "klp-inspect", version)]
struct Cli {
    /// The livepatch object (a .o or .ko).
    file: PathBuf,

    /// A binary or System.map of an object the patch applies to, as [NAME=]PATH
    /// (as klp-convert's --target): its symbols are looked up with the kernel's
    /// sympos rules. Repeat for each object.
    #[arg(short, long = "target", value_name = "[NAME=]PATH")]
    targets: Vec<String>,

    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

fn read(path: &str) -> Result<Vec<u8>, InspectError> {
    std::fs::read(path).map_err(|e| {
        InspectError::Target(Error::Io {
            path: path.to_string(),
            reason: e.to_string(),
        })
    })
}

fn run(cli: &Cli) -> Result<String, InspectError> {
    let file = cli.file.display().to_string();
    let data = std::fs::read(&cli.file).map_err(|e| InspectError::Object {
        file: file.clone(),
        reason: e.to_string(),
    })?;
    let mut files = Vec::new();
    for arg in &cli.targets {
        let (name, path) = parse_target_arg(arg)?;
        let bytes = read(&path)?;
        files.push((name, path, bytes));
    }
    let targets: Vec<TargetInput<'_>> = files
        .iter()
        .map(|(name, path, data)| TargetInput {
            name: name.clone(),
            file: path.clone(),
            data,
        })
        .collect();
    let i = inspect(&file, &data, &targets)?;
    Ok(if cli.json {
        render_json(&i) + "\n"
    } else {
        render_text(&i)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("klp-inspect: {e}");
            ExitCode::FAILURE
        }
    }
}
