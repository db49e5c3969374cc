//! OpenAPI 3.1 from the route table and the descriptors: paths, parameters, request and
//! response schemas following the proto3 JSON mapping and the rules the protos state (AIP-203
//! field behavior, keel's value rules), error responses, bearer auth where a method needs it,
//! and the proto comments as descriptions.

use std::collections::BTreeMap;

use prost_reflect::{EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value as Json, json};

use crate::annotations::{self, Behavior};
use crate::routes::{BodyMapping, Route, RouteTable};
use crate::template::OpenApiParam;

/// The component schemas built so far, and the rules the deployment adds to fields.
#[derive(Default)]
struct Schemas {
    components: BTreeMap<String, Json>,
    field_rules: BTreeMap<String, Json>,
}

/// The OpenAPI document for `table`, titled `title`. `field_rules` are JSON Schema keywords a
/// deployment's settings add to fields, by `package.Message.field` (a wallet's currency).
pub fn document(
    table: &RouteTable,
    title: &str,
    version: &str,
    field_rules: &BTreeMap<String, Json>,
) -> Json {
    let mut schemas = Schemas {
        components: BTreeMap::new(),
        field_rules: field_rules.clone(),
    };
    let mut paths: BTreeMap<String, Map<String, Json>> = BTreeMap::new();
    let mut operation_ids = std::collections::HashSet::new();
    let mut tags = BTreeMap::new();
    for route in table.routes() {
        let service = route.method.parent_service();
        tags.entry(service.name().to_owned()).or_insert_with(|| {
            let mut tag = json!({ "name": service.name() });
            if let Some(text) = located(
                service.parent_file().file_descriptor_proto(),
                service.path(),
            ) {
                tag["description"] = json!(text);
            }
            tag
        });
        let (path, mut operation) = operation(route, &mut schemas);
        // An additional binding of the same RPC needs an id of its own.
        let base = operation["operationId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut id = base.clone();
        let mut n = 2;
        while !operation_ids.insert(id.clone()) {
            id = format!("{base}{n}");
            n += 1;
        }
        operation["operationId"] = json!(id);
        paths
            .entry(path)
            .or_default()
            .insert(route.http_method.as_str().to_ascii_lowercase(), operation);
    }
    schemas
        .components
        .insert("google.rpc.Status".to_owned(), status_schema());
    json!({
        "openapi": "3.1.0",
        "info": { "title": title, "version": version },
        "tags": tags.into_values().collect::<Vec<_>>(),
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" }
            }
        },
    })
}

/// The OpenAPI operation of `route`, and its OpenAPI path.
fn operation(route: &Route, schemas: &mut Schemas) -> (String, Json) {
    let (path, path_params) = route.template.openapi();
    let method = &route.method;
    let input = method.input();
    // The top-level fields the path binds: they come from the path, not the query or body.
    let bound: Vec<&str> = route
        .template
        .variables
        .iter()
        .map(|v| v.field_path.split('.').next().unwrap_or_default())
        .collect();
    let mut parameters = path_parameters(&path_params, &input);
    parameters.extend(query_parameters(route, &input, &bound));
    let service = method.parent_service().name();
    let mut op = Map::new();
    op.insert(
        "operationId".into(),
        json!(format!("{service}_{}", method.name())),
    );
    op.insert("tags".into(), json!([service]));
    if let Some(text) = method_comments(method) {
        let summary = text.lines().next().unwrap_or_default();
        op.insert("summary".into(), json!(summary));
        op.insert("description".into(), json!(text));
    }
    op.insert("parameters".into(), Json::Array(parameters));
    let security = match annotations::anonymous(method) {
        true => json!([{}, { "bearer": [] }]),
        false => json!([{ "bearer": [] }]),
    };
    op.insert("security".into(), security);
    if let Some(schema) = request_schema(route, &input, &bound, schemas) {
        op.insert(
            "requestBody".into(),
            json!({ "required": true, "content": { "application/json": { "schema": schema } } }),
        );
    }
    op.insert("responses".into(), responses(route, schemas));
    (path, Json::Object(op))
}

