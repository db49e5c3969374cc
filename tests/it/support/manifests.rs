//! Reading deployment files as data: YAML as JSON, and the settings `keel` itself accepts, so a
//! manifest is checked against the binary's own definition rather than a copied list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::{CommandFactory as _, Parser as _};
use serde_json::Value;

/// The repository's top.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `from` copied into `to`, recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// A tool the test command installs (`scripts/test`), found on PATH or in its tools directory.
pub fn tool(name: &str, under: &str) -> PathBuf {
    let tools = std::env::var_os("KEEL_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap()).join(".cache/keel-tools"));
    let installed = tools.join(under).join(name);
    if installed.exists() {
        installed
    } else {
        PathBuf::from(name)
    }
}

/// Every YAML document in `text`, as JSON, by PyYAML (which the test command's docker-compose
/// brings).
pub fn yaml_documents(text: &[u8]) -> Vec<Value> {
    let yaml_to_json = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(sys.stdin))))",
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
    match serde_json::from_slice(&json.stdout).unwrap() {
        Value::Array(documents) => documents.into_iter().filter(|d| !d.is_null()).collect(),
        other => panic!("{other}"),
    }
}

/// YAML text holding one document, as JSON.
pub fn yaml_json(text: &[u8]) -> Value {
    let mut documents = yaml_documents(text);
    assert_eq!(documents.len(), 1, "one YAML document");
    documents.remove(0)
}

/// `file`, one YAML document, as JSON.
pub fn yaml(file: &Path) -> Value {
    yaml_json(&std::fs::read(file).unwrap())
}

/// The variables keel reads besides its settings: OpenTelemetry's own.
const READ_BY_TELEMETRY: [&str; 1] = [keel_server::telemetry::OTLP_ENDPOINT];

/// The strings of a JSON array (a command, a container's args).
pub fn strings(array: &Value) -> Vec<&str> {
    array
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

/// Every environment variable `keel` reads, from its clap definition and its telemetry's.
pub fn accepted_variables() -> BTreeSet<String> {
    let accepted: BTreeSet<String> = keel::cli::Cli::command()
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .chain(READ_BY_TELEMETRY.map(str::to_owned))
        .collect();
    assert!(accepted.contains("KEEL_DATABASE_URL"), "{accepted:?}");
    accepted
}

/// Whether `keel <args>` with `environment` parses and its settings are valid: what the
/// process would do at start, without starting it. Each variable is passed as the flag clap
/// binds to it, so no process environment is touched.
pub fn starts_with(args: &[&str], environment: &BTreeMap<String, String>) -> Result<(), String> {
    let command = keel::cli::Cli::command();
    let mut argv: Vec<String> = std::iter::once("keel".to_owned())
        .chain(args.iter().map(|a| (*a).to_owned()))
        .collect();
    for (variable, value) in environment {
        if READ_BY_TELEMETRY.contains(&variable.as_str()) {
            continue;
        }
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_env().is_some_and(|e| e == variable.as_str()))
            .ok_or_else(|| format!("keel does not read {variable}"))?;
        argv.push(format!("--{}={value}", arg.get_long().unwrap()));
    }
    let cli = keel::cli::Cli::try_parse_from(&argv).map_err(|e| format!("{argv:?}: {e}"))?;
    cli.validate().map_err(|e| format!("{argv:?}: {e}"))
}
