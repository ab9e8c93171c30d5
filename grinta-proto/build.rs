//! Generates the `grinta.v1` wire types from `proto/grinta/v1/*.proto`.
//!
//! The schema is compiled by protox, a protobuf compiler written in Rust, so building grinta needs no
//! system `protoc`. The generated code lands in `OUT_DIR` and is never edited by hand.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("..").join("proto");
    let schema_dir = proto_root.join("grinta").join("v1");

    let mut files: Vec<PathBuf> = std::fs::read_dir(&schema_dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    files.sort();

    println!("cargo:rerun-if-changed={}", schema_dir.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let descriptors = protox::compile(&files, [&proto_root])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
