//! The observability assets are part of the product: every Grafana query and alert rule parses
//! as PromQL, every alert says how bad it is and what happened, the dashboards are what their
//! generator writes, and every metric the dashboards, the alerts and the workers' autoscaler name
//! is one a running keel exports — so a renamed metric cannot leave a panel or an alert silently
//! empty.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use promql_parser::parser::{self, Expr};
use promql_parser::util::{ExprVisitor, walk_expr};
use serde_json::Value;

use crate::support;

use support::manifests::{root, yaml};
use support::process::KeelProcess;

fn observability() -> PathBuf {
    root().join("deploy/observability")
}

/// The metric names `query` selects, or why it is not PromQL.
fn metrics_named(query: &str) -> Result<BTreeSet<String>, String> {
    struct Names(BTreeSet<String>);
    impl ExprVisitor for Names {
        type Error = String;
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
            let selector = match expr {
                Expr::VectorSelector(vs) => Some(vs),
                Expr::MatrixSelector(ms) => Some(&ms.vs),
                _ => None,
            };
            if let Some(name) = selector.and_then(|vs| vs.name.clone()) {
                self.0.insert(name);
            }
            Ok(true)
        }
    }
    let expr = parser::parse(query).map_err(|e| format!("{query}: {e}"))?;
    let mut names = Names(BTreeSet::new());
    walk_expr(&mut names, &expr)?;
    Ok(names.0)
}

/// A dashboard query as Prometheus receives it: Grafana's interval variable filled in.
fn as_sent(query: &str) -> String {
    query.replace("$__rate_interval", "5m")
}

/// Every query in the dashboards: panel targets, and the metric of each `label_values`
/// variable.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for entry in std::fs::read_dir(observability().join("grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let dashboard: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let title = format!("{file}: {}", panel["title"]);
                queries.push((title, as_sent(target["expr"].as_str().unwrap())));
            }
        }
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            let query = variable["query"]["query"].as_str().unwrap();
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.split_once(','))
                .map(|(metric, _)| metric.trim().to_owned())
                .unwrap_or_else(|| panic!("{file}: {query} is not label_values(metric, label)"));
            queries.push((format!("{file}: ${}", variable["name"]), inner));
        }
    }
    assert!(queries.len() > 30, "{} queries", queries.len());
    queries
}

