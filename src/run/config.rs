//! Run configs: TOML files (`configs/*.toml`) naming a model, its hyper-parameters and
//! the run's settings, merged with command-line flags (flags win).
//!
//! ```toml
//! model = "mlp"        # which model
//! epochs = 5           # passes over a dataset source
//! batch_size = 128     # images per stream batch, and the models' mini-batch
//! seed = 0             # augmentation decisions and the model's randomness
//!
//! [mlp]                # hyper-parameters of the model of the same name
//! hidden = [128, 64]
//! lr = 3e-4
//! ```
//!
//! A file may hold tables for several models; only the chosen model's is used. Every
//! key is checked: an unknown top-level key, a table for a model that does not exist,
//! or a hyper-parameter the model does not have is an error naming the file and key.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::{self, Learner};

/// Top-level keys a config may have (besides one table per model).
pub const KEYS: [&str; 11] = [
    "model",
    "classes",
    "image_size",
    "epochs",
    "batch_size",
    "seed",
    "data",
    "sql",
    "features",
    "flip_test",
    "shuffle",
];

/// A run's settings: what a config file says, with flags applied on top.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunConfig {
    /// Model name (one of [`model::MODELS`]).
    pub model: Option<String>,
    /// Passes over a dataset source.
    pub epochs: Option<u64>,
    /// Images per stream batch; also the model's `batch_size` unless its table sets one.
    pub batch_size: Option<usize>,
    /// Run seed.
    pub seed: Option<u64>,
    /// Dataset folder or `synthetic…` (as `--data`).
    pub data: Option<String>,
    /// Preprocessing SQL file, relative to the config file's folder.
    pub sql: Option<PathBuf>,
    /// Test-time flip averaging in the test pass (as `--flip-test`).
    pub flip_test: Option<bool>,
    /// Each epoch of a dataset in a new order (as `--shuffle`).
    pub shuffle: Option<bool>,
    /// The class names, label 0 first (set from the data by `train`, saved with the run).
    pub classes: Option<Vec<String>>,
    /// The side of the run's images in pixels (as `--image-size`; 32 when absent), saved
    /// with the run.
    pub image_size: Option<usize>,
    /// One table of hyper-parameters per model name.
    pub params: toml::Table,
    /// The `[features]` table: a patch extractor fitted on the first images of the
    /// source, its features computed in the streaming SQL (`sql/features.sql`).
    pub features: Option<toml::Table>,
}

