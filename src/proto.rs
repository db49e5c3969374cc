//! The generated code of every keel API and the descriptor set that reflection and the
//! gateway read.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// keel's own packages.
pub mod keel {
    /// Shared types.
    pub mod r#type {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("keel.r#type.v1");
        }
    }
    /// Users, sign-in, tokens.
    pub mod identity {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("keel.identity.v1");
        }
    }
    /// Todo lists.
    pub mod todos {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("keel.todos.v1");
        }
    }
    /// Products and stock.
    pub mod catalog {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("keel.catalog.v1");
        }
    }
    /// Wallets and the ledger.
    pub mod payments {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("keel.payments.v1");
        }
    }
    /// Orders and their saga.
    pub mod orders {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("keel.orders.v1");
        }
    }
    /// Background jobs.
    pub mod jobs {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("keel.jobs.v1");
        }
    }
}

/// Google's HTTP annotations and error model.
pub mod google {
    /// google.api.
    pub mod api {
        tonic::include_proto!("google.api");
    }
    /// google.rpc.
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod json;
pub mod lane;

/// The encoded `FileDescriptorSet` of every file in `proto/` and its imports, with the
/// `google.api.http` options intact.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/keel_descriptor.bin"));

/// A `google.protobuf.Timestamp` for `t`.
pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// The time `ms` milliseconds after the epoch as a `google.protobuf.Timestamp`.
pub fn timestamp_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A `google.protobuf.Struct` as the JSON object it stands for.
pub fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => l.values.iter().map(value_to_json).collect(),
    }
}

/// A JSON object as a `google.protobuf.Struct` (anything else is an empty one).
pub fn json_to_struct(json: &serde_json::Value) -> prost_types::Struct {
    prost_types::Struct {
        fields: json
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), json_to_value(v)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn json_to_value(json: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(_) => Kind::StructValue(json_to_struct(json)),
    };
    prost_types::Value { kind: Some(kind) }
}
