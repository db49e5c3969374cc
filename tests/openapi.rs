//! `/openapi.json` of a running keel: a valid OpenAPI 3.1 document (openapi-spec-validator), and
//! an API that schemathesis cannot make answer 5xx or stray from the document.

mod support;

use support::process::{KeelProcess, register_over_rest};

/// Runs `program` in `dir`, so that whatever it caches (schemathesis's `.schemathesis/`) stays
/// out of the checkout.
async fn tool(
    program: &str,
    args: &[&str],
    dir: &std::path::Path,
    install: &str,
) -> std::process::Output {
    tokio::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program} not found ({e}): pip install {install}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_and_schemathesis_finds_nothing() {
    let keel = KeelProcess::start(&["--rate-limit", "off", "--auth-rate-limit", "off"]).await;
    let base = format!("http://{}", keel.http_addr);
    let document = reqwest::get(format!("{base}/openapi.json"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let file = keel.data_dir.path().join("openapi.json");
    std::fs::write(&file, &document).unwrap();

    let validated = tool(
        "openapi-spec-validator",
        &[file.to_str().unwrap()],
        keel.data_dir.path(),
        "openapi-spec-validator",
    )
    .await;
    assert!(
        validated.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );

    // A signed-in admin (the first user), so that schemathesis reaches past authentication.
    let token = register_over_rest(keel.http_addr, "admin@example.com").await;
    let bearer = format!("Authorization: Bearer {token}");
    let run = tool(
        "schemathesis",
        &[
            "run",
            file.to_str().unwrap(),
            "--url",
            &base,
            "-H",
            &bearer,
            "--checks",
            concat!(
                "not_a_server_error,status_code_conformance,",
                "content_type_conformance,response_schema_conformance"
            ),
            "--phases",
            "coverage,fuzzing",
            "--max-examples",
            "30",
            "--workers",
            "2",
            "--seed",
            "20261121",
        ],
        keel.data_dir.path(),
        "schemathesis",
    )
    .await;
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "schemathesis failed:\n{report}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let parsed: serde_json::Value = serde_json::from_slice(&document).unwrap();
    let operations: usize = parsed["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|methods| methods.as_object().unwrap().len())
        .sum();
    assert!(
        report.contains(&format!("{operations} passed")),
        "every one of the {operations} operations was tested:\n{report}"
    );
}
