//! `klp-sim run FILE…`: runs scenario files on the simulated kernel.

use std::process::ExitCode;

use klp_sim::scenario::{Outcome, Runner, parse};
use klp_sim::stackmodel::ArchModel;

fn usage() -> ExitCode {
    eprintln!("usage: klp-sim run [--log] [--arch x86_64|aarch64|ppc64le|s390x] FILE...");
    eprintln!("       klp-sim demo");
    eprintln!("  Runs each .klpt scenario on a fresh simulated kernel and prints PASS, FAIL");
    eprintln!("  (with a diff of the expected and the actual log) or SKIP for each.");
    eprintln!("  --log   also print each scenario's filtered kernel log");
    eprintln!("  --arch  lay task stacks out as on that architecture and check them with its");
    eprintln!("          reliable unwinder (default: read the simulated frames directly)");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        return usage();
    };
    if cmd == "demo" {
        let mut out = std::io::stdout().lock();
        return match klp_sim::demo::run(&mut out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("klp-sim: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if cmd != "run" {
        return usage();
    }
    let mut show_log = false;
    let mut arch = None;
    let mut files: Vec<&String> = Vec::new();
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--log" => show_log = true,
            "--arch" => {
                let Some(m) = it.next().and_then(|n| ArchModel::from_name(n)) else {
                    return usage();
                };
                arch = Some(m);
            }
            _ => files.push(a),
        }
    }
    if files.is_empty() {
        return usage();
    }
    let (mut pass, mut fail, mut skip) = (0, 0, 0);
    for f in files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                println!("FAIL {f}: cannot read: {e}");
                fail += 1;
                continue;
            }
        };
        let sc = match parse(&text) {
            Ok(s) => s,
            Err(e) => {
                println!("FAIL {f}: malformed scenario: {e}");
                fail += 1;
                continue;
            }
        };
        let mut r = Runner::with_arch(arch);
        r.base = std::path::Path::new(f)
            .parent()
            .map_or_else(|| ".".into(), std::path::Path::to_path_buf);
        let out = r.run(&sc);
        match &out {
            Outcome::Pass => {
                pass += 1;
                println!("PASS {f}");
            }
            Outcome::Skip(m) => {
                skip += 1;
                println!("SKIP {f}: {m}");
            }
            Outcome::Fail(m) => {
                fail += 1;
                println!("FAIL {f}: {m}");
            }
        }
        if show_log {
            for l in r.filtered_log() {
                println!("    | {l}");
            }
        }
    }
    println!("{pass} passed, {fail} failed, {skip} skipped");
    if fail > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
