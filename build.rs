//! Links the binaries, tests and benches with a guard against a librdkafka crash: see
//! `native/rdkafka_leader_discovery.c`. The guard replaces librdkafka's KIP-951 leader
//! discovery (`rd_kafka_metadata_update_op`) through the GNU linker's `--wrap`, on Linux;
//! the object file is named on the link line, so it is linked whatever the archive order.

fn main() {
    let src = "native/rdkafka_leader_discovery.c";
    println!("cargo:rerun-if-changed={src}");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let objects = cc::Build::new()
        .file(src)
        .warnings_into_errors(true)
        .compile_intermediates();
    for o in objects {
        println!("cargo:rustc-link-arg={}", o.display());
    }
    println!("cargo:rustc-link-arg=-Wl,--wrap=rd_kafka_metadata_update_op");
}