impl RunConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses config text; `path` names it in errors and anchors a relative `sql`.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let offset = e.span().map_or(0, |s| s.start) as u64;
            Error::format(path, offset, format!("invalid TOML: {}", e.message()))
        })?;
        let bad = |key: &str, what: String| {
            let offset = text.find(key).unwrap_or(0) as u64;
            Error::format(path, offset, what)
        };
        let mut cfg = RunConfig::default();
        for (key, value) in table {
            let wrong_type = |want: &str| bad(&key, format!("`{key}` must be {want}, not {value}"));
            match key.as_str() {
                "model" => {
                    cfg.model = Some(
                        value
                            .as_str()
                            .ok_or_else(|| wrong_type("a string"))?
                            .to_string(),
                    )
                }
                "classes" => {
                    let names = value
                        .as_array()
                        .and_then(|a| {
                            a.iter()
                                .map(|v| v.as_str().map(String::from))
                                .collect::<Option<Vec<_>>>()
                        })
                        .ok_or_else(|| wrong_type("a list of class names"))?;
                    if !(2..=crate::dataset::MAX_CLASSES).contains(&names.len()) {
                        return Err(bad(
                            "classes",
                            format!(
                                "`classes` has {} names; 2 to {} are supported",
                                names.len(),
                                crate::dataset::MAX_CLASSES
                            ),
                        ));
                    }
                    cfg.classes = Some(names);
                }
                "data" => {
                    cfg.data = Some(
                        value
                            .as_str()
                            .ok_or_else(|| wrong_type("a string"))?
                            .to_string(),
                    )
                }
                "sql" => {
                    let p = PathBuf::from(value.as_str().ok_or_else(|| wrong_type("a string"))?);
                    let base = path.parent().unwrap_or(Path::new(""));
                    cfg.sql = Some(if p.is_relative() { base.join(p) } else { p });
                }
                "flip_test" | "shuffle" => {
                    let b = Some(value.as_bool().ok_or_else(|| wrong_type("true or false"))?);
                    if key == "shuffle" {
                        cfg.shuffle = b;
                    } else {
                        cfg.flip_test = b;
                    }
                }
                "image_size" => {
                    let n = value
                        .as_integer()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| wrong_type("a whole number of pixels"))?;
                    crate::dataset::check_side(n).map_err(|e| bad("image_size", e.to_string()))?;
                    cfg.image_size = Some(n);
                }
                "epochs" | "batch_size" | "seed" => {
                    let n = value
                        .as_integer()
                        .filter(|&n| n >= 0)
                        .ok_or_else(|| wrong_type("a whole number >= 0"))?;
                    match key.as_str() {
                        "epochs" => cfg.epochs = Some(n as u64),
                        "batch_size" => cfg.batch_size = Some(n as usize),
                        _ => cfg.seed = Some(n as u64),
                    }
                }
                "features" => {
                    let t = value
                        .as_table()
                        .ok_or_else(|| wrong_type("a table of extractor parameters"))?;
                    if t.contains_key("side") {
                        return Err(bad("side", SIDE_IS_THE_RUNS.to_string()));
                    }
                    let p: crate::features::PatchParams = toml::Value::Table(t.clone())
                        .try_into()
                        .map_err(|e: toml::de::Error| {
                            bad("features", format!("[features]: {}", e.message().trim()))
                        })?;
                    p.validate().map_err(|e| bad("features", e.to_string()))?;
                    cfg.features = Some(t.clone());
                }
                name if model::registry::find(name).is_ok() => {
                    let t = value
                        .as_table()
                        .ok_or_else(|| wrong_type("a table of hyper-parameters"))?;
                    cfg.params
                        .insert(name.to_string(), toml::Value::Table(t.clone()));
                }
                other => {
                    return Err(bad(
                        other,
                        format!(
                            "unknown key `{other}` (known: {}, or a table named after a model: {})",
                            KEYS.join(", "),
                            model::registry::names().join(", ")
                        ),
                    ))
                }
            }
        }
        if let Some(m) = &cfg.model {
            check_model_name(m).map_err(|e| bad("model", e.to_string()))?;
        }
        Ok(cfg)
    }

    /// Sets hyper-parameter `key` of `model` to `value` (a flag's override).
    pub fn set_param(&mut self, model: &str, key: &str, value: toml::Value) {
        let entry = self
            .params
            .entry(model.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = entry {
            t.insert(key.to_string(), value);
        }
    }

    /// The chosen model's hyper-parameter table, with the run's `seed` and
    /// `batch_size` filled in where the table does not set them.
    pub fn model_table(&self, model: &str) -> toml::Table {
        let mut t = self
            .params
            .get(model)
            .and_then(|v| v.as_table().cloned())
            .unwrap_or_default();
        if let Some(s) = self.seed {
            t.entry("seed").or_insert(toml::Value::Integer(s as i64));
        }
        if let Some(b) = self.batch_size {
            t.entry("batch_size")
                .or_insert(toml::Value::Integer(b as i64));
        }
        t
    }

    /// The config as TOML text (what a run records of how it was made).
    pub fn to_toml(&self, model: &str) -> String {
        let mut t = toml::Table::new();
        t.insert("model".into(), model.into());
        if let Some(e) = self.epochs {
            t.insert("epochs".into(), (e as i64).into());
        }
        if let Some(b) = self.batch_size {
            t.insert("batch_size".into(), (b as i64).into());
        }
        if let Some(s) = self.seed {
            t.insert("seed".into(), (s as i64).into());
        }
        if let Some(d) = &self.data {
            t.insert("data".into(), d.clone().into());
        }
        if let Some(c) = &self.classes {
            t.insert(
                "classes".into(),
                toml::Value::Array(c.iter().map(|n| n.clone().into()).collect()),
            );
        }
        if let Some(s) = self.image_size {
            t.insert("image_size".into(), (s as i64).into());
        }
        if let Some(f) = self.flip_test {
            t.insert("flip_test".into(), f.into());
        }
        if let Some(f) = self.shuffle {
            t.insert("shuffle".into(), f.into());
        }
        if let Some(s) = &self.sql {
            t.insert("sql".into(), s.display().to_string().into());
        }
        t.insert(model.into(), toml::Value::Table(self.model_table(model)));
        if let Some(f) = &self.features {
            t.insert("features".into(), toml::Value::Table(f.clone()));
        }
        toml::to_string_pretty(&t).unwrap_or_default()
    }
}

impl RunConfig {
    /// The class names: the config's `classes`, or CIFAR-10's.
    pub fn class_names(&self) -> Vec<String> {
        self.classes.clone().unwrap_or_else(|| {
            crate::dataset::CLASS_NAMES
                .iter()
                .map(|s| s.to_string())
                .collect()
        })
    }

    /// The side of the run's images: `image_size`, or CIFAR's 32.
    pub fn image_side(&self) -> usize {
        self.image_size.unwrap_or(crate::dataset::SIDE)
    }

    /// The patch extractor's parameters of the `[features]` table, if there is one.
    pub fn patch_params(&self) -> Result<Option<crate::features::PatchParams>> {
        match &self.features {
            None => Ok(None),
            Some(t) if t.contains_key("side") => Err(Error::usage(SIDE_IS_THE_RUNS)),
            Some(t) => {
                toml::Value::Table(t.clone())
                    .try_into()
                    .map(Some)
                    .map_err(|e: toml::de::Error| {
                        Error::usage(format!("[features]: {}", e.message().trim()))
                    })
            }
        }
    }
}

