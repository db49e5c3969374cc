//! The generated JSON is the dynamic serializer's, byte for byte: for every message of keel's
//! packages filled at random (edge values favoured), and for each well-known shape alone.

use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor, Value as Dynamic};

use super::*;
use crate::proto::FILE_DESCRIPTOR_SET;

pub(super) fn pool() -> DescriptorPool {
    DescriptorPool::decode(FILE_DESCRIPTOR_SET).unwrap()
}

/// A small deterministic generator (xorshift64*): the same cases on every run.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let n = u64::try_from(n).unwrap();
        usize::try_from(self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n).unwrap()
    }

    pub(super) fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }
}

const STRINGS: &[&str] = &[
    "",
    "a",
    "products/lamp-42",
    "quote \" backslash \\ slash /",
    "control \u{1}\u{1f} newline \n tab \t",
    "ünïcødé ✓ 🦀",
    "</script><script>",
    "line\u{2028}separator",
];

const TIMESTAMP_SECONDS: &[i64] = &[
    0,
    1,
    -1,
    1_733_400_000,
    -62_135_596_800,
    253_402_300_799,
    253_402_300_800,
    -62_135_596_801,
];
const NANOS: &[i32] = &[0, 1, 1_000, 1_000_000, 123_456_789, 999_999_999, -1];

fn timestamp(rng: &mut Rng) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: rng.pick(TIMESTAMP_SECONDS),
        nanos: rng.pick(NANOS),
    }
}

fn duration(rng: &mut Rng) -> prost_types::Duration {
    let seconds = rng.pick(&[0, 1, -1, 3_600, 315_576_000_000, -315_576_000_001]);
    let nanos = rng.pick(NANOS);
    // A Duration's nanos carry its sign.
    let nanos = if seconds < 0 { -nanos.abs() } else { nanos };
    prost_types::Duration { seconds, nanos }
}

fn field_mask(rng: &mut Rng) -> prost_types::FieldMask {
    let paths = [
        "title",
        "price.units",
        "update_time",
        "a_b_c",
        "Bad",
        "trailing_",
    ];
    prost_types::FieldMask {
        paths: (0..rng.below(4))
            .map(|_| rng.pick(&paths).to_owned())
            .collect(),
    }
}

fn json_value(rng: &mut Rng, depth: usize) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match rng.below(if depth > 2 { 4 } else { 6 }) {
        0 => Kind::NullValue(0),
        1 => Kind::BoolValue(rng.below(2) == 1),
        2 => Kind::NumberValue(rng.pick(&[0.0, -0.0, 1.5, 0.1, 1e300, 42.0, f64::NAN])),
        3 => Kind::StringValue(rng.pick(STRINGS).to_owned()),
        4 => Kind::ListValue(prost_types::ListValue {
            values: (0..rng.below(3))
                .map(|_| json_value(rng, depth + 1))
                .collect(),
        }),
        _ => Kind::StructValue(json_object(rng, depth + 1)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn json_object(rng: &mut Rng, depth: usize) -> prost_types::Struct {
    prost_types::Struct {
        fields: (0..rng.below(4))
            .map(|_| (rng.pick(STRINGS).to_owned(), json_value(rng, depth + 1)))
            .collect(),
    }
}

/// `message` of `descriptor`, decoded from its prost form.
fn dynamic(descriptor: MessageDescriptor, message: &impl prost::Message) -> DynamicMessage {
    DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice()).unwrap()
}

/// One value of `kind` for a field, edge values favoured.
fn value(kind: &Kind, rng: &mut Rng, depth: usize) -> Dynamic {
    match kind {
        Kind::Double => Dynamic::F64(rng.pick(&[
            0.0,
            -0.0,
            0.1,
            1e300,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ])),
        Kind::Float => Dynamic::F32(rng.pick(&[
            0.0,
            -0.0,
            0.1,
            3.4e38,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ])),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Dynamic::I32(rng.pick(&[0, 1, -1, i32::MAX, i32::MIN]))
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Dynamic::I64(rng.pick(&[0, 1, -1, i64::MAX, i64::MIN, 9_007_199_254_740_993]))
        }
        Kind::Uint32 | Kind::Fixed32 => Dynamic::U32(rng.pick(&[0, 1, u32::MAX])),
        Kind::Uint64 | Kind::Fixed64 => Dynamic::U64(rng.pick(&[0, 1, u64::MAX])),
        Kind::Bool => Dynamic::Bool(rng.below(2) == 1),
        Kind::String => Dynamic::String(rng.pick(STRINGS).to_owned()),
        Kind::Bytes => Dynamic::Bytes(
            rng.pick(&[&b""[..], b"\x00\xff", b"abc", b"abcd"])
                .to_vec()
                .into(),
        ),
        Kind::Enum(e) => {
            let mut numbers: Vec<i32> = e.values().map(|v| v.number()).collect();
            numbers.extend([99, -1]);
            Dynamic::EnumNumber(rng.pick(&numbers))
        }
        Kind::Message(m) => Dynamic::Message(match m.full_name() {
            "google.protobuf.Timestamp" => dynamic(m.clone(), &timestamp(rng)),
            "google.protobuf.Duration" => dynamic(m.clone(), &duration(rng)),
            "google.protobuf.FieldMask" => dynamic(m.clone(), &field_mask(rng)),
            "google.protobuf.Struct" => dynamic(m.clone(), &json_object(rng, 0)),
            "google.protobuf.Value" => dynamic(m.clone(), &json_value(rng, 0)),
            _ => filled(m.clone(), rng, depth + 1),
        }),
    }
}

