//! The generated readers build the message the dynamic deserializer builds, or give up: for
//! every message of keel's packages filled at random, written as JSON, then bent (keys renamed,
//! values swapped for hostile ones, unknown keys added); and the hot routes' requests are built
//! by them.

use prost::Message as _;
use prost_reflect::{DeserializeOptions, DynamicMessage, MessageDescriptor};
use serde_json::json;

use super::super::tests::{Rng, filled, pool};
use super::*;

/// Values that are not what a field expects, or are only just: wrong types, numbers at and past
/// their ranges, as strings Rust's `parse` takes or refuses, fractions, exponents, names.
fn hostile(rng: &mut Rng) -> Json {
    rng.pick(&[
        Json::Null,
        json!(true),
        json!(0),
        json!(-1),
        json!(1.5),
        json!(20.0),
        json!(1e2),
        json!(2_147_483_648_i64),
        json!(-2_147_483_649_i64),
        json!(4_294_967_296_i64),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(""),
        json!("x"),
        json!("007"),
        json!("+5"),
        json!(" 5"),
        json!("-0"),
        json!("1e3"),
        json!("2147483648"),
        json!("18446744073709551616"),
        json!("-9223372036854775809"),
        json!("STATE_UNSPECIFIED"),
        json!("CONFIRMED"),
        json!("ADMIN"),
        json!("title,priceUnits"),
        json!("a.bC,,d"),
        json!("snake_case"),
        json!("Title"),
        json!([]),
        json!(["a", 1]),
        json!([null]),
        json!({}),
        json!({"unknown": 1}),
    ])
}

/// `object` bent at random: a key under its other name (or both, the other with a hostile
/// value), a value made hostile, an unknown key added, nested objects bent too.
fn bend(descriptor: &MessageDescriptor, object: &mut JsonObject, rng: &mut Rng) {
    let keys: Vec<String> = object.keys().cloned().collect();
    for key in keys {
        let Some(field) = descriptor.get_field_by_json_name(&key) else {
            continue;
        };
        match rng.below(8) {
            0 => {
                let value = object.remove(&key).unwrap();
                object.insert(field.name().to_owned(), value);
            }
            1 => {
                object.insert(field.name().to_owned(), hostile(rng));
            }
            2 => {
                object.insert(key, hostile(rng));
            }
            3 => {
                if let (Some(Json::Object(nested)), prost_reflect::Kind::Message(inner)) =
                    (object.get_mut(&key), field.kind())
                {
                    bend(&inner, nested, rng);
                }
            }
            _ => {}
        }
    }
    if rng.below(10) == 0 {
        object.insert("noSuchField".into(), json!(1));
    }
}

/// The message the dynamic deserializer builds from `object`, as the gateway calls it.
fn dynamic(descriptor: &MessageDescriptor, object: &JsonObject) -> Option<DynamicMessage> {
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let value = Json::Object(object.clone());
    DynamicMessage::deserialize_with_options(descriptor.clone(), &value, &options).ok()
}

/// `message` encoded, as the dynamic serializer writes it (defaults omitted, fields by number).
fn as_json(descriptor: &MessageDescriptor, encoded: &[u8]) -> String {
    let message = DynamicMessage::decode(descriptor.clone(), encoded).unwrap();
    String::from_utf8(keel_gateway::transcode::to_json(&message, None).unwrap()).unwrap()
}

/// Fails unless the generated reader gives up on `object` or builds what the dynamic
/// deserializer builds from it; whether it built.
fn agree(descriptor: &MessageDescriptor, parse: Parse, object: &JsonObject) -> bool {
    let Some(built) = parse(object) else {
        return false;
    };
    let name = descriptor.full_name();
    let Some(expected) = dynamic(descriptor, object) else {
        panic!("{name}: generated code built {object:?}, which the dynamic deserializer refuses");
    };
    assert_eq!(
        as_json(descriptor, &built.into_bytes()),
        as_json(descriptor, &expected.encode_to_vec()),
        "{name} from {object:?}"
    );
    true
}

