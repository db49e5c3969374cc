//! The deployment is part of the product: docker-compose.yml is valid Compose, runs every
//! registered service replicated behind the mesh's DNS names, and sets only settings `keel`
//! accepts, so a renamed flag cannot silently break it; CI runs the README's test command. (No
//! Docker engine here: checked, not run.)

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::support;

use support::manifests::{accepted_variables, root, starts_with, strings, yaml, yaml_json};

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
    for domain in keel::registry::DOMAINS {
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
        let Some(ports) = service.get("ports") else {
            continue;
        };
        if name == "gateway" {
            continue;
        }
        assert_eq!(
            service["profiles"],
            serde_json::json!(["observability"]),
            "{name} publishes a port"
        );
        for port in ports.as_array().unwrap() {
            let local = port.as_str().is_some_and(|p| p.starts_with("127.0.0.1:"))
                || port["host_ip"] == "127.0.0.1";
            assert!(local, "{name}'s UI is for this host only: {port}");
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
fn compose_sets_only_settings_keel_accepts_and_every_role_starts_from_them() {
    let accepted = accepted_variables();
    let compose = compose();
    let mut checked = 0;
    for (name, service) in compose["services"].as_object().unwrap() {
        if service["image"] != "keel:latest" {
            continue;
        }
        let mut environment = BTreeMap::new();
        for (variable, value) in service["environment"].as_object().unwrap() {
            assert!(
                accepted.contains(variable),
                "{name} sets {variable}, which keel does not read"
            );
            environment.insert(variable.clone(), value.as_str().unwrap().to_owned());
            checked += 1;
        }
        let command = strings(&service["command"]);
        if let Err(refused) = starts_with(&command, &environment) {
            panic!("{name} would not start: {refused}");
        }
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
