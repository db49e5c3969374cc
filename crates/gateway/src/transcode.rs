//! HTTP request → protobuf request message, protobuf response → JSON, following the HttpRule
//! and the proto3 JSON mapping (prost-reflect): body, path variables and query parameters are
//! assembled into one JSON object, then deserialized with unknown fields denied (or built by
//! generated code where it can, for a call that stays in the process).

use std::any::Any;

use prost::Message as _;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
    ReflectMessage as _, SerializeOptions,
};
use serde_json::{Map, Value as Json};

use crate::lane::Message;
use crate::routes::{BodyMapping, Route};

/// Why a request could not be turned into a message; always the client's fault (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BadRequest {
    /// The offending field or parameter, for a `google.rpc.BadRequest` violation.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> BadRequest {
    BadRequest {
        field: field.into(),
        message: message.into(),
    }
}

/// The request of `route` as one JSON object: its body, query parameters and path variables
/// assembled as the HttpRule maps them (the implied update mask added), not yet checked
/// against the message's fields' types.
pub fn assemble(
    route: &Route,
    path_vars: &[(&str, String)],
    query: Option<&str>,
    body: &[u8],
) -> Result<Map<String, Json>, BadRequest> {
    let input = route.method.input();
    let mut root = from_body(route, body)?;
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        add_query(route, &input, query, &mut root)?;
    }
    if let (Some(mask), BodyMapping::Field(body_field)) = (&route.implied_mask, &route.body)
        && !root.contains_key(mask.field.json_name())
        && !root.contains_key(mask.field.name())
        && let Some(Json::Object(sent)) = root.get(body_field.as_str())
    {
        let paths = mask.paths(sent).join(",");
        root.insert(mask.field.json_name().to_owned(), Json::String(paths));
    }
    for (field_path, value) in path_vars {
        let path =
            resolve(&input, field_path).ok_or_else(|| bad(*field_path, "unknown path field"))?;
        let leaf = path.last().expect("non-empty");
        let converted = scalar(leaf, value)
            .ok_or_else(|| bad(*field_path, format!("{value:?} does not fit {field_path}")))?;
        insert(&mut root, &path, converted, false);
    }
    Ok(root)
}

/// Builds the request message of `route` from its path variables, query string and body, with
/// the dynamic deserializer: its encoding.
pub fn request(
    route: &Route,
    path_vars: &[(&str, String)],
    query: Option<&str>,
    body: &[u8],
) -> Result<Vec<u8>, BadRequest> {
    encode(
        &route.method.input(),
        assemble(route, path_vars, query, body)?,
    )
}

/// Builds one message type from an assembled request without reflection: generated code that
/// takes only what it knows the dynamic deserializer (prost-reflect's, as [`request`] calls it)
/// takes, to the same message, and gives up (`None`) on anything else, which then goes the
/// dynamic way and gets its error in that deserializer's words.
pub type Parse = fn(&Map<String, Json>) -> Option<Message>;

/// The request message of `route` from its assembled JSON: built by the route's generated
/// parser when it has one and `typed` is wanted (the call stays in the process), else encoded
/// by the dynamic deserializer.
pub fn message(route: &Route, root: Map<String, Json>, typed: bool) -> Result<Message, BadRequest> {
    if let Some(parse) = route.parse.filter(|_| typed)
        && let Some(built) = parse(&root)
    {
        return Ok(built);
    }
    encode(&route.method.input(), root).map(|bytes| Message::Encoded(bytes.into()))
}

/// The request's JSON as the body gives it: the whole message, one field of it, or nothing.
fn from_body(route: &Route, body: &[u8]) -> Result<Map<String, Json>, BadRequest> {
    let mut root = Map::new();
    if body.is_empty() {
        return Ok(root);
    }
    match &route.body {
        BodyMapping::None => return Err(bad("body", "this method takes no request body")),
        BodyMapping::All => match parse_json(body)? {
            Json::Object(object) => root = object,
            _ => return Err(bad("body", "the body must be a JSON object")),
        },
        BodyMapping::Field(field) => {
            root.insert(field.clone(), parse_json(body)?);
        }
    }
    Ok(root)
}