/// Why `side` is not a key of `[features]`.
const SIDE_IS_THE_RUNS: &str = "[features]: `side` is the run's image size: give --image-size \
     (or `image_size` at the top of the config) instead";

/// Checks that `name` is a model cifar-df has (see [`model::registry`]).
pub fn check_model_name(name: &str) -> Result<()> {
    model::registry::find(name).map(|_| ())
}

/// A new, untrained model `name` with the hyper-parameters in `table` (the rest take
/// their defaults). Unknown names and keys, wrong types and bad values are errors.
pub fn build_model(name: &str, table: &toml::Table) -> Result<Box<dyn Learner>> {
    model::registry::find(name)?.build(table)
}

/// Parses a `KEY=VALUE` override: the value as TOML (`0.1`, `[128, 64]`, `true`,
/// `"adam"`), or as a bare string when it is not TOML (`adam`).
pub fn parse_override(s: &str) -> Result<(String, toml::Value)> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| Error::usage(format!("--set {s:?}: expected KEY=VALUE")))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(Error::usage(format!("--set {s:?}: empty key")));
    }
    let v = v.trim();
    let value = format!("v = {v}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()));
    Ok((k.to_string(), value))
}

/// The default model of a config (or `logreg`).
pub fn model_or_default(cfg: &RunConfig) -> String {
    cfg.model
        .clone()
        .unwrap_or_else(|| model::MODELS[0].name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks_keys() {
        let p = Path::new("configs/x.toml");
        let c = RunConfig::parse(
            "model = \"mlp\"\nepochs = 5\nbatch_size = 64\nseed = 3\nsql = \"../sql/train.sql\"\n[mlp]\nhidden = [32]\nlr = 1e-3\n[svm]\nalpha = 1e-4\n",
            p,
        )
        .unwrap();
        assert_eq!(c.model.as_deref(), Some("mlp"));
        assert_eq!(
            (c.epochs, c.batch_size, c.seed),
            (Some(5), Some(64), Some(3))
        );
        assert_eq!(c.sql, Some(PathBuf::from("configs/../sql/train.sql")));
        let t = c.model_table("mlp");
        assert_eq!(t["batch_size"].as_integer(), Some(64));
        assert_eq!(t["seed"].as_integer(), Some(3));
        let m = build_model("mlp", &t).unwrap();
        assert_eq!(m.name(), "mlp");

        for (text, needle) in [
            ("epoch = 5", "unknown key `epoch`"),
            ("model = \"forest\"", "unknown model"),
            ("[forest]\nk = 1", "unknown key `forest`"),
            ("epochs = -1", "whole number"),
            ("epochs = \"5\"", "whole number"),
            ("model = 3", "a string"),
            ("[mlp\n", "invalid TOML"),
        ] {
            let e = RunConfig::parse(text, p).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("x.toml"), "{text}: {e}");
        }
    }

    #[test]
    fn unknown_hyper_parameters_and_bad_values_are_errors() {
        let mut c = RunConfig::parse("[mlp]\nhiden = [3]\n", Path::new("c.toml")).unwrap();
        let e = build_model("mlp", &c.model_table("mlp"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("hiden") && e.contains("[mlp]"), "{e}");
        c.params.clear();
        c.set_param("svm", "loss", toml::Value::String("log".into()));
        let e = build_model("svm", &c.model_table("svm"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("hinge"), "{e}");
        c.set_param("svm", "loss", toml::Value::String("squared_hinge".into()));
        build_model("svm", &c.model_table("svm")).unwrap();
        c.set_param("kmeans", "lr", toml::Value::Float(0.1));
        assert!(build_model("kmeans", &c.model_table("kmeans")).is_err());
        assert!(build_model("forest", &toml::Table::new()).is_err());
        for m in model::registry::names() {
            build_model(m, &toml::Table::new()).unwrap();
        }
    }

    #[test]
    fn overrides_parse_as_toml_or_strings() {
        assert_eq!(parse_override("lr=0.1").unwrap().1, toml::Value::Float(0.1));
        assert_eq!(
            parse_override("hidden=[8, 4]").unwrap().1,
            toml::Value::Array(vec![8.into(), 4.into()])
        );
        assert_eq!(
            parse_override("optimizer=sgd").unwrap().1,
            toml::Value::String("sgd".into())
        );
        assert_eq!(
            parse_override("shuffle = false").unwrap(),
            ("shuffle".into(), toml::Value::Boolean(false))
        );
        assert!(parse_override("lr").is_err());
        assert!(parse_override("=1").is_err());
    }

    #[test]
    fn shipped_configs_load_and_build() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let c = RunConfig::load(&path).unwrap();
            let m = model_or_default(&c);
            build_model(&m, &c.model_table(&m))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Some(sql) = &c.sql {
                assert!(sql.exists(), "{}: sql {}", path.display(), sql.display());
            }
            n += 1;
        }
        assert!(n >= 5, "expected a config per model, found {n}");
    }
}
