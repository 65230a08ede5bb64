//! The Python layout's pickles: a writer with the opcodes of the official Python-2 files,
//! and a small, strict pickle VM that reads what numpy writes for a CIFAR batch dict
//! (protocols 0–5), every error naming the file and byte offset.

mod read;
mod write;

pub(super) use read::*;
pub(super) use write::*;
