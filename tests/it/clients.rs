//! Clients in other languages, generated from `proto/` with their own toolchains, against a
//! running keel: Python (grpcio-tools) and Node (buf with protoc-gen-es, Connect) each go from
//! registration to a CONFIRMED order and read a refusal's field violations; both stop working
//! when a field they use is renamed, because they use generated code. `buf curl` calls through
//! reflection; `buf breaking` refuses an incompatible change.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support;

use support::manifests::{copy_dir, root, tool};
use support::process::KeelProcess;

/// A copy of the repository's protobuf workspace (buf.yaml and proto/), changed by `edit`.
fn proto_tree(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let tree = tempfile::tempdir().unwrap();
    std::fs::copy(root().join("buf.yaml"), tree.path().join("buf.yaml")).unwrap();
    copy_dir(&root().join("proto"), &tree.path().join("proto"));
    edit(tree.path());
    tree
}

/// `Product.title` renamed `headline` (same number) in the tree at `tree`.
fn rename_product_title(tree: &Path) {
    let file = tree.join("proto/keel/catalog/v1/catalog.proto");
    let text = std::fs::read_to_string(&file).unwrap();
    let renamed = text.replacen("  string title = 2 [", "  string headline = 2 [", 1);
    assert_ne!(text, renamed);
    std::fs::write(file, renamed).unwrap();
}

fn proto_files(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
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

fn printed(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The Python client's run against `keel`, its code generated from the workspace at `tree`.
async fn python_client(tree: &Path, keel: &KeelProcess) -> Output {
    let proto = tree.join("proto");
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
        printed(&output)
    );
    tokio::process::Command::new("python3")
        .arg(root().join("tests/python/order_flow.py"))
        .arg(generated.path())
        .arg(keel.grpc_addr().to_string())
        .output()
        .await
        .expect("run python3")
}

/// The Node client, its code generated from the workspace at `tree` with buf and
/// protoc-gen-es and compiled by tsc: the directory to run it in, or what tsc said.
fn node_client(tree: &Path) -> Result<tempfile::TempDir, String> {
    let dir = tempfile::tempdir().unwrap();
    for file in [
        "order_flow.ts",
        "tsconfig.json",
        "buf.gen.yaml",
        "package.json",
    ] {
        std::fs::copy(root().join("tests/node").join(file), dir.path().join(file)).unwrap();
    }
    let modules: PathBuf = tool("tsc", "npm/node_modules/.bin")
        .canonicalize()
        .expect("tsc (the test command installs it)")
        .ancestors()
        .find(|p| p.ends_with("node_modules"))
        .expect("tsc inside node_modules")
        .to_owned();
    std::os::unix::fs::symlink(&modules, dir.path().join("node_modules")).unwrap();
    let bin = modules.join(".bin");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let generated = std::process::Command::new(bin.join("buf"))
        .env("PATH", &path)
        .current_dir(dir.path())
        .arg("generate")
        .arg(tree)
        .args(["--template", "buf.gen.yaml"])
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "buf generate: {}",
        printed(&generated)
    );
    let compiled = std::process::Command::new(bin.join("tsc"))
        .current_dir(dir.path())
        .args(["-p", "."])
        .output()
        .unwrap();
    if compiled.status.success() {
        Ok(dir)
    } else {
        Err(printed(&compiled))
    }
}