/// Adds the query string's parameters to `root`: fields neither the path nor the body carries.
fn add_query(
    route: &Route,
    input: &MessageDescriptor,
    query: &str,
    root: &mut Map<String, Json>,
) -> Result<(), BadRequest> {
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if route.body == BodyMapping::All {
            return Err(bad(
                key.as_ref(),
                "this method takes its fields from the body, not the query string",
            ));
        }
        let path = resolve(input, &key)
            .ok_or_else(|| bad(key.as_ref(), format!("unknown query parameter {key:?}")))?;
        if let BodyMapping::Field(body_field) = &route.body
            && path[0].name() == body_field
        {
            return Err(bad(
                key.as_ref(),
                format!("{key:?} belongs in the request body"),
            ));
        }
        let leaf = path.last().expect("resolve returns a non-empty path");
        let converted = scalar(leaf, &value).ok_or_else(|| {
            bad(
                key.as_ref(),
                format!("query parameter {key:?} cannot be {value:?}"),
            )
        })?;
        insert(root, &path, converted, leaf.is_list());
    }
    Ok(())
}

/// `root` as the binary request message, or the first top-level field at fault.
fn encode(input: &MessageDescriptor, root: Map<String, Json>) -> Result<Vec<u8>, BadRequest> {
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    // Read from a borrowed value: the object is needed again only to name a field at fault.
    let root = Json::Object(root);
    match DynamicMessage::deserialize_with_options(input.clone(), &root, &options) {
        Ok(message) => Ok(message.encode_to_vec()),
        Err(e) => {
            // Name the field at fault: the first top-level field that fails on its own.
            let field = root
                .as_object()
                .into_iter()
                .flatten()
                .find(|(key, value)| {
                    let alone = Json::Object(Map::from_iter([((*key).clone(), (*value).clone())]));
                    DynamicMessage::deserialize_with_options(input.clone(), alone, &options)
                        .is_err()
                })
                .map_or_else(|| "body".to_owned(), |(key, _)| key.clone());
            Err(bad(field.clone(), format!("invalid {field}: {e}")))
        }
    }
}

fn parse_json(body: &[u8]) -> Result<Json, BadRequest> {
    serde_json::from_slice(body).map_err(|e| bad("body", format!("malformed JSON body: {e}")))
}

/// The fields along a dotted path, accepting proto and JSON names at every step.
fn resolve(message: &MessageDescriptor, path: &str) -> Option<Vec<FieldDescriptor>> {
    let mut fields = Vec::new();
    let mut current = message.clone();
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = current
            .get_field_by_name(part)
            .or_else(|| current.get_field_by_json_name(part))?;
        if parts.peek().is_some() {
            match field.kind() {
                Kind::Message(next)
                    if !field.is_list() && !field.is_map() && !is_string_wkt(&next) =>
                {
                    current = next
                }
                _ => return None,
            }
        }
        fields.push(field);
    }
    Some(fields)
}

fn is_string_wkt(message: &MessageDescriptor) -> bool {
    matches!(
        message.full_name(),
        "google.protobuf.Timestamp" | "google.protobuf.Duration" | "google.protobuf.FieldMask"
    )
}

/// The JSON form of a string for a scalar field (or a well-known type written as a string).
fn scalar(field: &FieldDescriptor, text: &str) -> Option<Json> {
    if field.is_map() {
        return None;
    }
    Some(match field.kind() {
        Kind::Bool => Json::Bool(match text {
            "true" => true,
            "false" => false,
            _ => return None,
        }),
        Kind::Enum(_) => match text.parse::<i64>() {
            Ok(n) => Json::from(n),
            Err(_) => Json::String(text.to_owned()),
        },
        Kind::Int32
        | Kind::Sint32
        | Kind::Sfixed32
        | Kind::Int64
        | Kind::Sint64
        | Kind::Sfixed64 => {
            text.parse::<i64>().ok()?;
            Json::String(text.to_owned())
        }
        Kind::Uint32 | Kind::Fixed32 | Kind::Uint64 | Kind::Fixed64 => {
            text.parse::<u64>().ok()?;
            Json::String(text.to_owned())
        }
        Kind::Float | Kind::Double => {
            if !matches!(text, "NaN" | "Infinity" | "-Infinity") {
                text.parse::<f64>().ok()?;
            }
            Json::String(text.to_owned())
        }
        // proto3 JSON accepts numbers as strings; prost-reflect checks ranges.
        Kind::Message(message) => match message.full_name() {
            name if is_string_wkt(&message) || name == "google.protobuf.StringValue" => {
                Json::String(text.to_owned())
            }
            "google.protobuf.BoolValue" => Json::Bool(text.parse().ok()?),
            name if name.starts_with("google.protobuf.")
                && name.ends_with("Value")
                && name != "google.protobuf.Value" =>
            {
                Json::String(text.to_owned())
            }
            _ => return None,
        },
        _ => Json::String(text.to_owned()),
    })
}

