//! The optional JSON manifest: choices the patch object itself cannot express.
//!
//! ```json
//! {
//!   "symbols": {
//!     "helper": { "object": "vmlinux", "file": "bar.c" },
//!     "counter": { "sympos": 2 }
//!   },
//!   "force_klp": ["mod_exported_fn"],
//!   "keep": ["printf"],
//!   "patch": {
//!     "objects": [
//!       { "object": "vmlinux",
//!         "funcs": [ { "old": "cmdline_proc_show", "new": "livepatch_cmdline_proc_show",
//!                      "sympos": 0 } ],
//!         "callbacks": { "pre_patch": "my_pre", "post_unpatch": "my_post_unpatch" } },
//!       { "object": "mymod", "funcs": [ { "old": "mod_fn", "new": "new_mod_fn" } ] }
//!     ],
//!     "replace": false
//!   }
//! }
//! ```
//!
//! * `symbols.<name>`: which definition an undefined symbol means: `object` (an
//!   object name), `sympos` (the 1-based position among the object's symbols of
//!   that name, in table order; `0` = "the unique one"), `file` (the source file of
//!   the definition, from its `STT_FILE` symbol, compared whole or by basename).
//! * `force_klp`: symbols converted even though the loader could resolve them.
//! * `keep`: symbols left as ordinary undefined symbols whatever the targets say
//!   (the loader provides them from an object that is not a target).
//! * `patch`: the patch description klp-convert writes (`.init.klp_objects` /
//!   `.init.klp_funcs`, see [`crate::describe`]): each patched object in order,
//!   its functions (`old` in the object is replaced by `new` of the patch; `sympos`
//!   as the kernel's `old_sympos`, default 0 = "the unique one"), its callbacks by
//!   function name, and `replace` (atomic replace).
//!
//! Unknown fields are refused, so a misspelt key does not go unnoticed.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::Error;
use crate::names::{check_object_name, check_symbol_name};

/// Which definition a symbol means.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SymbolChoice {
    /// The object that defines it.
    #[serde(default)]
    pub object: Option<String>,
    /// Its position among the object's symbols of that name (1-based; 0 = unique).
    #[serde(default)]
    pub sympos: Option<u64>,
    /// The source file it comes from.
    #[serde(default)]
    pub file: Option<String>,
}

/// One function of the patch description: `old` in the object is replaced by the
/// patch's `new`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FuncEntry {
    /// The function replaced (`klp_func.old_name`).
    pub old: String,
    /// The replacement, a function defined in the patch object (`klp_func.new_func`).
    pub new: String,
    /// Which of the object's definitions of `old` (`klp_func.old_sympos`): 1-based,
    /// 0 = the name must be unique.
    #[serde(default)]
    pub sympos: u64,
}

/// The callbacks of one object, by function name (each a function defined in the
/// patch object). Functions named `__klp_<kind>_callback_<object>` are found
/// without being listed.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CallbackEntry {
    /// `int pre_patch(struct klp_object *)`.
    #[serde(default)]
    pub pre_patch: Option<String>,
    /// `void post_patch(struct klp_object *)`.
    #[serde(default)]
    pub post_patch: Option<String>,
    /// `void pre_unpatch(struct klp_object *)`.
    #[serde(default)]
    pub pre_unpatch: Option<String>,
    /// `void post_unpatch(struct klp_object *)`.
    #[serde(default)]
    pub post_unpatch: Option<String>,
}

impl CallbackEntry {
    /// The four names in `struct klp_callbacks` order.
    pub fn by_kind(&self) -> [Option<&str>; 4] {
        [
            self.pre_patch.as_deref(),
            self.post_patch.as_deref(),
            self.pre_unpatch.as_deref(),
            self.post_unpatch.as_deref(),
        ]
    }
}

/// One patched object of the patch description.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ObjectEntry {
    /// `vmlinux`, or the module's name.
    pub object: String,
    /// Its functions, in order.
    #[serde(default)]
    pub funcs: Vec<FuncEntry>,
    /// Its callbacks named explicitly.
    #[serde(default)]
    pub callbacks: CallbackEntry,
}

/// The patch description to write.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PatchEntry {
    /// The patched objects, in order.
    pub objects: Vec<ObjectEntry>,
    /// Atomic replace (`klp_patch.replace`), recorded as `.modinfo` `klp_replace=Y`.
    #[serde(default)]
    pub replace: bool,
}

/// The manifest.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Per-symbol choices.
    #[serde(default)]
    pub symbols: BTreeMap<String, SymbolChoice>,
    /// Symbols to convert even when the loader could resolve them.
    #[serde(default)]
    pub force_klp: Vec<String>,
    /// Symbols never to convert.
    #[serde(default)]
    pub keep: Vec<String>,
    /// The patch description to write, if any.
    #[serde(default)]
    pub patch: Option<PatchEntry>,
}

impl Manifest {
    /// Parses and checks a manifest.
    pub fn from_json(text: &str) -> Result<Manifest, Error> {
        let m: Manifest = serde_json::from_str(text).map_err(|e| Error::Manifest {
            reason: e.to_string(),
        })?;
        m.check()?;
        Ok(m)
    }