/// The path's parameters: strings, with the pattern of the resource name's segment they take.
fn path_parameters(path_params: &[OpenApiParam], input: &MessageDescriptor) -> Vec<Json> {
    path_params
        .iter()
        .map(|p| {
            let mut schema = json!({ "type": "string" });
            if let Some(pattern) = p
                .field_path
                .as_deref()
                .and_then(|f| field_at(input, f))
                .and_then(|f| annotations::segment_patterns(&f))
                .and_then(|segments| segments.get(p.segment).cloned())
            {
                schema["pattern"] = json!(format!("^{pattern}$"));
            }
            let description = p
                .field_path
                .as_ref()
                .map(|f| format!("A segment of `{f}`."));
            json!({
                "name": p.name,
                "in": "path",
                "required": true,
                "description": description.unwrap_or_default(),
                "schema": schema,
            })
        })
        .collect()
}

/// The query parameters: the request's fields that neither the path nor the body carries.
fn query_parameters(route: &Route, input: &MessageDescriptor, bound: &[&str]) -> Vec<Json> {
    if route.body == BodyMapping::All {
        return Vec::new();
    }
    let body_field = match &route.body {
        BodyMapping::Field(f) => Some(f.as_str()),
        _ => None,
    };
    let implied_mask = route.implied_mask.as_ref().map(|mask| &mask.field);
    let mut parameters = Vec::new();
    for field in input.fields() {
        if bound.contains(&field.name()) && !matches!(field.kind(), Kind::Message(_))
            || Some(field.name()) == body_field
            || implied_mask == Some(&field)
        {
            continue;
        }
        let Some(mut schema) = query_schema(&field) else {
            continue;
        };
        let (each, list) = annotations::value_rules(&field);
        if let Json::Object(object) = &mut schema {
            match object.get_mut("items") {
                Some(Json::Object(items)) => {
                    items.extend(each);
                    object.extend(list);
                }
                _ => object.extend(each),
            }
        }
        parameters.push(json!({
            "name": field.json_name(),
            "in": "query",
            "required": annotations::behavior(&field).required,
            "description": comments(&field).unwrap_or_default(),
            "schema": schema,
        }));
    }
    parameters
}

/// The request body's schema, when the route takes one.
fn request_schema(
    route: &Route,
    input: &MessageDescriptor,
    bound: &[&str],
    schemas: &mut Schemas,
) -> Option<Json> {
    let implied_mask = route.implied_mask.is_some();
    match &route.body {
        BodyMapping::None => None,
        // The fields the path binds come from the path, not the body.
        BodyMapping::All => Some(object_schema(input, bound, schemas)),
        BodyMapping::Field(f) => input.get_field_by_name(f).map(|field| {
            match (implied_mask, field.kind()) {
                (true, Kind::Message(resource)) => {
                    // The request field's own rules hold for the patch too (a field that
                    // needs another, say).
                    let mut schema = patch_schema(&resource, schemas);
                    if let Json::Object(object) = &mut schema {
                        annotations::merge(object, annotations::value_rules(&field).0);
                    }
                    schema
                }
                _ => property_schema(&field, schemas),
            }
        }),
    }
}

/// The route's responses: its answer (JSON, or a stream of them), or a `google.rpc.Status`.
fn responses(route: &Route, schemas: &mut Schemas) -> Json {
    let output = route.method.output();
    let response_schema = match &route.response_body {
        Some(f) => output
            .get_field_by_name(f)
            .map_or(json!({}), |field| field_schema(&field, schemas)),
        None => message_ref(&output, schemas),
    };
    let content = if route.server_streaming() {
        json!({
            "text/event-stream": { "schema": { "type": "string" } },
            "application/x-ndjson": { "schema": response_schema },
        })
    } else {
        json!({ "application/json": { "schema": response_schema } })
    };
    json!({
        "200": { "description": "OK", "content": content },
        "default": {
            "description": "An error: the google.rpc.Status of the call.",
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/google.rpc.Status" } } }
        }
    })
}