async fn run_node_client(dir: &Path, keel: &KeelProcess) -> Output {
    tokio::process::Command::new("node")
        .current_dir(dir)
        .arg("order_flow.js")
        .arg(keel.grpc_addr().to_string())
        .output()
        .await
        .expect("run node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_generated_with_grpcio_tools_orders_and_reads_field_violations() {
    let tree = proto_tree(|_| {});
    let keel = KeelProcess::start(&[]).await;
    let output = python_client(tree.path(), &keel).await;
    assert!(
        output.status.success(),
        "python client failed:\n{}",
        printed(&output)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("python client: ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_fails_when_a_field_it_uses_is_renamed() {
    let tree = proto_tree(rename_product_title);
    let keel = KeelProcess::start(&[]).await;
    let output = python_client(tree.path(), &keel).await;
    assert!(!output.status.success());
    let said = printed(&output);
    assert!(said.contains("title"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_client_generated_with_buf_and_protoc_gen_es_orders_and_reads_field_violations() {
    let tree = proto_tree(|_| {});
    let client = node_client(tree.path()).unwrap_or_else(|e| panic!("tsc: {e}"));
    let keel = KeelProcess::start(&[]).await;
    let output = run_node_client(client.path(), &keel).await;
    assert!(
        output.status.success(),
        "node client failed:\n{}",
        printed(&output)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("node client: ok"));
}

#[test]
fn the_node_client_does_not_compile_when_a_field_it_uses_is_renamed() {
    let tree = proto_tree(rename_product_title);
    let refused = node_client(tree.path()).expect_err("tsc refuses the client");
    assert!(refused.contains("'title' does not exist"), "{refused}");
}

/// `buf curl` of keel at `addr` (gRPC over h2c, schema from reflection) with `args`.
async fn buf_curl(args: &[&str]) -> Output {
    tokio::process::Command::new(tool("buf", "npm/node_modules/.bin"))
        .args(["curl", "--protocol", "grpc", "--http2-prior-knowledge"])
        .args(args)
        .output()
        .await
        .expect("buf (the test command installs it)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buf_curl_lists_services_and_methods_and_calls_through_reflection() {
    let keel = KeelProcess::start(&[]).await;
    let base = format!("http://{}", keel.grpc_addr());
    let services = buf_curl(&["--list-services", &base]).await;
    assert!(services.status.success(), "{}", printed(&services));
    let services = String::from_utf8_lossy(&services.stdout);
    for name in keel::domain::grpc_names(keel::registry::DOMAINS) {
        assert!(
            services.lines().any(|l| l == name),
            "{name} not in {services}"
        );
    }
    let methods = buf_curl(&["--list-methods", &base]).await;
    assert!(methods.status.success(), "{}", printed(&methods));
    let methods = String::from_utf8_lossy(&methods.stdout);
    for method in [
        "keel.catalog.v1.CatalogService/GetProduct",
        "keel.orders.v1.OrderService/WatchOrder",
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ] {
        assert!(
            methods.lines().any(|l| l == method),
            "{method} not in {methods}"
        );
    }

    let registered = buf_curl(&[
        "-d",
        r#"{"email": "curl@example.com", "password": "correct horse battery"}"#,
        &format!("{base}/keel.identity.v1.IdentityService/Register"),
    ])
    .await;
    assert!(registered.status.success(), "{}", printed(&registered));
    let body: serde_json::Value = serde_json::from_slice(&registered.stdout).unwrap();
    assert_eq!(body["user"]["email"], "curl@example.com");

    let refused = buf_curl(&[
        "-d",
        r#"{"email": "not an email", "password": "correct horse battery"}"#,
        &format!("{base}/keel.identity.v1.IdentityService/Register"),
    ])
    .await;
    assert!(!refused.status.success());
    let said = printed(&refused);
    assert!(said.contains("invalid_argument"), "{said}");
}

#[test]
fn buf_breaking_refuses_a_renamed_field_and_accepts_the_proto_as_it_is() {
    let breaking = |tree: &Path| {
        std::process::Command::new(tool("buf", "npm/node_modules/.bin"))
            .current_dir(tree)
            .args(["breaking", "--against"])
            .arg(root())
            .output()
            .expect("buf (the test command installs it)")
    };
    let same = proto_tree(|_| {});
    let unchanged = breaking(same.path());
    assert!(unchanged.status.success(), "{}", printed(&unchanged));

    let renamed = proto_tree(rename_product_title);
    let refused = breaking(renamed.path());
    assert!(!refused.status.success());
    assert!(
        printed(&refused).contains(r#"changed name from "title" to "headline""#),
        "{}",
        printed(&refused)
    );
}
