//! proto3 JSON of keel's messages from their prost structs, by code generated at build time
//! (build/json.rs): what the gateway's dynamic serializer (prost-reflect) writes, byte for byte,
//! without decoding into a dynamic message and walking its descriptor on every response.

use std::fmt::Display;
use std::marker::PhantomData;

use base64::display::Base64Display;
use base64::prelude::BASE64_STANDARD;
use keel_gateway::transcode::Render;
use serde::Serialize;
use serde::ser::{Error as _, SerializeSeq as _, Serializer};

/// How a value of `T` is written.
pub trait Shape<T: ?Sized> {
    /// Writes `value` to `serializer`.
    fn write<S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error>;
}

/// A value with the shape it is written as.
pub struct As<'a, H, T: ?Sized>(&'a T, PhantomData<H>);

/// `value`, to be written as `H`.
pub fn as_<H, T: ?Sized>(value: &T) -> As<'_, H, T> {
    As(value, PhantomData)
}

impl<H: Shape<T>, T: ?Sized> Serialize for As<'_, H, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        H::write(self.0, serializer)
    }
}

/// As serde writes it: booleans, 32-bit integers, strings, messages (their generated impl).
pub struct Plain;

impl<T: Serialize + ?Sized> Shape<T> for Plain {
    fn write<S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
        value.serialize(serializer)
    }
}

/// 64-bit integers: a decimal string, since JavaScript numbers cannot hold them.
pub struct Decimal;

impl<T: Display> Shape<T> for Decimal {
    fn write<S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }
}

/// `float` and `double`: a number, or "NaN", "Infinity", "-Infinity".
pub struct Float;

macro_rules! float_shape {
    ($t:ty, $write:ident) => {
        impl Shape<$t> for Float {
            fn write<S: Serializer>(value: &$t, serializer: S) -> Result<S::Ok, S::Error> {
                match *value {
                    v if v.is_finite() => serializer.$write(v),
                    v if v == <$t>::INFINITY => serializer.serialize_str("Infinity"),
                    v if v == <$t>::NEG_INFINITY => serializer.serialize_str("-Infinity"),
                    _ => serializer.serialize_str("NaN"),
                }
            }
        }
    };
}
float_shape!(f32, serialize_f32);
float_shape!(f64, serialize_f64);

/// `bytes`: standard base64 with padding.
pub struct Base64;

impl Shape<Vec<u8>> for Base64 {
    fn write<S: Serializer>(value: &Vec<u8>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&Base64Display::new(value, &BASE64_STANDARD))
    }
}

/// A generated enum: the names of its values.
pub trait ProtoEnum {
    /// The name of the value numbered `number`, if the enum has one.
    fn name(number: i32) -> Option<&'static str>;
    /// The number of the value named `name`, if the enum has one.
    fn number(name: &str) -> Option<i32>;
}

/// An enum field (an `i32` in prost): its value's name, or the number if it has none.
pub struct Enum<E>(PhantomData<E>);

impl<E: ProtoEnum> Shape<i32> for Enum<E> {
    fn write<S: Serializer>(value: &i32, serializer: S) -> Result<S::Ok, S::Error> {
        match E::name(*value) {
            Some(name) => serializer.serialize_str(name),
            None => serializer.serialize_i32(*value),
        }
    }
}

/// A repeated field: an array of its items, each written as `H`.
pub struct List<H>(PhantomData<H>);

impl<T, H: Shape<T>> Shape<Vec<T>> for List<H> {
    fn write<S: Serializer>(value: &Vec<T>, serializer: S) -> Result<S::Ok, S::Error> {
        let mut list = serializer.serialize_seq(Some(value.len()))?;
        for item in value {
            list.serialize_element(&as_::<H, T>(item))?;
        }
        list.end()
    }
}

/// `google.protobuf.Timestamp`: RFC 3339 in UTC, within years 1 to 9999.
pub struct Timestamp;

impl Shape<prost_types::Timestamp> for Timestamp {
    fn write<S: Serializer>(
        value: &prost_types::Timestamp,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        if !(-62_135_596_800..=253_402_300_799).contains(&value.seconds) {
            return Err(S::Error::custom("timestamp out of range"));
        }
        serializer.collect_str(value)
    }
}

/// `google.protobuf.Duration`: seconds with a fraction and an `s`, within ±10,000 years.
pub struct Duration;