fn message_ref(message: &MessageDescriptor, schemas: &mut Schemas) -> Json {
    if let Some(schema) = well_known(message) {
        return schema;
    }
    let name = message.full_name().to_owned();
    if !schemas.components.contains_key(&name) {
        schemas.components.insert(name.clone(), json!({}));
        let schema = object_schema(message, &[], schemas);
        schemas.components.insert(name.clone(), schema);
    }
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// The object schema of `message` without the fields named in `without`: each field's schema
/// with its rules, `required` for REQUIRED fields, `readOnly` / `writeOnly` from AIP-203, and
/// the message's own cross-field rules.
fn object_schema(message: &MessageDescriptor, without: &[&str], schemas: &mut Schemas) -> Json {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for field in message.fields() {
        if without.contains(&field.name()) {
            continue;
        }
        if annotations::behavior(&field).required {
            required.push(json!(field.json_name()));
        }
        properties.insert(
            field.json_name().to_owned(),
            property_schema(&field, schemas),
        );
    }
    let mut schema =
        json!({ "type": "object", "properties": properties, "additionalProperties": false });
    if !required.is_empty() {
        schema["required"] = Json::Array(required);
    }
    if let Some(text) = message_comments(message) {
        schema["description"] = json!(text);
    }
    if let (Some(rules), Json::Object(object)) = (annotations::message_rules(message), &mut schema)
    {
        annotations::merge(object, rules);
    }
    schema
}

/// A PATCH body whose keys are the update mask (AIP-134): the resource's fields, none of them
/// required on their own, at least one that the caller may set sent with a value (not `null`).
fn patch_schema(resource: &MessageDescriptor, schemas: &mut Schemas) -> Json {
    let mut schema = object_schema(resource, &[], schemas);
    let settable: Vec<Json> = resource
        .fields()
        .filter(|f| !annotations::behavior(f).read_only)
        .map(|f| {
            json!({
                "required": [f.json_name()],
                "properties": { f.json_name(): { "not": { "type": "null" } } },
            })
        })
        .collect();
    if let Json::Object(object) = &mut schema {
        object.remove("required");
        object.insert("anyOf".into(), Json::Array(settable));
        object.insert(
            "description".into(),
            json!("The fields to change; the update mask is the set of keys sent."),
        );
    }
    schema
}

/// A field's schema as a property: its type, its rules, its behavior and its comment.
fn property_schema(field: &FieldDescriptor, schemas: &mut Schemas) -> Json {
    let mut schema = field_schema(field, schemas);
    let (each, list) = annotations::value_rules(field);
    let Behavior {
        required,
        read_only,
        write_only,
    } = annotations::behavior(field);
    let Json::Object(object) = &mut schema else {
        return schema;
    };
    if field.is_list() {
        if let Some(Json::Object(items)) = object.get_mut("items") {
            annotations::merge(items, each);
        }
        annotations::merge(object, list);
    } else {
        annotations::merge(object, each);
    }
    if let Some(Json::Object(rules)) = schemas.field_rules.get(field.full_name()) {
        annotations::merge(object, rules.clone());
    }
    // The proto3 JSON mapping reads `null` as "not set": an optional field accepts it.
    if !required
        && !read_only
        && let Some(Json::String(kind)) = object.get("type").cloned()
    {
        object.insert("type".into(), json!([kind, "null"]));
        if let Some(Json::Array(values)) = object.get_mut("enum") {
            values.push(Json::Null);
        }
    }
    if read_only {
        object.insert("readOnly".into(), json!(true));
    }
    if write_only {
        object.insert("writeOnly".into(), json!(true));
    }
    if let Some(text) = comments(field) {
        object.insert("description".into(), json!(text));
    }
    schema
}

/// The request field at a dotted path.
fn field_at(message: &MessageDescriptor, path: &str) -> Option<FieldDescriptor> {
    let mut current = message.clone();
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = current.get_field_by_name(part)?;
        if parts.peek().is_none() {
            return Some(field);
        }
        let Kind::Message(next) = field.kind() else {
            return None;
        };
        current = next;
    }
    None
}

fn field_schema(field: &FieldDescriptor, schemas: &mut Schemas) -> Json {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            return json!({});
        };
        let value = entry.map_entry_value_field();
        return json!({ "type": "object", "additionalProperties": single_schema(&value.kind(), schemas) });
    }
    let item = single_schema(&field.kind(), schemas);
    if field.is_list() {
        json!({ "type": "array", "items": item })
    } else {
        item
    }
}

