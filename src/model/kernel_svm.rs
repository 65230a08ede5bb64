//! `svm-kernel`: placeholder (being written).
#![allow(missing_docs, dead_code, unused_variables)]
use std::path::Path;

use ndarray::{Array2, ArrayView1, ArrayView2};

use super::Learner;
use crate::error::{Error, Result};

pub(crate) const NAME: &str = "svm-kernel";

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KernelSvmParams {
    pub seed: u64,
    pub batch_size: usize,
}

#[derive(Clone, Debug)]
pub struct KernelSvm;

impl KernelSvm {
    pub fn new(_params: KernelSvmParams) -> Result<Self> {
        Err(Error::usage("not yet"))
    }
    pub fn load(_dir: &Path) -> Result<Self> {
        Err(Error::usage("not yet"))
    }
}

impl Learner for KernelSvm {
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
