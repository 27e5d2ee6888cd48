//! A host that knows a few vmlinux and module symbols and records the log: enough for
//! the core's ELF code (symbol resolution, messages). Everything else is inert.

use std::cell::Cell;
use std::collections::HashMap;
use std::ops::ControlFlow;

use klp::{
    Addr, Comm, HookError, Host, IdleTask, PatchId, PatchState, Record, RedirectView, TaskId,
    TraceError,
};

/// The first of two vmlinux functions named `static_fn`.
pub const FN_FIRST: u64 = 0x1000_2000;
/// The second `static_fn`.
pub const FN_SECOND: u64 = 0x1000_4000;
/// vmlinux's `static_var`.
pub const VAR: u64 = 0x7fff_1234_5678_9ab0;

/// See the module documentation.
#[derive(Default)]
pub struct SymHost {
    /// Every line logged.
    pub log: Vec<String>,
    /// Symbol lookups made.
    pub lookups: Cell<usize>,
    /// (object — `None` for vmlinux —, name) → addresses in symbol-table order. When
    /// it is not empty, it is the only answer; otherwise the constants above are.
    pub table: HashMap<(Option<String>, String), Vec<Addr>>,
}

impl Host for SymHost {
    fn log(&mut self, rec: &Record<'_>) {
        self.log.push(rec.to_string());
    }
    fn warn(&mut self, what: &str) {
        panic!("WARN {what}");
    }
    fn reliable_stacktrace(&self) -> bool {
        true
    }
    fn module_is_livepatch(&self, _: &str) -> bool {
        true
    }
    fn module_get(&mut self, _: &str) -> bool {
        true
    }
    fn module_put(&mut self, _: &str) {}
    fn for_each_symbol(
        &self,
        obj: Option<&str>,
        name: &str,
        f: &mut dyn FnMut(Addr) -> ControlFlow<()>,
    ) {
        self.lookups.set(self.lookups.get() + 1);
        let cands: &[Addr] = if !self.table.is_empty() {
            let key = (obj.map(str::to_string), name.to_string());
            self.table.get(&key).map_or(&[], Vec::as_slice)
        } else {
            match (obj, name) {
                (None, "static_fn") => &[FN_FIRST, FN_SECOND],
                (None, "static_var") => &[VAR],
                (Some("mymod"), "mod_fn") => &[0x1000_8000],
                _ => &[],
            }
        };
        for a in cands {
            if f(*a).is_break() {
                return;
            }
        }
    }
    fn symbol_size(&self, _: Addr) -> Option<u64> {
        None
    }
    fn hook_site(&self, _: Addr) -> Option<Addr> {
        None
    }
    fn hook_register(&mut self, _: Addr) -> Result<(), HookError> {
        Ok(())
    }
    fn hook_unregister(&mut self, _: Addr) {}
    fn hook_publish(&mut self, _: Addr, _: Option<RedirectView>) {}
    fn for_each_task(&mut self, _: &mut dyn FnMut(&mut Self, TaskId)) {}
    fn for_each_idle_task(&mut self, _: &mut dyn FnMut(&mut Self, IdleTask)) {}
    fn current(&self) -> TaskId {
        TaskId(0)
    }
    fn patch_state(&self, _: TaskId) -> PatchState {
        PatchState::Idle
    }
    fn set_patch_state(&mut self, _: TaskId, _: PatchState) {}
    fn patch_pending(&self, _: TaskId) -> bool {
        false
    }
    fn set_patch_pending(&mut self, _: TaskId, _: bool) {}
    fn task_ident(&self, _: TaskId) -> (Comm, i64) {
        (Comm::default(), 0)
    }
    fn is_kthread(&self, _: TaskId) -> bool {
        false
    }
    fn task_running_elsewhere(&self, _: TaskId) -> bool {
        false
    }
    fn stack_trace_reliable(&mut self, _: TaskId, _: &mut [Addr]) -> Result<usize, TraceError> {
        Ok(0)
    }
    fn fake_signal(&mut self, _: TaskId) {}
    fn wake_kthread(&mut self, _: TaskId) {}
    fn wake_cpu(&mut self, _: u32) {}
    fn synchronize(&mut self) {}
    fn schedule_retry(&mut self) {}
    fn schedule_free(&mut self, _: PatchId) {}
}
