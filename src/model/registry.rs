//! The table of models: one entry per model, read by everything that goes from a model's
//! name to the model.
//!
//! A model type implements [`Model`] (its name, one line of help, its hyper-parameters'
//! type, how to build it and how to load it) and takes one line of
//! [`MODELS`](super::MODELS) (`ModelKind::of::<MyModel>()`). From that entry come the
//! name check of `--model` and of a config's `model = …`, the builder, the hyper-parameters
//! with their defaults filled in (what a resumed run compares), which of them a resumed run
//! does not compare, `--lr`'s key, the CLI's help and [`load`](super::load). So adding a
//! model touches two files: the model's own and `model/mod.rs`.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::Learner;
use crate::error::{Error, Result};

/// What the registry needs to know of a model type.
pub trait Model: Learner + Sized + 'static {
    /// Its name: `--model NAME`, the `[NAME]` table of a config and the `"model"` field of
    /// its checkpoint's metadata.
    const NAME: &'static str;
    /// One line for the CLI's help.
    const ABOUT: &'static str;
    /// The hyper-parameter `--lr` sets.
    const LR_KEY: &'static str = "lr";
    /// Hyper-parameters a resumed run does not compare with the saved run's: they come
    /// from the data or from flags checked on their own (the classes; the cnn's image side
    /// and precision).
    const NOT_COMPARED_ON_RESUME: &'static [&'static str] = &["classes"];
    /// Its hyper-parameters: a TOML table reads into them (every key has a default,
    /// unknown keys are refused) and they write back out, defaults filled in.
    type Params: DeserializeOwned + Serialize;
    /// A new, untrained model; bad values are errors.
    fn build(params: Self::Params) -> Result<Self>;
    /// A model saved by [`Learner::save`]; errors name the file at fault.
    fn open(dir: &Path) -> Result<Self>;
}

/// One line of the table: a model type seen through its name.
pub struct ModelKind {
    /// [`Model::NAME`].
    pub name: &'static str,
    /// [`Model::ABOUT`].
    pub about: &'static str,
    /// [`Model::LR_KEY`].
    pub lr_key: &'static str,
    /// [`Model::NOT_COMPARED_ON_RESUME`].
    pub not_compared_on_resume: &'static [&'static str],
    build: fn(&toml::Table) -> Result<Box<dyn Learner>>,
    effective_params: fn(&toml::Table) -> Result<serde_json::Value>,
    load: fn(&Path) -> Result<Box<dyn Learner>>,
}

impl ModelKind {
    /// The entry of model type `M`.
    pub const fn of<M: Model>() -> Self {
        ModelKind {
            name: M::NAME,
            about: M::ABOUT,
            lr_key: M::LR_KEY,
            not_compared_on_resume: M::NOT_COMPARED_ON_RESUME,
            build: build::<M>,
            effective_params: effective_params::<M>,
            load: load::<M>,
        }
    }

    /// A new, untrained model with the hyper-parameters in `table` (the rest take their
    /// defaults). Unknown keys, wrong types and bad values are errors naming `[name]`.
    pub fn build(&self, table: &toml::Table) -> Result<Box<dyn Learner>> {
        (self.build)(table)
    }

    /// The hyper-parameters `table` gives, every default filled in, as JSON: two tables
    /// that mean the same model compare equal.
    pub fn effective_params(&self, table: &toml::Table) -> Result<serde_json::Value> {
        (self.effective_params)(table)
    }

    /// The model saved in `dir`.
    pub fn load(&self, dir: &Path) -> Result<Box<dyn Learner>> {
        (self.load)(dir)
    }
}

/// The entry of model `name`, or a usage error listing the known ones.
pub fn find(name: &str) -> Result<&'static ModelKind> {
    super::MODELS
        .iter()
        .find(|k| k.name == name)
        .ok_or_else(|| {
            Error::usage(format!(
                "unknown model {name:?} (known: {})",
                names().join(", ")
            ))
        })
}

/// Every model's name, in the table's order (the first is the default).
pub fn names() -> Vec<&'static str> {
    super::MODELS.iter().map(|k| k.name).collect()
}

/// The CLI's help of `--model`: each model's name and line.
pub fn help() -> String {
    let mut s = format!("Model [default: {}]:", super::MODELS[0].name);
    for k in super::MODELS {
        s.push_str(&format!("\n  {:<11} {}", k.name, k.about));
    }
    s
}

/// `table` read into model `M`'s hyper-parameters.
fn params<M: Model>(table: &toml::Table) -> Result<M::Params> {
    toml::Value::Table(table.clone())
        .try_into()
        .map_err(|e: toml::de::Error| {
            Error::usage(format!(
                "[{}] hyper-parameters: {}",
                M::NAME,
                e.message().trim()
            ))
        })
}

fn build<M: Model>(table: &toml::Table) -> Result<Box<dyn Learner>> {
    Ok(Box::new(M::build(params::<M>(table)?)?))
}

fn effective_params<M: Model>(table: &toml::Table) -> Result<serde_json::Value> {
    serde_json::to_value(params::<M>(table)?)
        .map_err(|e| Error::usage(format!("[{}] hyper-parameters: {e}", M::NAME)))
}

fn load<M: Model>(dir: &Path) -> Result<Box<dyn Learner>> {
    Ok(Box::new(M::open(dir)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_builds_names_itself_and_is_found_by_its_name() {
        let names = names();
        for kind in crate::model::MODELS {
            assert_eq!(find(kind.name).unwrap().name, kind.name);
            // The name the model gives itself is the one it is registered under, so
            // a checkpoint it saves loads through the same entry.
            let m = kind.build(&toml::Table::new()).unwrap();
            assert_eq!(m.name(), kind.name);
            assert_eq!(names.iter().filter(|n| **n == kind.name).count(), 1);
            assert!(help().contains(kind.about), "{}", kind.name);
        }
        let e = find("forest").err().unwrap().to_string();
        assert!(
            e.contains("unknown model \"forest\"") && e.contains("logreg"),
            "{e}"
        );
    }
}
