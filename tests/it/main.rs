//! The integration tests, as one test binary: one module per suite, the helpers they share
//! in [`common`]. One binary links the library (DataFusion, tract, rdkafka, axum) once,
//! where a binary per suite linked it 26 times: the release test build after an edit is
//! that much shorter. Run one suite with `cargo test --release --test it SUITE::`.

mod common;

mod cnn;
mod distributed;
mod docs;
mod drift;
mod errors;
mod faults;
mod features;
mod folders;
mod fuzz;
mod hostile;
mod kafka;
mod layout;
mod malformed;
mod models_cli;
mod onnx;
mod plot;
mod resume;
mod roundtrip;
mod server;
mod sklearn_reference;
mod stream_table;
mod train;
mod trainer_cli;
mod transforms;
mod ui;
mod wire_compat;