/// Sets `value` at `path` inside `root`, creating objects on the way; a repeated leaf collects.
fn insert(root: &mut Map<String, Json>, path: &[FieldDescriptor], value: Json, repeated: bool) {
    let (leaf, parents) = path.split_last().expect("non-empty");
    let mut object = root;
    for field in parents {
        let entry = object
            .entry(field.name().to_owned())
            .or_insert_with(|| Json::Object(Map::new()));
        if !entry.is_object() {
            *entry = Json::Object(Map::new());
        }
        object = entry.as_object_mut().expect("just made an object");
    }
    // Path variables override the body; query parameters of repeated fields accumulate.
    let json_name = leaf.json_name();
    if json_name != leaf.name() {
        object.remove(json_name);
    }
    if repeated {
        match object
            .entry(leaf.name().to_owned())
            .or_insert_with(|| Json::Array(Vec::new()))
        {
            Json::Array(items) => items.push(value),
            other => *other = Json::Array(vec![value]),
        }
    } else {
        object.insert(leaf.name().to_owned(), value);
    }
}

/// A message's JSON, or why it could not be written.
pub type Rendered = Result<Vec<u8>, String>;

/// Renders one message type as its proto3 JSON without reflection: generated code, byte for
/// byte what [`to_json`] writes for it.
#[derive(Debug, Clone, Copy)]
pub struct Render {
    /// From the encoded message.
    pub encoded: fn(&[u8]) -> Rendered,
    /// From the message as a handler of this process answered it (see [`crate::lane`]);
    /// `None` when it is not of this type.
    pub typed: fn(&(dyn Any + Send + Sync)) -> Option<Rendered>,
}

/// The JSON body of a response: the whole message (by the route's generated renderer when it
/// has one), or its `response_body` field.
pub fn response(route: &Route, bytes: &[u8]) -> Result<Vec<u8>, String> {
    if let (Some(render), None) = (route.render, &route.response_body) {
        return (render.encoded)(bytes);
    }
    let output = route.method.output();
    let message =
        DynamicMessage::decode(output, bytes).map_err(|e| format!("undecodable response: {e}"))?;
    to_json(&message, route.response_body.as_deref())
}

/// `message` (or one field of it) as proto3 JSON: camelCase names, 64-bit integers as strings,
/// default values omitted.
pub fn to_json(message: &DynamicMessage, field: Option<&str>) -> Result<Vec<u8>, String> {
    let options = SerializeOptions::new();
    let mut serializer = serde_json::Serializer::new(Vec::new());
    let value = message
        .serialize_with_options(&mut serializer, &options)
        .map(|()| serializer.into_inner())
        .map_err(|e| format!("unserializable response: {e}"))?;
    let Some(field) = field else {
        return Ok(value);
    };
    let descriptor = message
        .descriptor()
        .get_field_by_name(field)
        .ok_or_else(|| format!("no field {field}"))?;
    let whole: Json = serde_json::from_slice(&value).map_err(|e| e.to_string())?;
    let part = whole
        .get(descriptor.json_name())
        .cloned()
        .unwrap_or_else(|| match descriptor.kind() {
            _ if descriptor.is_list() => Json::Array(Vec::new()),
            Kind::Message(_) => Json::Object(Map::new()),
            _ => Json::Null,
        });
    serde_json::to_vec(&part).map_err(|e| e.to_string())
}
