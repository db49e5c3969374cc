//! `/docs`: the API page a person opens, rendered by a real headless Chromium that can reach
//! nothing but loopback; on in development, off with `KEEL_DOCS=off` and in production.

use crate::support;

use std::path::Path;

use support::TestApp;
use support::process::KeelProcess;

/// Chromium with a throw-away profile, every host but loopback unresolvable, its own background
/// traffic (updates, sync) off, and `--virtual-time-budget` so that it returns once the page's
/// scripts have run.
async fn chromium(profile: &Path, args: &[&str], url: &str) -> std::process::Output {
    let program = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|p| which(p))
        .expect("chromium not found: apt-get install chromium (the test command installs it)");
    tokio::process::Command::new(program)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-sync",
            "--disable-background-networking",
            "--disable-component-update",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=15000",
            "--window-size=1280,2400",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run chromium")
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The URLs of the requests that `origin`'s page started, from Chromium's net log.
fn requests_by_page(net_log: &Path, origin: &str) -> Vec<String> {
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(net_log).expect("net log")).expect("net log JSON");
    let start = &log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"];
    log["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| &e["type"] == start && e["params"]["initiator"] == origin)
        .filter_map(|e| e["params"]["url"].as_str().map(str::to_owned))
        .collect()
}

/// Distinct colours in a PNG: 1 for a blank page.
fn colours(png: &Path) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png).expect("screenshot"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).expect("a frame");
    let step = frame.color_type.samples();
    let mut seen = std::collections::HashSet::new();
    for pixel in pixels[..frame.buffer_size()].chunks(step) {
        seen.insert(pixel.to_vec());
    }
    seen.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_offline_renders_every_operation_and_fetches_nothing_from_elsewhere() {
    let keel = KeelProcess::start(&[]).await;
    let origin = format!("http://{}", keel.http_addr);
    let document: serde_json::Value = reqwest::get(format!("{origin}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let operations: Vec<String> = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|methods| methods.as_object().unwrap().values())
        .map(|op| op["operationId"].as_str().unwrap().to_owned())
        .collect();
    assert!(operations.iter().any(|o| o.ends_with("_Register")));
    assert!(operations.iter().any(|o| o.ends_with("_GetProduct")));

    let dir = tempfile::tempdir().unwrap();
    let net_log = dir.path().join("net-log.json");
    let dom = chromium(
        &dir.path().join("profile-dom"),
        &[
            "--dump-dom",
            &format!("--log-net-log={}", net_log.display()),
        ],
        &format!("{origin}/docs"),
    )
    .await;
    let page = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    for operation in &operations {
        assert!(
            page.contains(&format!(">{operation}<")),
            "{operation} is not on the rendered page"
        );
    }
    assert!(page.contains(env!("CARGO_PKG_VERSION")), "the version");

    let requests = requests_by_page(&net_log, &origin);
    assert!(
        requests.contains(&format!("{origin}/openapi.json")),
        "the page read the gateway's document: {requests:?}"
    );
    let elsewhere: Vec<&String> = requests
        .iter()
        .filter(|url| !url.starts_with(&format!("{origin}/")))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "requests off the origin: {elsewhere:?}"
    );

    let shot = dir.path().join("docs.png");
    let screenshot = chromium(
        &dir.path().join("profile-shot"),
        &[&format!("--screenshot={}", shot.display())],
        &format!("{origin}/docs"),
    )
    .await;
    assert!(
        screenshot.status.success(),
        "{}",
        String::from_utf8_lossy(&screenshot.stderr)
    );
    assert!(colours(&shot) > 16, "the screenshot is blank");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_docs_off_removes_the_page() {
    let keel = KeelProcess::start_with_env(&[], &[("KEEL_DOCS", "off")]).await;
    for path in ["/docs", "/docs/", "/docs/swagger-ui-bundle.js"] {
        let response = reqwest::get(format!("http://{}{path}", keel.http_addr))
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    let document = reqwest::get(format!("http://{}/openapi.json", keel.http_addr))
        .await
        .unwrap();
    assert_eq!(document.status(), 200, "the document stays");
}

async fn production(docs: Option<keel::config::Switch>) -> TestApp {
    TestApp::production(|s| s.edge.docs = docs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_serves_the_page_only_when_enabled_explicitly() {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for (docs, expected) in [(None, 404), (Some(keel::config::Switch::On), 308)] {
        let app = production(docs).await;
        let response = client
            .get(format!("http://{}/docs", app.http_addr))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected, "docs {docs:?}");
    }
}