    /// Checks the names in a manifest built in code.
    pub fn check(&self) -> Result<(), Error> {
        for (name, choice) in &self.symbols {
            if let Some(o) = &choice.object {
                check_object_name(o).map_err(|e| Error::Manifest {
                    reason: format!("symbol '{name}': {e}"),
                })?;
            }
        }
        for name in &self.keep {
            if self.force_klp.contains(name) {
                return Err(Error::Manifest {
                    reason: format!("symbol '{name}' is both in \"keep\" and in \"force_klp\""),
                });
            }
        }
        if let Some(patch) = &self.patch {
            patch.check()?;
        }
        Ok(())
    }

    /// The choice for `name`, if any.
    pub fn choice(&self, name: &str) -> Option<&SymbolChoice> {
        self.symbols.get(name)
    }
}

impl PatchEntry {
    /// Checks what can be checked without the objects: names, duplicates, and that
    /// every object describes something.
    pub fn check(&self) -> Result<(), Error> {
        let bad = |reason: String| Err(Error::Manifest { reason });
        if self.objects.is_empty() {
            return bad(
                "\"patch\" has no objects (the kernel refuses a patch that patches nothing)"
                    .to_string(),
            );
        }
        for (i, o) in self.objects.iter().enumerate() {
            check_object_name(&o.object).map_err(|e| Error::Manifest {
                reason: format!("\"patch\" object {}: {e}", i + 1),
            })?;
            if self.objects[..i].iter().any(|p| p.object == o.object) {
                return bad(format!(
                    "\"patch\" lists object {} twice; give each object once, with all its \
                     functions",
                    o.object
                ));
            }
            for (j, f) in o.funcs.iter().enumerate() {
                for (what, name) in [("old", &f.old), ("new", &f.new)] {
                    check_symbol_name(name).map_err(|e| Error::Manifest {
                        reason: format!(
                            "\"patch\" object {}, function {}: \"{what}\": {e}",
                            o.object,
                            j + 1
                        ),
                    })?;
                }
                // The kernel names a function's sysfs directory "<old>,<n>" with n =
                // sympos, or 1 for 0: two entries with the same directory clash.
                let dir = |s: u64| s.max(1);
                if let Some(g) = o.funcs[..j]
                    .iter()
                    .find(|g| g.old == f.old && dir(g.sympos) == dir(f.sympos))
                {
                    return bad(format!(
                        "\"patch\" object {} replaces '{}' twice (sympos {} and {}, which \
                         both mean definition {}): give each function once",
                        o.object,
                        f.old,
                        g.sympos,
                        f.sympos,
                        dir(f.sympos)
                    ));
                }
            }
            for (kind, name) in CALLBACK_KINDS.iter().zip(o.callbacks.by_kind()) {
                if let Some(name) = name {
                    check_symbol_name(name).map_err(|e| Error::Manifest {
                        reason: format!("\"patch\" object {}, callback \"{kind}\": {e}", o.object),
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// The callback kinds in `struct klp_callbacks` order, as the manifest names them.
pub const CALLBACK_KINDS: [&str; 4] = ["pre_patch", "post_patch", "pre_unpatch", "post_unpatch"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let m = Manifest::from_json(
            r#"{"symbols": {"foo": {"object": "vmlinux", "file": "bar.c"},
                            "baz": {"sympos": 2}},
                "force_klp": ["sym"], "keep": ["printf"]}"#,
        )
        .unwrap();
        assert_eq!(m.choice("foo").unwrap().file.as_deref(), Some("bar.c"));
        assert_eq!(m.choice("baz").unwrap().sympos, Some(2));
        assert_eq!(m.force_klp, ["sym"]);
        assert_eq!(m.keep, ["printf"]);
        assert_eq!(Manifest::from_json("{}").unwrap(), Manifest::default());

        let m = Manifest::from_json(
            r#"{"patch": {"objects": [
                {"object": "vmlinux",
                 "funcs": [{"old": "cmdline_proc_show", "new": "lp_show", "sympos": 0}],
                 "callbacks": {"pre_patch": "my_pre", "post_unpatch": "my_post_unpatch"}},
                {"object": "mymod", "funcs": [{"old": "f", "new": "g"}]}],
              "replace": false}}"#,
        )
        .unwrap();
        let p = m.patch.unwrap();
        assert_eq!(p.objects.len(), 2);
        assert!(!p.replace);
        assert_eq!(
            p.objects[0].callbacks.by_kind(),
            [Some("my_pre"), None, None, Some("my_post_unpatch")]
        );
        assert_eq!(
            p.objects[1].funcs,
            [FuncEntry {
                old: "f".into(),
                new: "g".into(),
                sympos: 0
            }]
        );
    }

    #[test]
    fn refuses_typos_and_bad_names() {
        let e = Manifest::from_json(r#"{"symbol": {}}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = Manifest::from_json(r#"{"symbols": {"f": {"sympose": 1}}}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = Manifest::from_json(r#"{"symbols": {"f": {"object": "a.ko"}}}"#).unwrap_err();
        assert!(e.to_string().contains("'.'"), "{e}");
        let e = Manifest::from_json(r#"{"keep": ["x"], "force_klp": ["x"]}"#).unwrap_err();
        assert!(e.to_string().contains("both"), "{e}");
        assert!(Manifest::from_json("[").is_err());
    }
}
