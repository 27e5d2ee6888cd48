//! Helpers shared by the integration tests.

use std::process::Command;

/// A command running one of this package's binaries, through the emulator when the
/// tests run under QEMU: without binfmt_misc a foreign binary cannot be started
/// directly, so `ci/test` names the emulator in `KLP_TEST_RUNNER` (e.g.
/// `qemu-s390x -L /usr/s390x-linux-gnu`; empty natively).
pub fn bin_command(bin: &str) -> Command {
    let runner = std::env::var("KLP_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(emu) => {
            let mut c = Command::new(emu);
            c.args(words).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}
