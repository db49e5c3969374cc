//! benches/ghz works on the first try: every config uses only options ghz documents, calls a
//! method keel has, and sends data that decodes into that method's request.

use std::collections::BTreeSet;
use std::path::Path;

use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::Value;

/// The options of a ghz config file, as https://ghz.sh/docs/options documents them (a config
/// file takes the command line's long names).
const GHZ_OPTIONS: &[&str] = &[
    "proto",
    "protoset",
    "call",
    "cacert",
    "cert",
    "key",
    "cname",
    "skipTLS",
    "insecure",
    "authority",
    "async",
    "rps",
    "load-schedule",
    "load-start",
    "load-end",
    "load-step",
    "load-step-duration",
    "load-max-duration",
    "concurrency",
    "concurrency-schedule",
    "concurrency-start",
    "concurrency-end",
    "concurrency-step",
    "concurrency-step-duration",
    "concurrency-max-duration",
    "total",
    "timeout",
    "duration",
    "max-duration",
    "duration-stop",
    "data",
    "data-file",
    "binary",
    "binary-file",
    "metadata",
    "metadata-file",
    "reflect-metadata",
    "stream-interval",
    "stream-call-duration",
    "stream-call-count",
    "stream-dynamic-messages",
    "output",
    "format",
    "skipFirst",
    "connections",
    "connect-timeout",
    "keepalive",
    "name",
    "tags",
    "cpus",
    "import-paths",
    "count-errors",
    "lb-strategy",
    "enable-compression",
    "host",
];

/// `text` with ghz's template actions replaced by values of the kind they produce.
fn rendered(text: &str) -> String {
    text.replace("{{newUUID}}", "0190c6a2-7d8e-7c1b-9f3e-2a4b6c8d0e1f")
        .replace("{{.RequestNumber}}", "1")
}

fn configs() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/ghz");
    let mut configs: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let config = serde_json::from_str(&rendered(&text))
                .unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
            (name, config)
        })
        .collect();
    configs.sort_by(|a, b| a.0.cmp(&b.0));
    configs
}

/// What is wrong with `config`, or the method it calls.
fn check(config: &Value, pool: &DescriptorPool) -> Result<String, String> {
    for option in config.as_object().ok_or("not an object")?.keys() {
        if !GHZ_OPTIONS.contains(&option.as_str()) {
            return Err(format!("ghz has no option {option:?}"));
        }
    }
    let call = config["call"].as_str().ok_or("no call")?;
    let (service, method) = call
        .rsplit_once('.')
        .ok_or("call is not package.Service.Method")?;
    let method = pool
        .get_service_by_name(service)
        .and_then(|s| s.methods().find(|m| m.name() == method))
        .ok_or(format!("keel has no method {call}"))?;
    let data = serde_json::to_string(&config["data"]).unwrap();
    let mut deserializer = serde_json::Deserializer::from_str(&data);
    DynamicMessage::deserialize(method.input(), &mut deserializer)
        .map_err(|e| format!("data is not a {}: {e}", method.input().name()))?;
    if config["insecure"] != true {
        return Err("keel's default port is plaintext: insecure must be true".into());
    }
    Ok(method.name().to_owned())
}

fn pool() -> DescriptorPool {
    DescriptorPool::decode(keel::proto::FILE_DESCRIPTOR_SET).unwrap()
}

#[test]
fn every_ghz_config_is_one_ghz_reads_calling_a_method_keel_has_with_data_it_decodes() {
    let pool = pool();
    let calls: BTreeSet<String> = configs()
        .iter()
        .map(|(name, config)| check(config, &pool).unwrap_or_else(|e| panic!("{name}: {e}")))
        .collect();
    let expected = [
        "CreateTodo",
        "GetProduct",
        "GetUser",
        "ListProducts",
        "PlaceOrder",
    ];
    assert_eq!(calls, expected.iter().map(|c| (*c).to_owned()).collect());
}

#[test]
fn a_config_with_a_wrong_option_call_or_field_is_caught() {
    let pool = pool();
    let (_, good) = configs()
        .into_iter()
        .find(|(name, _)| name == "get-user.json")
        .unwrap();
    let broken = |change: &dyn Fn(&mut Value)| {
        let mut config = good.clone();
        change(&mut config);
        check(&config, &pool).unwrap_err()
    };
    let error = broken(&|c| c["concurency"] = 5.into());
    assert!(error.contains("concurency"), "{error}");
    let error = broken(&|c| c["call"] = "keel.identity.v1.IdentityService.GetUsr".into());
    assert!(error.contains("GetUsr"), "{error}");
    let error = broken(&|c| c["data"] = serde_json::json!({"nmae": "users/me"}));
    assert!(error.contains("GetUserRequest"), "{error}");
}
