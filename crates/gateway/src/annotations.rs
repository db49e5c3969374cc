//! What a proto says about its fields and methods beyond their types: AIP-203
//! `google.api.field_behavior`, keel's value rules (`keel.type.v1.schema`, `json_schema`) and
//! who may call a method (`keel.type.v1.access`), read from the descriptor options.

use prost_reflect::{DynamicMessage, FieldDescriptor, MessageDescriptor, MethodDescriptor, Value};
use serde_json::{Map, Value as Json, json};

/// AIP-203 values keel acts on.
const REQUIRED: i32 = 2;
const OUTPUT_ONLY: i32 = 3;
const INPUT_ONLY: i32 = 4;
const IDENTIFIER: i32 = 8;

/// How a field behaves in requests and responses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Behavior {
    /// A request without it is refused.
    pub required: bool,
    /// Set by the server (output only, or the resource's identifier); ignored in requests.
    pub read_only: bool,
    /// Read in requests, never returned.
    pub write_only: bool,
}

/// The field's AIP-203 behavior.
pub fn behavior(field: &FieldDescriptor) -> Behavior {
    let options = field.options();
    let Some(extension) = field
        .parent_pool()
        .get_extension_by_name("google.api.field_behavior")
    else {
        return Behavior::default();
    };
    if !options.has_extension(&extension) {
        return Behavior::default();
    }
    let values: Vec<i32> = match options.get_extension(&extension).as_ref() {
        Value::List(list) => list.iter().filter_map(Value::as_enum_number).collect(),
        Value::EnumNumber(n) => vec![*n],
        _ => Vec::new(),
    };
    Behavior {
        required: values.contains(&REQUIRED),
        read_only: values.contains(&OUTPUT_ONLY) || values.contains(&IDENTIFIER),
        write_only: values.contains(&INPUT_ONLY),
    }
}

/// The value rules of `field` as JSON Schema keywords, split into those of each value
/// (`pattern`, lengths, bounds, `format`, `examples`) and those of the list when the field is
/// repeated (`minItems`, `maxItems`).
pub fn value_rules(field: &FieldDescriptor) -> (Map<String, Json>, Map<String, Json>) {
    let (mut each, mut list) = (Map::new(), Map::new());
    let Some(rules) =
        extension_message(&field.options(), field.parent_pool(), "keel.type.v1.schema")
    else {
        return (each, list);
    };
    let text = |name: &str| {
        rules
            .get_field_by_name(name)
            .and_then(|v| v.as_str().map(str::to_owned))
            .filter(|s| !s.is_empty())
    };
    let number = |name: &str| -> Option<Json> {
        if !rules.has_field_by_name(name) {
            return None;
        }
        let value = rules.get_field_by_name(name)?;
        value
            .as_u32()
            .map(Json::from)
            .or_else(|| value.as_i64().map(Json::from))
    };
    if let Some(pattern) = text("pattern") {
        each.insert("pattern".into(), json!(pattern));
    }
    if let Some(format) = text("format") {
        each.insert("format".into(), json!(format));
    }
    for (rule, keyword) in [
        ("min_length", "minLength"),
        ("max_length", "maxLength"),
        ("minimum", "minimum"),
        ("maximum", "maximum"),
    ] {
        if let Some(value) = number(rule) {
            each.insert(keyword.into(), value);
        }
    }
    if let Some(example) = text("example").and_then(|e| serde_json::from_str::<Json>(&e).ok()) {
        each.insert("examples".into(), json!([example]));
    }
    for (rule, keyword) in [("min_items", "minItems"), ("max_items", "maxItems")] {
        if let Some(value) = number(rule) {
            list.insert(keyword.into(), value);
        }
    }
    if let Some(Json::Object(extra)) =
        text("json_schema").and_then(|s| serde_json::from_str::<Json>(&s).ok())
    {
        merge(&mut each, extra);
    }
    (each, list)
}

/// Merges `source` into `target`: objects key by key, anything else replaced.
pub fn merge(target: &mut Map<String, Json>, source: Map<String, Json>) {
    for (key, value) in source {
        match (target.get_mut(&key), value) {
            (Some(Json::Object(inner)), Json::Object(more)) => merge(inner, more),
            (_, value) => {
                target.insert(key, value);
            }
        }
    }
}

/// The field's pattern split into the patterns of its `/`-separated segments (no anchors).
pub fn segment_patterns(field: &FieldDescriptor) -> Option<Vec<String>> {
    let (each, _) = value_rules(field);
    let pattern = each.get("pattern")?.as_str()?;
    let inner = pattern.strip_prefix('^')?.strip_suffix('$')?;
    Some(inner.split('/').map(str::to_owned).collect())
}

/// JSON Schema keywords a message states across its fields (`keel.type.v1.json_schema`).
pub fn message_rules(message: &MessageDescriptor) -> Option<Map<String, Json>> {
    let options = message.options();
    let extension = message
        .parent_pool()
        .get_extension_by_name("keel.type.v1.json_schema")?;
    if !options.has_extension(&extension) {
        return None;
    }
    let text = options.get_extension(&extension).as_str()?.to_owned();
    match serde_json::from_str(&text) {
        Ok(Json::Object(rules)) => Some(rules),
        _ => None,
    }
}

/// Whether the method may be called without a bearer token.
pub fn anonymous(method: &MethodDescriptor) -> bool {
    extension_message(
        &method.options(),
        method.parent_pool(),
        "keel.type.v1.access",
    )
    .and_then(|access| access.get_field_by_name("anonymous")?.as_bool())
    .unwrap_or(false)
}

fn extension_message(
    options: &DynamicMessage,
    pool: &prost_reflect::DescriptorPool,
    name: &str,
) -> Option<DynamicMessage> {
    let extension = pool.get_extension_by_name(name)?;
    if !options.has_extension(&extension) {
        return None;
    }
    match options.get_extension(&extension).as_ref() {
        Value::Message(message) => Some(message.clone()),
        _ => None,
    }
}

/// Whether `message` has `field` to be filled from the body's keys on PATCH (AIP-134's implied
/// update mask).
pub fn update_mask_field(message: &MessageDescriptor) -> Option<FieldDescriptor> {
    message.get_field_by_name("update_mask").filter(|field| {
        matches!(field.kind(), prost_reflect::Kind::Message(m)
            if m.full_name() == "google.protobuf.FieldMask")
    })
}
