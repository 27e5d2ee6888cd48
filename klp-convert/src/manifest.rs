//! The optional JSON manifest: choices the patch object itself cannot express.
//!
//! ```json
//! {
//!   "symbols": {
//!     "helper": { "object": "vmlinux", "file": "bar.c" },
//!     "counter": { "sympos": 2 }
//!   },
//!   "force_klp": ["mod_exported_fn"],
//!   "keep": ["printf"]
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
//!
//! Unknown fields are refused, so a misspelt key does not go unnoticed.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::Error;
use crate::names::check_object_name;

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
        Ok(())
    }

    /// The choice for `name`, if any.
    pub fn choice(&self, name: &str) -> Option<&SymbolChoice> {
        self.symbols.get(name)
    }
}

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
