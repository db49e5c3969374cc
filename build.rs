//! Compiles `proto/` with protox (no protoc needed) into tonic/prost code, the descriptor set
//! that reflection, the gateway and OpenAPI read, the messages' JSON (build/json.rs), the
//! request messages read from JSON (build/parse.rs) and the gateway's in-process lane of each
//! service (build/lane.rs).

use std::path::{Path, PathBuf};

#[path = "build/json.rs"]
mod json;
#[path = "build/lane.rs"]
mod lane;
#[path = "build/parse.rs"]
mod parse;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new("proto");
    let mut files = Vec::new();
    collect_protos(&root.join("keel"), &mut files)?;
    // google.rpc is imported by nothing but goes into the descriptor set: the gateway renders
    // error details (BadRequest, RetryInfo, ...) from it.
    collect_protos(&root.join("google/rpc"), &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    for file in [
        "google/api/annotations.proto",
        "google/api/http.proto",
        "google/api/field_behavior.proto",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }

    let relative: Vec<PathBuf> = files
        .iter()
        .map(|f| f.strip_prefix(root).map(Path::to_path_buf))
        .collect::<Result<_, _>>()?;
    let mut compiler = protox::Compiler::new([root])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(&relative)?;

    // Encode with the compiler itself: a round trip through prost-types' FileDescriptorSet would
    // drop the `google.api.http` extension on method options.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("keel_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    let set = compiler.file_descriptor_set();
    std::fs::write(out_dir.join("keel_json.rs"), json::generate(&set))?;
    println!("cargo:rerun-if-changed=build/json.rs");
    std::fs::write(out_dir.join("keel_parse.rs"), parse::generate(&set))?;
    println!("cargo:rerun-if-changed=build/parse.rs");
    std::fs::write(out_dir.join("keel_lane.rs"), lane::generate(&set))?;
    println!("cargo:rerun-if-changed=build/lane.rs");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .compile_fds(set)?;
    Ok(())
}

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