#[test]
fn every_message_is_built_as_the_dynamic_deserializer_builds_it_or_not_at_all() {
    let pool = pool();
    let mut rng = Rng(0x0dd_ba11_5eed_1e55);
    let (mut built, mut cases) = (0, 0);
    for descriptor in pool.all_messages() {
        let Some(parse) = parser(descriptor.full_name()) else {
            continue;
        };
        for _ in 0..300 {
            let message = filled(descriptor.clone(), &mut rng, 0);
            let Ok(json) = keel_gateway::transcode::to_json(&message, None) else {
                continue;
            };
            let Ok(Json::Object(mut object)) = serde_json::from_slice(&json) else {
                panic!("{}: not an object", descriptor.full_name());
            };
            if rng.below(3) > 0 {
                bend(&descriptor, &mut object, &mut rng);
            }
            cases += 1;
            built += usize::from(agree(&descriptor, parse, &object));
        }
    }
    // Most filled messages hold a timestamp, bytes or a field mask somewhere, which generated
    // code leaves to the dynamic deserializer; the rest must be built.
    assert!(
        built * 5 > cases,
        "generated code built only {built} of {cases} requests"
    );
}

#[test]
fn every_keel_message_has_a_generated_reader() {
    let missing: Vec<String> = pool()
        .all_messages()
        .filter(|m| m.package_name().starts_with("keel.") && !m.is_map_entry())
        .map(|m| m.full_name().to_owned())
        .filter(|name| parser(name).is_none())
        .collect();
    assert!(missing.is_empty(), "{missing:?} have no generated reader");
}

#[test]
fn every_route_builds_its_request_with_generated_code() {
    let table = keel_gateway::RouteTable::from_pool(&pool())
        .unwrap()
        .parsing_with(parser);
    for route in table.routes() {
        assert!(route.parse.is_some(), "{} has no reader", route.grpc_path);
    }
}

/// Builds `object` as the message `full_name` by generated code, checking it against the
/// dynamic deserializer.
fn builds(full_name: &str, object: &Json) -> bool {
    let pool = pool();
    let descriptor = pool.get_message_by_name(full_name).unwrap();
    agree(
        &descriptor,
        parser(full_name).unwrap(),
        object.as_object().unwrap(),
    )
}

#[test]
fn the_hot_routes_requests_are_built_by_generated_code() {
    // GET /v1/products/{id}, GET /v1/users/me, GET /v1/todos?pageSize=20 as the gateway
    // assembles them (a query's integer arrives as a string).
    assert!(builds(
        "keel.catalog.v1.GetProductRequest",
        &json!({"name": "products/lamp"})
    ));
    assert!(builds("google.protobuf.Empty", &json!({})));
    assert!(builds(
        "keel.todos.v1.ListTodosRequest",
        &json!({"parent": "users/me", "pageSize": "20", "pageToken": ""})
    ));
    // PATCH /v1/products/{id}: the update mask the gateway implies from the body's keys.
    assert!(builds(
        "keel.catalog.v1.UpdateProductRequest",
        &json!({"product": {"name": "products/lamp", "title": "Lamp"}, "updateMask": "title"})
    ));
    // PlaceOrder's body: nested messages in a list, a proto name beside JSON names.
    assert!(builds(
        "keel.orders.v1.PlaceOrderRequest",
        &json!({
            "parent": "users/me",
            "order": {"line_items": [{"product": "products/lamp", "quantity": "2"}]},
            "request_id": "5f0c6a1e-8d4b-4c3a-9e2f-1a2b3c4d5e6f",
        })
    ));
}

#[test]
fn what_generated_code_is_not_sure_of_goes_the_dynamic_way() {
    // An unknown key, a wrong type, null, a fraction: the dynamic deserializer's words.
    let product = "keel.catalog.v1.GetProductRequest";
    assert!(!builds(product, &json!({"nom": "x"})));
    assert!(!builds(product, &json!({"name": 5})));
    let todos = "keel.todos.v1.ListTodosRequest";
    assert!(!builds(todos, &json!({"pageSize": null})));
    assert!(!builds(todos, &json!({"pageSize": 20.5})));
    assert!(!builds("google.protobuf.Empty", &json!({"x": 1})));
    let update = "keel.catalog.v1.UpdateProductRequest";
    assert!(!builds(update, &json!({"updateMask": "snake_case"})));
    // A timestamp: RFC 3339 as prost-reflect checks it strictly is left to prost-reflect.
    assert!(!builds(
        "keel.jobs.v1.CreateJobRequest",
        &json!({"job": {"scheduleTime": "2026-12-07T00:00:00Z"}})
    ));
}
