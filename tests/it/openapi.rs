//! `/openapi.json` of a running keel: a valid OpenAPI 3.1 document (openapi-spec-validator) that
//! says what the services enforce: schemathesis, with every check, finds no 5xx, no request the
//! document allows that keel refuses (nor the reverse), and no response that strays from it.

use crate::support;

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
    // A page token is opaque: only one keel issued is valid, and no schema can say which. The
    // first page (no token) is what a client that has none asks for.
    let config = keel.data_dir.path().join("schemathesis.toml");
    std::fs::write(&config, "[parameters]\n\"query.pageToken\" = \"\"\n").unwrap();
    let run = tool(
        "schemathesis",
        &[
            "--config-file",
            config.to_str().unwrap(),
            "run",
            file.to_str().unwrap(),
            "--url",
            &base,
            "-H",
            &bearer,
            "--checks",
            "all",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "30",
            // One worker: Python 3.11's parser is not thread-safe, and hypothesis parses
            // lambdas to describe them ("AST constructor recursion depth mismatch").
            "--workers",
            "1",
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
    // The Job schema lists keel's own kinds beside those CreateJob makes: exactly the kinds a
    // keel runs.
    let job_types = &parsed["components"]["schemas"]["keel.jobs.v1.Job"]["oneOf"];
    let documented: std::collections::BTreeSet<String> = job_types
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|branch| {
            let kind = &branch["properties"]["type"];
            let listed = kind["enum"].as_array().cloned().unwrap_or_default();
            listed.into_iter().chain(kind.get("const").cloned())
        })
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    let (_, metrics) = keel_testkit::http::get(&format!("http://{}/metrics", keel.admin_addr))
        .await
        .unwrap();
    let run: std::collections::BTreeSet<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("keel_queue_jobs_started_total{kind=\""))
        .filter_map(|l| l.split('"').next().map(str::to_owned))
        .collect();
    assert_eq!(documented, run, "the job kinds documented and run");
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

/// The rules the protos state reach the document: AIP-203 behavior, keel's value rules, the
/// bearer scheme only where a method needs it, and what the deployment's settings fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_states_what_the_services_enforce() {
    let keel = KeelProcess::start(&["--wallet-currency", "CHF"]).await;
    let doc: serde_json::Value = reqwest::get(format!("http://{}/openapi.json", keel.http_addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schemas = &doc["components"]["schemas"];
    let todo = &schemas["keel.todos.v1.Todo"];
    assert_eq!(todo["required"], serde_json::json!(["title"]));
    assert_eq!(todo["properties"]["title"]["maxLength"], 500);
    assert_eq!(todo["properties"]["createTime"]["readOnly"], true);
    assert_eq!(todo["properties"]["name"]["readOnly"], true, "IDENTIFIER");

    let get_product = &doc["paths"]["/v1/products/{product}"]["get"];
    assert_eq!(
        get_product["security"],
        serde_json::json!([{}, {"bearer": []}])
    );
    let uuid = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$";
    assert_eq!(get_product["parameters"][0]["schema"]["pattern"], uuid);
    let delete_product = &doc["paths"]["/v1/products/{product}"]["delete"];
    assert_eq!(
        delete_product["security"],
        serde_json::json!([{"bearer": []}])
    );

    let user = &doc["paths"]["/v1/users/{user}"]["get"]["parameters"][0]["schema"]["pattern"];
    assert!(user.as_str().unwrap().ends_with("|me)$"), "{user}");
    let role = &schemas["keel.identity.v1.User"]["properties"]["role"]["enum"];
    assert!(
        !role
            .as_array()
            .unwrap()
            .contains(&"ROLE_UNSPECIFIED".into())
    );

    let patch = &doc["paths"]["/v1/users/{user}/todos/{todo}"]["patch"];
    let query: Vec<&str> = patch["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["in"] == "query")
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(query.is_empty(), "the mask is the body's keys: {query:?}");

    let top_up = &doc["paths"]["/v1/users/{user}/wallet:topUp"]["post"]["requestBody"];
    let amount = &top_up["content"]["application/json"]["schema"]["properties"]["amount"];
    assert_eq!(amount["properties"]["currencyCode"]["const"], "CHF");
    assert_eq!(amount["properties"]["units"]["type"], "string");
    let place = &doc["paths"]["/v1/users/{user}/orders"]["post"]["parameters"];
    let request_id = place
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "requestId")
        .unwrap();
    assert_eq!(request_id["required"], true);
    let tags = doc["tags"].as_array().unwrap();
    assert!(tags.iter().any(|t| t["name"] == "CatalogService"
        && t["description"].as_str().is_some_and(|d| !d.is_empty())));
}
