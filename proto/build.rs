//! Compiles `proto/accord/v1/*.proto` (and the bench echo) with protox (pure Rust, no system `protoc`), then
//! generates prost types, tonic service stubs and pbjson serde impls from one descriptor set.
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/accord/v1/envelope.proto",
        "proto/accord/v1/forms.proto",
        "proto/accord/v1/services.proto",
        "proto/accord/bench/v1/echo.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out.join("accord_descriptor.bin");
    fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;

    tonic_prost_build::configure()
        .build_transport(false)
        // An envelope's bytes are shared, not copied, from the buffer they were decoded
        // from: bodies run to megabytes, and the gateways pass each through several hands.
        .bytes(".accord.v1.Envelope")
        .compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&fs::read(&descriptor_path)?)?
        .build(&[".accord.v1"])?;
    Ok(())
}