/// A message of `descriptor` with some fields set (some to their default), nested ones too.
pub(super) fn filled(descriptor: MessageDescriptor, rng: &mut Rng, depth: usize) -> DynamicMessage {
    let mut message = DynamicMessage::new(descriptor.clone());
    if depth > 3 {
        return message;
    }
    for field in descriptor.fields() {
        if field.is_map() || rng.below(4) == 0 {
            continue;
        }
        let kind = field.kind();
        let value = if field.is_list() {
            Dynamic::List(
                (0..rng.below(4))
                    .map(|_| value(&kind, rng, depth))
                    .collect(),
            )
        } else {
            value(&kind, rng, depth)
        };
        message.set_field(&field, value);
    }
    message
}

/// Fails unless the generated renderer and the gateway's dynamic serializer agree on `bytes`:
/// the same JSON, or both refusing.
fn agree(descriptor: &MessageDescriptor, render: Render, bytes: &[u8]) {
    let dynamic = DynamicMessage::decode(descriptor.clone(), bytes).unwrap();
    let text = |json: Vec<u8>| String::from_utf8(json).unwrap();
    let expected = keel_gateway::transcode::to_json(&dynamic, None).map(text);
    let generated = (render.encoded)(bytes).map(text);
    match (&expected, &generated) {
        (Ok(expected), Ok(generated)) => {
            assert_eq!(generated, expected, "{}", descriptor.full_name());
        }
        (Err(_), Err(_)) => {}
        _ => panic!(
            "{}: dynamic {expected:?}, generated {generated:?}",
            descriptor.full_name()
        ),
    }
}

#[test]
fn every_message_renders_as_the_dynamic_serializer_does() {
    let pool = pool();
    let mut rng = Rng(0x5eed_cafe_f00d_beef);
    let mut checked = 0;
    for descriptor in pool.all_messages() {
        let Some(render) = renderer(descriptor.full_name()) else {
            continue;
        };
        for _ in 0..300 {
            let message = filled(descriptor.clone(), &mut rng, 0);
            agree(&descriptor, render, &message.encode_to_vec());
        }
        checked += 1;
    }
    assert!(checked > 50, "only {checked} messages have generated JSON");
}

#[test]
fn every_keel_message_has_generated_json() {
    let unsupported: Vec<String> = pool()
        .all_messages()
        .filter(|m| m.package_name().starts_with("keel.") && !m.is_map_entry())
        .map(|m| m.full_name().to_owned())
        .filter(|name| renderer(name).is_none())
        .collect();
    assert!(
        unsupported.is_empty(),
        "{unsupported:?} fall back to the dynamic serializer: give build/json.rs their shapes"
    );
}

#[test]
fn every_route_renders_with_generated_code() {
    let table = keel_gateway::RouteTable::from_pool(&pool())
        .unwrap()
        .rendering_with(renderer);
    for route in table.routes() {
        assert!(
            route.render.is_some(),
            "{} has no renderer",
            route.grpc_path
        );
    }
}

/// The JSON the dynamic serializer writes for `message`, a well-known type of `pool`.
fn dynamic_json(
    pool: &DescriptorPool,
    full_name: &str,
    message: &impl prost::Message,
) -> Result<String, String> {
    let descriptor = pool.get_message_by_name(full_name).unwrap();
    keel_gateway::transcode::to_json(&dynamic(descriptor, message), None)
        .map(|json| String::from_utf8(json).unwrap())
}

fn generated_json<H: Shape<T>, T>(value: &T) -> Result<String, String> {
    serde_json::to_string(&as_::<H, T>(value)).map_err(|e| e.to_string())
}

