//! Clients in other languages, generated from `proto/` with their own toolchains, against a
//! running keel.

mod support;

use support::process::KeelProcess;

fn proto_files(root: &std::path::Path) -> Vec<String> {
    fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "proto") {
                out.push(path.display().to_string());
            }
        }
    }
    let mut files = Vec::new();
    walk(root, &mut files);
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_generated_with_grpcio_tools_registers_logs_in_and_reads_me() {
    let proto = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let generated = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg(format!("--python_out={}", generated.path().display()))
        .arg(format!("--grpc_python_out={}", generated.path().display()))
        .args(proto_files(&proto))
        .output()
        .await
        .expect("run python3");
    assert!(
        output.status.success(),
        "grpc_tools.protoc failed (pip install grpcio-tools): {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let keel = KeelProcess::start(&[]).await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/identity_client.py");
    let output = tokio::process::Command::new("python3")
        .arg(script)
        .arg(generated.path())
        .arg(keel.grpc_addr().to_string())
        .output()
        .await
        .expect("run python3");
    assert!(
        output.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("python client: ok"));
}
