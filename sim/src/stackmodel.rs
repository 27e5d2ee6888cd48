//! Task stacks laid out in the memory format of a real architecture and walked by that
//! architecture's reliable unwinder, so that the core's stack checks can run on the
//! traces every back-end produces (`klp-sim run --arch …`).

use klp::{Addr, TraceError};
use klp_arch::model::HandStack;
use klp_arch::{Arch, UnwindError, trace_reliable};
use klp_backends::Visit;

use crate::world::{MODULES_BASE, VMLINUX_BASE};

/// Where simulated kernel stacks live.
const STACK_LOW: u64 = 0xffff_c900_0010_0000;
/// The end of the simulated text (vmlinux and modules).
const TEXT_END: u64 = MODULES_BASE + 0x0100_0000;
/// A return address that is not code: marks a stack the walker must refuse.
const NOT_TEXT: u64 = 0x10;

/// An architecture whose unwinder walks the simulated stacks: any back-end of
/// `klp-backends`, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArchModel {
    name: &'static str,
    machine: u16,
    syscall_prefix: &'static str,
}

struct Describe;

impl Visit for Describe {
    type Out = ArchModel;
    fn visit<A: Arch>(self) -> ArchModel {
        ArchModel {
            name: A::NAME,
            machine: A::ELF_MACHINE,
            syscall_prefix: A::SYSCALL_PREFIX,
        }
    }
}

struct Walk<'a>(&'a [u64]);

impl Visit for Walk<'_> {
    type Out = Result<Vec<u64>, Option<UnwindError>>;
    fn visit<A: Arch>(self) -> Self::Out {
        walk::<A>(self.0)
    }
}

impl ArchModel {
    /// Every model: one per back-end.
    pub fn all() -> Vec<ArchModel> {
        klp_backends::NAMES
            .iter()
            .filter_map(|n| ArchModel::from_name(n))
            .collect()
    }

    /// By name (`x86_64`, `aarch64`, …: a back-end's [`Arch::NAME`]).
    pub fn from_name(s: &str) -> Option<ArchModel> {
        klp_backends::by_name(s, Describe).ok()
    }

    /// The name.
    pub fn name(self) -> &'static str {
        self.name
    }

    /// The architecture's ELF machine (`e_machine`).
    pub fn machine(self) -> u16 {
        self.machine
    }

    /// The kernel's syscall symbol prefix on this architecture.
    pub fn syscall_prefix(self) -> &'static str {
        self.syscall_prefix
    }

    /// Lays out a stack whose frames return to `frames` (outermost first, the last one
    /// being where the task stopped) and walks it with the arch's reliable unwinder.
    /// With `corrupt`, one return address in the middle is not code, as after a stack
    /// corruption or an unknown frame: the walker must refuse the stack.
    pub fn trace(
        self,
        frames: &[Addr],
        corrupt: bool,
        max: usize,
    ) -> Result<Vec<Addr>, TraceError> {
        let mut inner_first: Vec<u64> = frames.iter().rev().copied().collect();
        if corrupt {
            let mid = inner_first.len() / 2 + 1;
            inner_first.insert(mid.min(inner_first.len()), NOT_TEXT);
        }
        if inner_first.is_empty() {
            return Ok(Vec::new());
        }
        let r = klp_backends::by_name(self.name, Walk(&inner_first)).unwrap_or(Err(None));
        match r {
            Ok(t) if t.len() >= max => Err(TraceError::TooDeep),
            Ok(t) => Ok(t),
            Err(Some(UnwindError::BufferFull)) => Err(TraceError::TooDeep),
            Err(_) => Err(TraceError::Unreliable),
        }
    }
}

/// `Err(None)`: the stack does not fit the model's memory.
fn walk<A: Arch>(inner_first: &[u64]) -> Result<Vec<u64>, Option<UnwindError>> {
    let mut mem = HandStack::new(STACK_LOW, VMLINUX_BASE..TEXT_END);
    let start = A::model_stack(&mut mem, inner_first).ok_or(None)?;
    let t = trace_reliable::<A>(&mem, &start).map_err(Some)?;
    Ok(t.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_walks_back_what_was_laid_out() {
        let frames: Vec<u64> = (0..12).map(|i| VMLINUX_BASE + 0x100 * i + 0x1c).collect();
        for a in ArchModel::all() {
            let t = a
                .trace(&frames, false, 100)
                .unwrap_or_else(|e| panic!("{}: {e:?}", a.name()));
            let mut want = frames.clone();
            want.reverse();
            assert_eq!(t, want, "{}", a.name());
            assert_eq!(
                a.trace(&frames, true, 100),
                Err(TraceError::Unreliable),
                "{}",
                a.name()
            );
            assert_eq!(ArchModel::from_name(a.name()), Some(a));
            assert_ne!(a.machine(), 0, "{}", a.name());
        }
    }

    #[test]
    fn every_back_end_is_a_model() {
        assert_eq!(ArchModel::all().len(), klp_backends::NAMES.len());
        assert_eq!(ArchModel::from_name("vax"), None);
    }

    #[test]
    fn deep_stacks_are_unreliable() {
        let frames: Vec<u64> = (0..120).map(|i| VMLINUX_BASE + 0x100 * i + 0x1c).collect();
        for a in ArchModel::all() {
            assert!(a.trace(&frames, false, 100).is_err(), "{}", a.name());
        }
    }
}
