//! `mlp`: placeholder (being written).
#![allow(missing_docs, dead_code, unused_variables)]
use std::path::Path;

use ndarray::{Array2, ArrayView1, ArrayView2};

use super::Learner;
use crate::error::{Error, Result};

pub(crate) const NAME: &str = "mlp";

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MlpParams {
    pub seed: u64,
    pub batch_size: usize,
}

#[derive(Clone, Debug)]
pub struct Mlp;

impl Mlp {
    pub fn new(_params: MlpParams) -> Result<Self> {
        Err(Error::usage("not yet"))
    }
    pub fn load(_dir: &Path) -> Result<Self> {
        Err(Error::usage("not yet"))
    }
}

impl Learner for Mlp {
    fn name(&self) -> &'static str {
        NAME
    }
    fn n_features(&self) -> Option<usize> {
        None
    }
    fn partial_fit(&mut self, x: ArrayView2<f32>, y: ArrayView1<u8>) -> Result<f64> {
        Err(Error::usage("not yet"))
    }
    fn predict_proba(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        Err(Error::usage("not yet"))
    }
    fn save(&self, dir: &Path) -> Result<()> {
        Err(Error::usage("not yet"))
    }
}