/// Fails unless `value`, of the well-known type `full_name`, renders as `H` as it does dynamically.
fn same<H: Shape<T>, T: prost::Message + std::fmt::Debug>(
    pool: &DescriptorPool,
    full_name: &str,
    value: &T,
) {
    let dynamic = dynamic_json(pool, full_name, value);
    let generated = generated_json::<H, T>(value);
    assert_eq!(dynamic.is_ok(), generated.is_ok(), "{value:?}");
    assert_eq!(dynamic.ok(), generated.ok(), "{value:?}");
}

#[test]
fn well_known_types_render_as_the_dynamic_serializer_does() {
    let pool = pool();
    let mut rng = Rng(7);
    for _ in 0..500 {
        same::<Timestamp, _>(&pool, "google.protobuf.Timestamp", &timestamp(&mut rng));
        same::<Duration, _>(&pool, "google.protobuf.Duration", &duration(&mut rng));
        same::<FieldMask, _>(&pool, "google.protobuf.FieldMask", &field_mask(&mut rng));
        same::<Struct, _>(&pool, "google.protobuf.Struct", &json_object(&mut rng, 0));
    }
}

#[test]
fn an_empty_answer_is_an_empty_object() {
    let empty = renderer("google.protobuf.Empty").unwrap();
    assert_eq!((empty.encoded)(&[]).unwrap(), b"{}");
    assert_eq!((empty.typed)(&()).unwrap().unwrap(), b"{}");
}

/// A message a handler of this process answered (the gateway's in-process lane) renders as
/// its encoding does; a message of another type is not taken for it.
fn typed_as_encoded<M: prost::Message + std::any::Any + Send + Sync>(full_name: &str, message: M) {
    let render = renderer(full_name).unwrap();
    let typed = (render.typed)(&message).unwrap().unwrap();
    let encoded = (render.encoded)(&message.encode_to_vec()).unwrap();
    assert_eq!(
        String::from_utf8(typed),
        String::from_utf8(encoded),
        "{full_name}"
    );
    assert!((render.typed)(&()).is_none(), "{full_name} is not Empty");
}

#[test]
fn a_message_answered_in_process_renders_as_its_encoding_does() {
    use crate::proto::keel::catalog::v1::Product;
    use crate::proto::keel::todos::v1::{ListTodosResponse, Todo};
    let at = |i: i64| prost_types::Timestamp {
        seconds: 1_764_000_000 + i,
        nanos: 120_000_000,
    };
    let product = Product {
        name: "products/0b5c".into(),
        title: "Tea \"green\" \u{1F375}".into(),
        stock: -3,
        etag: "W/\"1\"".into(),
        price: Some(crate::proto::keel::r#type::v1::Money {
            currency_code: "EUR".into(),
            units: i64::MAX,
        }),
        create_time: Some(at(0)),
        ..Product::default()
    };
    typed_as_encoded("keel.catalog.v1.Product", product);
    let todo = |i: usize| Todo {
        name: format!("users/1/todos/{i}"),
        title: format!("todo {i}"),
        completed: i % 2 == 0,
        create_time: Some(at(i as i64)),
        ..Todo::default()
    };
    let page = ListTodosResponse {
        todos: (0..20).map(todo).collect(),
        next_page_token: "abc".into(),
    };
    typed_as_encoded("keel.todos.v1.ListTodosResponse", page);
    typed_as_encoded(
        "keel.todos.v1.ListTodosResponse",
        ListTodosResponse::default(),
    );
}

#[test]
fn scalars_render_as_proto3_json_says() {
    assert_eq!(
        generated_json::<Decimal, _>(&i64::MIN).unwrap(),
        "\"-9223372036854775808\""
    );
    assert_eq!(
        generated_json::<Decimal, _>(&u64::MAX).unwrap(),
        "\"18446744073709551615\""
    );
    assert_eq!(generated_json::<Float, _>(&f64::NAN).unwrap(), "\"NaN\"");
    assert_eq!(
        generated_json::<Float, _>(&f32::INFINITY).unwrap(),
        "\"Infinity\""
    );
    assert_eq!(generated_json::<Float, _>(&0.1f32).unwrap(), "0.1");
    assert_eq!(
        generated_json::<Base64, _>(&b"\x00\xffab".to_vec()).unwrap(),
        "\"AP9hYg==\""
    );
    assert_eq!(
        generated_json::<List<Decimal>, _>(&vec![1i64, -2]).unwrap(),
        "[\"1\",\"-2\"]"
    );
}
