//! The deployment is part of the product: docker-compose.yml is valid Compose, runs every
//! registered service replicated behind the mesh's DNS names, and sets only settings `keel`
//! accepts, so a renamed flag cannot silently break it; CI runs the README's test command. (No
//! Docker engine here: checked, not run.)

use std::collections::BTreeSet;
use std::path::Path;

use clap::{CommandFactory as _, Parser as _};
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `docker-compose config` of `file` with the example secrets: the file as Compose resolves it
/// (anchors merged, variables filled in), or its complaint.
fn compose_config(file: &Path) -> Result<Value, String> {
    let output = std::process::Command::new("docker-compose")
        .arg("--project-directory")
        .arg(root())
        .arg("--env-file")
        .arg(root().join("deploy/example.env"))
        .arg("-f")
        .arg(file)
        .arg("config")
        .output()
        .expect("docker-compose (the test command installs it)");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(yaml_json(&output.stdout))
}

/// `file`, a YAML document, as JSON.
fn yaml(file: &Path) -> Value {
    yaml_json(&std::fs::read(file).unwrap())
}

/// YAML text as JSON, by PyYAML (which the test command's docker-compose brings).
fn yaml_json(text: &[u8]) -> Value {
    let yaml_to_json = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with PyYAML");
    use std::io::Write as _;
    yaml_to_json
        .stdin
        .as_ref()
        .unwrap()
        .write_all(text)
        .unwrap();
    let json = yaml_to_json.wait_with_output().unwrap();
    assert!(json.status.success(), "{json:?}");
    serde_json::from_slice(&json.stdout).unwrap()
}

fn compose() -> Value {
    compose_config(&root().join("docker-compose.yml")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_compose_file_is_valid_compose_and_a_broken_one_is_refused() {
    let services = &compose()["services"];
    assert!(services.is_object());

    let broken = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let file = broken.path().join("docker-compose.yml");
    std::fs::write(&file, text.replace("replicas: 3", "replica: 3")).unwrap();
    let refused = compose_config(&file).expect_err("an unknown key is refused");
    assert!(refused.contains("replica"), "{refused}");
}

#[test]
fn every_service_runs_replicated_and_is_found_by_its_dns_name() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    for domain in keel::domain::DOMAINS {
        let service = &services
            .get(domain.name)
            .unwrap_or_else(|| panic!("no compose service for {}", domain.name));
        assert_eq!(
            service["command"],
            serde_json::json!(["serve", domain.name]),
            "{}",
            domain.name
        );
        assert_eq!(service["deploy"]["replicas"], 3, "{}", domain.name);
        assert_eq!(service["read_only"], true, "{}", domain.name);
        let variable = format!("KEEL_{}_ENDPOINTS", domain.name.to_uppercase());
        let expected = format!("dns:///{}:50051", domain.name);
        for (name, other) in services {
            if other["image"] == "keel:latest" && name != "migrate" {
                assert_eq!(
                    other["environment"][&variable], expected,
                    "{name} finds {} by its compose name",
                    domain.name
                );
            }
        }
    }
    assert_eq!(
        services["gateway"]["command"],
        serde_json::json!(["serve", "gateway"])
    );
    assert_eq!(
        services["gateway"]["ports"],
        serde_json::json!([{"published": 8080, "target": 8080}]),
        "only the gateway is published"
    );
    for (name, service) in services {
        if name != "gateway" {
            assert!(service.get("ports").is_none(), "{name} publishes a port");
        }
    }
    assert_eq!(services["worker"]["command"], serde_json::json!(["worker"]));
    assert_eq!(
        services["migrate"]["command"],
        serde_json::json!(["migrate"])
    );
    for (name, service) in services {
        if service["image"] == "keel:latest" && name != "migrate" {
            assert_eq!(
                service["depends_on"]["migrate"]["condition"], "service_completed_successfully",
                "{name} starts after the migration"
            );
        }
    }
}

#[test]
fn compose_sets_only_settings_keel_accepts_and_commands_keel_parses() {
    let accepted: BTreeSet<String> = keel::config::Cli::command()
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect();
    assert!(accepted.contains("KEEL_DATABASE_URL"), "{accepted:?}");

    let compose = compose();
    let mut checked = 0;
    for (name, service) in compose["services"].as_object().unwrap() {
        if service["image"] != "keel:latest" {
            continue;
        }
        for variable in service["environment"].as_object().unwrap().keys() {
            assert!(
                accepted.contains(variable),
                "{name} sets {variable}, which keel does not read"
            );
            checked += 1;
        }
        let command: Vec<&str> = service["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let parsed = keel::config::Cli::try_parse_from(std::iter::once("keel").chain(command));
        assert!(parsed.is_ok(), "{name}: {:?}", parsed.err());
    }
    assert!(checked > 50, "{checked} settings checked");
}

#[test]
fn ci_runs_the_readme_test_command_with_the_cargo_cache() {
    let workflow = yaml(&root().join(".github/workflows/ci.yml"));
    let job = &workflow["jobs"]["test"];
    assert!(job["timeout-minutes"].as_u64().unwrap() <= 90);
    let steps = job["steps"].as_array().unwrap();
    let runs: Vec<&str> = steps.iter().filter_map(|s| s["run"].as_str()).collect();
    assert_eq!(
        runs,
        ["./scripts/test"],
        "the command the README gives, alone"
    );
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.contains("\n./scripts/test\n"),
        "the README gives that command"
    );
    assert!(
        steps.iter().any(|s| s["uses"]
            .as_str()
            .is_some_and(|u| u.starts_with("Swatinem/rust-cache@"))),
        "cargo's cache"
    );
}