/// The rule file's rules.
fn rules() -> Vec<Value> {
    let file = yaml(&observability().join("alerts.yml"));
    file["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap().clone())
        .collect()
}

#[test]
fn the_dashboards_are_what_their_generator_writes() {
    let out = tempfile::tempdir().unwrap();
    let generated = std::process::Command::new("python3")
        .arg(observability().join("grafana/dashboards.py"))
        .arg(out.path())
        .output()
        .unwrap();
    assert!(generated.status.success(), "{generated:?}");
    let committed = observability().join("grafana/dashboards");
    let mut files = 0;
    for entry in std::fs::read_dir(out.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        let expected = std::fs::read_to_string(&path).unwrap();
        let actual = std::fs::read_to_string(committed.join(name)).unwrap_or_default();
        assert!(
            expected == actual,
            "{name:?} differs from what dashboards.py writes: run it"
        );
        files += 1;
    }
    assert_eq!(files, std::fs::read_dir(&committed).unwrap().count());
}

#[test]
fn every_dashboard_query_and_rule_parses_as_promql_and_every_alert_says_what_and_how_bad() {
    for (title, query) in dashboard_queries() {
        if let Err(e) = metrics_named(&query) {
            panic!("{title}: {e}");
        }
    }
    assert!(
        metrics_named("sum(rate(x[5m])) by (").is_err(),
        "the parser refuses"
    );

    let rules = rules();
    let alerts: Vec<&Value> = rules.iter().filter(|r| r.get("alert").is_some()).collect();
    for rule in &rules {
        let expr = rule["expr"].as_str().unwrap();
        if let Err(e) = metrics_named(expr) {
            panic!("{}: {e}", rule["alert"]);
        }
        if let Some(hold) = rule.get("for") {
            keel::config::parse_duration(hold.as_str().unwrap()).unwrap();
        }
    }
    for alert in &alerts {
        let severity = alert["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("page" | "ticket")),
            "{}: severity {severity:?}",
            alert["alert"]
        );
        assert!(
            alert["annotations"]["summary"].is_string(),
            "{}",
            alert["alert"]
        );
    }
    let named: BTreeSet<&str> = alerts
        .iter()
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    for wanted in [
        "KeelHighErrorRatio",
        "KeelHighLatency",
        "KeelRetryBudgetExhausted",
        "KeelEndpointsEjected",
        "KeelQueueOldestJobWaits",
        "KeelDeadJobs",
        "KeelOrdersNotSettling",
        "KeelErrorBudgetBurnFast",
        "KeelErrorBudgetBurnSlow",
    ] {
        assert!(named.contains(wanted), "no {wanted} among {named:?}");
    }
}

/// The names of the series a keel at `admin` exports now.
async fn exported(admin: std::net::SocketAddr) -> BTreeSet<String> {
    let (_, text) = keel_testkit::http::get(&format!("http://{admin}/metrics"))
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The metrics the Kubernetes autoscalers read, through the adapter's rules that serve them.
fn autoscaler_metrics() -> BTreeSet<String> {
    let rules = root().join("deploy/k8s/components/queue-autoscaling/adapter-rules.yaml");
    yaml(&rules)["rules"]["external"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|rule| metrics_named(rule["seriesQuery"].as_str().unwrap()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboards_alerts_and_autoscaler_name_is_one_keel_exports() {
    let rules = rules();
    let recorded: BTreeSet<String> = rules
        .iter()
        .filter_map(|r| r["record"].as_str().map(str::to_owned))
        .collect();
    let mut named = BTreeSet::new();
    for (_, query) in dashboard_queries() {
        named.extend(metrics_named(&query).unwrap());
    }
    for rule in &rules {
        named.extend(metrics_named(rule["expr"].as_str().unwrap()).unwrap());
    }
    named.extend(autoscaler_metrics());
    assert!(named.contains("keel_queue_depth"), "{named:?}");
    for name in named.iter().filter(|n| n.contains(':')) {
        assert!(recorded.contains(name), "{name} is used but not recorded");
    }
    let wanted: BTreeSet<String> = named.difference(&recorded).cloned().collect();

    // A short run: two replicas so that the gateway calls its services over the mesh (with
    // hedged reads on, whose panel needs them), a registration (identity, and a welcome e-mail
    // job the in-process worker runs), a listing.
    let keel = KeelProcess::start(&["--replicas", "2", "--hedged-reads"]).await;
    let http = keel.http_addr;
    support::process::register_over_rest(http, "ada@example.com").await;
    let listed = reqwest::get(format!("http://{http}/v1/products"))
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let exported = exported(keel.admin_addr).await;
        let missing: Vec<&String> = wanted.difference(&exported).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "named by a dashboard, an alert or an autoscaler, but not exported: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prometheus (compose) scrapes every process role: each registered service, the gateway and
/// the worker — a service added to the registry and not here would go unwatched.
#[test]
fn prometheus_scrapes_every_registered_service() {
    let config = yaml(&observability().join("prometheus.yml"));
    let names: BTreeSet<String> = config["scrape_configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|job| job["dns_sd_configs"].as_array())
        .flatten()
        .filter_map(|sd| sd["names"].as_array())
        .flatten()
        .filter_map(|name| name.as_str().map(str::to_owned))
        .collect();
    let roles = keel::registry::DOMAINS
        .iter()
        .map(|d| d.name)
        .chain(["gateway", "worker"]);
    for role in roles {
        assert!(
            names.contains(role),
            "prometheus.yml does not scrape {role}: {names:?}"
        );
    }
}

/// Every alert is unit-tested with promtool (alerts.test.yml): each has a case where it fires and
/// one where it must stay quiet, and every case passes — an expression that sums away the one
/// process at fault, or a series that does not exist until its first change, fails here.
#[test]
fn every_alert_fires_and_stays_quiet_in_promtool_unit_tests() {
    let promtool = |args: &[&str]| {
        let output = std::process::Command::new("promtool")
            .args(args)
            .current_dir(observability())
            .output()
            .expect("promtool (the test command installs Debian's prometheus)");
        let said = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "promtool {args:?}: {said}");
    };
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts.test.yml"]);

    let tests = yaml(&observability().join("alerts.test.yml"));
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|test| test["alert_rule_test"].as_array().unwrap())
        .collect();
    for rule in rules() {
        let Some(alert) = rule["alert"].as_str() else {
            continue;
        };
        let mut fires = false;
        let mut quiet = false;
        for case in cases.iter().filter(|c| c["alertname"] == alert) {
            let expected = case["exp_alerts"].as_array().map_or(0, Vec::len);
            fires |= expected > 0;
            quiet |= expected == 0;
        }
        assert!(fires, "{alert}: no case where it fires");
        assert!(quiet, "{alert}: no case where it stays quiet");
    }
}
