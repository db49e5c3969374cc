//! OpenAPI 3.1 from the route table and the descriptors: paths, parameters, request and
//! response schemas following the proto3 JSON mapping, error responses, bearer auth, and the
//! proto comments as descriptions.

use std::collections::BTreeMap;

use prost_reflect::{EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value as Json, json};

use crate::routes::{BodyMapping, Route, RouteTable};

/// The OpenAPI document for `table`, titled `title`.
pub fn document(table: &RouteTable, title: &str, version: &str) -> Json {
    let mut schemas = BTreeMap::new();
    let mut paths: BTreeMap<String, Map<String, Json>> = BTreeMap::new();
    let mut operation_ids = std::collections::HashSet::new();
    for route in table.routes() {
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
    schemas.insert("google.rpc.Status".to_owned(), status_schema());
    json!({
        "openapi": "3.1.0",
        "info": { "title": title, "version": version },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" }
            }
        },
        "security": [ {}, { "bearer": [] } ],
    })
}

fn operation(route: &Route, schemas: &mut BTreeMap<String, Json>) -> (String, Json) {
    let (path, path_params) = route.template.openapi();
    let method = &route.method;
    let input = method.input();
    let mut parameters: Vec<Json> = path_params
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "in": "path",
                "required": true,
                "description": p.field_path.as_ref().map(|f| format!("A segment of `{f}`.")).unwrap_or_default(),
                "schema": { "type": "string" },
            })
        })
        .collect();
    let bound: Vec<&str> = route
        .template
        .variables
        .iter()
        .map(|v| v.field_path.split('.').next().unwrap_or_default())
        .collect();
    let body_field = match &route.body {
        BodyMapping::Field(f) => Some(f.as_str()),
        _ => None,
    };
    if route.body != BodyMapping::All {
        for field in input.fields() {
            if bound.contains(&field.name()) && !matches!(field.kind(), Kind::Message(_))
                || Some(field.name()) == body_field
            {
                continue;
            }
            if let Some(schema) = query_schema(&field) {
                parameters.push(json!({
                    "name": field.json_name(),
                    "in": "query",
                    "required": false,
                    "description": comments(&field).unwrap_or_default(),
                    "schema": schema,
                }));
            }
        }
    }
    let mut op = Map::new();
    op.insert(
        "operationId".into(),
        json!(format!(
            "{}_{}",
            method.parent_service().name(),
            method.name()
        )),
    );
    op.insert("tags".into(), json!([method.parent_service().name()]));
    if let Some(text) = method_comments(method) {
        op.insert(
            "summary".into(),
            json!(text.lines().next().unwrap_or_default()),
        );
        op.insert("description".into(), json!(text));
    }
    op.insert("parameters".into(), Json::Array(parameters));
    let request_schema = match &route.body {
        BodyMapping::None => None,
        BodyMapping::All => Some(message_ref(&input, schemas)),
        BodyMapping::Field(f) => input
            .get_field_by_name(f)
            .map(|field| field_schema(&field, schemas)),
    };
    if let Some(schema) = request_schema {
        op.insert(
            "requestBody".into(),
            json!({ "required": true, "content": { "application/json": { "schema": schema } } }),
        );
    }
    let output = method.output();
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
    op.insert(
        "responses".into(),
        json!({
            "200": { "description": "OK", "content": content },
            "default": {
                "description": "An error: the google.rpc.Status of the call.",
                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/google.rpc.Status" } } }
            }
        }),
    );
    (path, Json::Object(op))
}

fn message_ref(message: &MessageDescriptor, schemas: &mut BTreeMap<String, Json>) -> Json {
    if let Some(schema) = well_known(message) {
        return schema;
    }
    let name = message.full_name().to_owned();
    if !schemas.contains_key(&name) {
        schemas.insert(name.clone(), json!({}));
        let mut properties = Map::new();
        for field in message.fields() {
            let mut schema = field_schema(&field, schemas);
            if let (Some(text), Json::Object(object)) = (comments(&field), &mut schema)
                && !object.contains_key("$ref")
            {
                object.insert("description".into(), json!(text));
            }
            properties.insert(field.json_name().to_owned(), schema);
        }
        let mut schema =
            json!({ "type": "object", "properties": properties, "additionalProperties": false });
        if let Some(text) = message_comments(message) {
            schema["description"] = json!(text);
        }
        schemas.insert(name.clone(), schema);
    }
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn field_schema(field: &FieldDescriptor, schemas: &mut BTreeMap<String, Json>) -> Json {
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

fn single_schema(kind: &Kind, schemas: &mut BTreeMap<String, Json>) -> Json {
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
    let names: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
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
        kind => single_schema(&kind, &mut BTreeMap::new()),
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
