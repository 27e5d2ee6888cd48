//! `klpctl`: controls the livepatches of a process that serves klp's control socket.
//! See `klp_user::ctl` for the protocol.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut out = String::new();
    let code = klp_user::ctl::klpctl(&args, &mut out);
    if code == 0 {
        print!("{out}");
    } else {
        eprint!("{out}");
    }
    std::process::exit(code);
}
