//! Request messages from the JSON object the gateway assembled, by code generated at build time
//! (build/parse.rs): only what the dynamic deserializer (prost-reflect) takes, read to the same
//! message; `None` for anything else, which then goes the dynamic way and gets its words.

use std::str::FromStr;

use keel_gateway::lane::Message;
use keel_gateway::transcode::Parse;
use serde_json::{Map, Value as Json};

use super::{ProtoEnum, read};

/// A JSON object, as the gateway assembles a request.
pub type JsonObject = Map<String, Json>;

/// A message generated code builds from a JSON object.
pub trait FromJson: Sized {
    /// `object` as this message, or `None` where generated code is not sure to read it as the
    /// dynamic deserializer does.
    fn from_json(object: &JsonObject) -> Option<Self>;
}

/// A string field: a JSON string only.
pub fn string(value: &Json) -> Option<String> {
    value.as_str().map(str::to_owned)
}

/// A bool field: `true` or `false` only.
pub fn boolean(value: &Json) -> Option<bool> {
    value.as_bool()
}

/// An integer field: a JSON integer in range, or a string Rust's `parse` takes (prost-reflect
/// parses one so); not a number with a fraction or an exponent.
pub fn integer<T>(value: &Json) -> Option<T>
where
    T: TryFrom<i64> + TryFrom<u64> + FromStr,
{
    match value {
        Json::Number(n) => match n.as_i64() {
            Some(n) => T::try_from(n).ok(),
            None => T::try_from(n.as_u64()?).ok(),
        },
        Json::String(text) => text.parse().ok(),
        _ => None,
    }
}

/// An enum field: a value's name, or an integer in `i32`'s range (an open enum).
pub fn enumeration<E: ProtoEnum>(value: &Json) -> Option<i32> {
    match value {
        Json::String(name) => E::number(name),
        Json::Number(_) => integer::<i32>(value),
        _ => None,
    }
}

/// A message field: a JSON object.
pub fn message<M: FromJson>(value: &Json) -> Option<M> {
    M::from_json(value.as_object()?)
}

/// A `google.protobuf.FieldMask`: its paths in camelCase, comma-separated, read as prost-reflect
/// reads them (an empty path skipped, an underscore refused, each capital an underscore and
/// its lower case).
pub fn field_mask(value: &Json) -> Option<prost_types::FieldMask> {
    let paths = value
        .as_str()?
        .split(',')
        .filter(|path| !path.is_empty())
        .map(|path| {
            let mut snake = String::with_capacity(path.len() + 4);
            for c in path.chars() {
                match c {
                    '_' => return None,
                    c if c.is_ascii_uppercase() => {
                        snake.push('_');
                        snake.push(c.to_ascii_lowercase());
                    }
                    c => snake.push(c),
                }
            }
            Some(snake)
        })
        .collect::<Option<_>>()?;
    Some(prost_types::FieldMask { paths })
}

/// A repeated field: a JSON array, every item read by `item`.
pub fn list<T>(value: &Json, item: fn(&Json) -> Option<T>) -> Option<Vec<T>> {
    value.as_array()?.iter().map(item).collect()
}

/// Builds `M` from a request's JSON, for the lane.
fn parse<M: FromJson + prost::Message + 'static>(object: &JsonObject) -> Option<Message> {
    M::from_json(object).map(Message::typed)
}

/// Builds `google.protobuf.Empty` (prost's `()`): from `{}` only.
fn parse_empty(object: &JsonObject) -> Option<Message> {
    object.is_empty().then(|| Message::typed(()))
}

include!(concat!(env!("OUT_DIR"), "/keel_parse.rs"));

#[cfg(test)]
mod tests;
