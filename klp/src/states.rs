//! System states (`struct klp_state`): ids and versions that keep cumulative patches
//! compatible with each other.

use crate::core::Klp;
use crate::host::{Host, PatchId};
use crate::model::State;

impl<H: Host> Klp<H> {
    /// `klp_is_patch_compatible`: may a patch with `states` (and the `replace` flag) be
    /// enabled on top of the listed patches?
    ///
    /// * a state id that no listed patch has: allowed;
    /// * an id a listed patch has: allowed when the new version is the same or higher;
    /// * a cumulative (`replace`) patch must carry every id of every listed patch.
    pub fn is_patch_compatible(&self, states: &[State], replace: bool) -> bool {
        for pid in &self.list {
            let Some(p) = self.patch(*pid) else { continue };
            for old in &p.states {
                match states.iter().find(|s| s.id == old.id) {
                    None if replace => return false,
                    None => {}
                    Some(new) if new.version < old.version => return false,
                    Some(_) => {}
                }
            }
        }
        true
    }

    /// `klp_get_state(patch, id)`.
    pub fn get_state(&self, patch: PatchId, id: u64) -> Option<&State> {
        self.patch(patch)?.states.iter().find(|s| s.id == id)
    }

    /// `klp_get_state` for writing the state's data.
    pub fn get_state_mut(&mut self, patch: PatchId, id: u64) -> Option<&mut State> {
        self.patch_mut(patch)?
            .states
            .iter_mut()
            .find(|s| s.id == id)
    }

    /// `klp_get_prev_state(id)`: the state of the last patch listed before the patch in
    /// transition. Outside a transition this WARNs and returns `None`.
    pub fn get_prev_state(&self, host: &mut H, id: u64) -> Option<&State> {
        let Some(tp) = self.transition else {
            host.warn("klp_get_prev_state() called with no transition");
            return None;
        };
        let mut found = None;
        for pid in &self.list {
            if *pid == tp {
                break;
            }
            if let Some(s) = self.get_state(*pid, id) {
                found = Some(s);
            }
        }
        found
    }
}
