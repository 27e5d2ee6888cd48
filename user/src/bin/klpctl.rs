//! `klpctl`: controls the livepatches of a process that serves klp's control socket,
//! and tells what a patch file would do. See `klp_user::ctl` for the commands and the
//! protocol.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = klp_user::ctl::run(&args, &mut klp_user::ctl::Stdio);
    std::process::exit(code);
}