fn single_schema(kind: &Kind, schemas: &mut Schemas) -> Json {
    match kind {
        Kind::Double | Kind::Float => json!({ "type": "number" }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({ "type": "integer", "format": "int32" })
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({ "type": "integer", "format": "int64", "minimum": 0 })
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            json!({ "type": "string", "format": "int64", "pattern": "^-?[0-9]+$" })
        }
        Kind::Uint64 | Kind::Fixed64 => {
            json!({ "type": "string", "format": "uint64", "pattern": "^[0-9]+$" })
        }
        Kind::Bool => json!({ "type": "boolean" }),
        Kind::String => json!({ "type": "string" }),
        Kind::Bytes => json!({ "type": "string", "contentEncoding": "base64" }),
        Kind::Enum(e) => enum_schema(e),
        Kind::Message(m) => message_ref(m, schemas),
    }
}

fn enum_schema(e: &EnumDescriptor) -> Json {
    // The zero value `*_UNSPECIFIED` means "not set": never stored, never accepted.
    let names: Vec<String> = e
        .values()
        .filter(|v| !(v.number() == 0 && v.name().ends_with("_UNSPECIFIED")))
        .map(|v| v.name().to_owned())
        .collect();
    json!({ "type": "string", "enum": names })
}

fn query_schema(field: &FieldDescriptor) -> Option<Json> {
    if field.is_map() {
        return None;
    }
    let schema = match field.kind() {
        Kind::Message(m) => match well_known(&m) {
            Some(schema) if schema.get("type") != Some(&json!("object")) => schema,
            _ => return None,
        },
        kind => single_schema(&kind, &mut Schemas::default()),
    };
    Some(if field.is_list() {
        json!({ "type": "array", "items": schema })
    } else {
        schema
    })
}

fn well_known(message: &MessageDescriptor) -> Option<Json> {
    Some(match message.full_name() {
        "google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
        "google.protobuf.Duration" => {
            json!({ "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$" })
        }
        "google.protobuf.FieldMask" => {
            json!({ "type": "string", "description": "Comma-separated field paths." })
        }
        "google.protobuf.Empty" => json!({ "type": "object", "additionalProperties": false }),
        "google.protobuf.Struct" => json!({ "type": "object" }),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.ListValue" => json!({ "type": "array" }),
        "google.protobuf.Any" => {
            json!({ "type": "object", "properties": { "@type": { "type": "string" } } })
        }
        "google.protobuf.StringValue" => json!({ "type": "string" }),
        "google.protobuf.BoolValue" => json!({ "type": "boolean" }),
        "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => {
            json!({ "type": "integer" })
        }
        "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => {
            json!({ "type": "string", "pattern": "^-?[0-9]+$" })
        }
        "google.protobuf.DoubleValue" | "google.protobuf.FloatValue" => json!({ "type": "number" }),
        "google.protobuf.BytesValue" => json!({ "type": "string", "contentEncoding": "base64" }),
        _ => return None,
    })
}

fn status_schema() -> Json {
    json!({
        "type": "object",
        "description": "The error model of gRPC and REST APIs (AIP-193).",
        "properties": {
            "code": { "type": "integer", "format": "int32", "description": "The google.rpc.Code." },
            "message": { "type": "string" },
            "details": {
                "type": "array",
                "items": { "type": "object", "properties": { "@type": { "type": "string" } } }
            }
        }
    })
}

/// The leading comment of the element at `path` in `file`.
fn located(file: &prost_types::FileDescriptorProto, path: &[i32]) -> Option<String> {
    let info = file.source_code_info.as_ref()?;
    let location = info.location.iter().find(|l| l.path == path)?;
    let text = location.leading_comments.as_deref()?.trim();
    (!text.is_empty()).then(|| text.lines().map(str::trim).collect::<Vec<_>>().join("\n"))
}

fn method_comments(method: &prost_reflect::MethodDescriptor) -> Option<String> {
    located(method.parent_file().file_descriptor_proto(), method.path())
}

fn message_comments(message: &MessageDescriptor) -> Option<String> {
    located(
        message.parent_file().file_descriptor_proto(),
        message.path(),
    )
}

fn comments(field: &FieldDescriptor) -> Option<String> {
    located(field.parent_file().file_descriptor_proto(), field.path())
}