impl Shape<prost_types::Duration> for Duration {
    fn write<S: Serializer>(
        value: &prost_types::Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        if value.seconds.unsigned_abs() > 315_576_000_000
            || value.nanos.unsigned_abs() > 999_999_999
        {
            return Err(S::Error::custom("duration out of range"));
        }
        serializer.collect_str(value)
    }
}

/// `google.protobuf.FieldMask`: its paths in camelCase, comma-separated.
pub struct FieldMask;

impl Shape<prost_types::FieldMask> for FieldMask {
    fn write<S: Serializer>(
        value: &prost_types::FieldMask,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut joined = String::new();
        for (i, path) in value.paths.iter().enumerate() {
            if i > 0 {
                joined.push(',');
            }
            for (j, part) in path.split('.').enumerate() {
                if j > 0 {
                    joined.push('.');
                }
                camel_case(&mut joined, part).map_err(|()| {
                    S::Error::custom("cannot roundtrip field name through camelcase")
                })?;
            }
        }
        serializer.serialize_str(&joined)
    }
}

/// Appends `snake` in camelCase; fails where camelCase could not be read back as the same name.
fn camel_case(out: &mut String, snake: &str) -> Result<(), ()> {
    let mut upper_next = false;
    for c in snake.chars() {
        if c.is_ascii_uppercase() {
            return Err(());
        }
        if upper_next {
            let upper = c.to_ascii_uppercase();
            if upper == c {
                return Err(());
            }
            out.push(upper);
            upper_next = false;
        } else if c == '_' {
            upper_next = true;
        } else {
            out.push(c);
        }
    }
    Ok(())
}

/// `google.protobuf.Struct`: the JSON object it holds.
pub struct Struct;

impl Shape<prost_types::Struct> for Struct {
    fn write<S: Serializer>(value: &prost_types::Struct, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(value.fields.iter().map(|(k, v)| (k, as_::<Value, _>(v))))
    }
}

/// `google.protobuf.Value`: the JSON value it holds (a non-finite number has none).
pub struct Value;

impl Shape<prost_types::Value> for Value {
    fn write<S: Serializer>(value: &prost_types::Value, serializer: S) -> Result<S::Ok, S::Error> {
        use prost_types::value::Kind;
        match &value.kind {
            None | Some(Kind::NullValue(_)) => serializer.serialize_none(),
            Some(Kind::BoolValue(b)) => serializer.serialize_bool(*b),
            Some(Kind::NumberValue(n)) if n.is_finite() => serializer.serialize_f64(*n),
            Some(Kind::NumberValue(_)) => Err(S::Error::custom(
                "cannot serialize non-finite double in google.protobuf.Value",
            )),
            Some(Kind::StringValue(s)) => serializer.serialize_str(s),
            Some(Kind::ListValue(list)) => ListValue::write(list, serializer),
            Some(Kind::StructValue(object)) => Struct::write(object, serializer),
        }
    }
}

/// `google.protobuf.ListValue`: the JSON array it holds.
pub struct ListValue;

impl Shape<prost_types::ListValue> for ListValue {
    fn write<S: Serializer>(
        value: &prost_types::ListValue,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(value.values.iter().map(as_::<Value, _>))
    }
}

/// `google.protobuf.Empty` (prost's `()`): `{}`.
pub struct Empty;

impl Shape<()> for Empty {
    fn write<S: Serializer>(_: &(), serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(std::iter::empty::<((), ())>())
    }
}

/// How the message `M` is rendered: from its encoding, or as a handler answered it.
fn render<M: prost::Message + Default + Serialize + 'static>() -> Render {
    Render {
        encoded: |bytes| {
            let message = M::decode(bytes).map_err(|e| format!("undecodable response: {e}"))?;
            serde_json::to_vec(&message).map_err(|e| format!("unserializable response: {e}"))
        },
        typed: |message| {
            let message = message.downcast_ref::<M>()?;
            Some(serde_json::to_vec(message).map_err(|e| format!("unserializable response: {e}")))
        },
    }
}

/// How `google.protobuf.Empty` (prost's `()`) is rendered: `{}`.
fn render_empty() -> Render {
    Render {
        encoded: |bytes| {
            <() as prost::Message>::decode(bytes)
                .map_err(|e| format!("undecodable response: {e}"))?;
            Ok(b"{}".to_vec())
        },
        typed: |message| message.is::<()>().then(|| Ok(b"{}".to_vec())),
    }
}

include!(concat!(env!("OUT_DIR"), "/keel_json.rs"));

pub mod read;

#[cfg(test)]
mod tests;
