//! `cargo run -p klp-inline --example inlined -- FILE FUNC...`: what the crate finds for
//! each FUNC in FILE, and the time `Analysis::new` took.

use std::io::Write;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: inlined FILE FUNC...");
        std::process::exit(2);
    };
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(1);
        }
    };
    let t = Instant::now();
    let a = match klp_inline::Analysis::new(&data) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(1);
        }
    };
    let mut out = std::io::stdout().lock();
    // Output errors (a closed pipe) end the listing quietly.
    let _ = writeln!(
        out,
        "{path}: {} bytes, Analysis::new {:.3} s, {} function symbols, debug info: {}, relocations: {}",
        data.len(),
        t.elapsed().as_secs_f64(),
        a.symbol_count(),
        a.has_debug_info(),
        a.has_relocations()
    );
    for f in args {
        let t = Instant::now();
        let i = a.inlined_into(&f);
        let dt = t.elapsed();
        let _ = writeln!(out, "{f} ({:.1} µs): {i:#x?}", dt.as_secs_f64() * 1e6);
        if let Some(w) = klp_inline::warning(&f, "the program", &i) {
            let _ = writeln!(out, "warning: {w}");
        }
    }
}
