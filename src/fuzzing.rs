//! Entry points of the fuzz targets (`fuzz/fuzz_targets/*.rs`), kept in the
//! library so that the libFuzzer targets (nightly, `cargo fuzz`) and the
//! stable corpus replay (`tests/fuzz_corpus.rs`, run by CI) call the same
//! code. Each entry takes raw bytes, never panics on bad input, and panics
//! (an `assert!`) only when an invariant of the code under test is broken:
//!
//! - `config`: YAML (and, after a NUL byte, `dotted.path=value` override
//!   lines) through [`Config::from_yaml`]. An error must format with its
//!   location; a loaded config must serialize and load back to the same file.
//! - `filter`: a CEL expression, a NUL byte, then a message (JSON of
//!   [`DlqMessage`], else raw bytes decoded field by field). Compile errors
//!   must point inside the source; evaluation must agree with the evaluation
//!   that binds every variable (the compile-time `uses` shortcut must not
//!   change a result).
//! - `servicebus_atom`: the ATOM count parsers ([`parse_counts`], and the
//!   transfer dead-letter count's) on raw XML, and on entries shaped like
//!   Azure's and the emulator's, whose counts must be read back exactly.
//! - `attributes`: the conversions between each provider's representation and
//!   the model (SQS typed attributes, Pub/Sub messages, Service Bus
//!   application properties and bodies), with the round trips the adapters
//!   document.
//!
//! [`parse_counts`]: crate::backend::servicebus::parse_counts

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::config::{Config, ConfigError};
use crate::filter::{Filter, FilterError};
use crate::model::{AttrValue, Attribute, Attributes, DlqMessage};

/// A fuzz entry: raw bytes in, a panic only when an invariant breaks.
pub type Entry = fn(&[u8]);

/// Every target: its name (the directory under `fuzz/corpus/`) and its entry.
pub const TARGETS: &[(&str, Entry)] = &[
    ("config", config),
    ("filter", filter),
    ("servicebus_atom", servicebus_atom),
    ("attributes", attributes),
];

/// Reads structured values off the fuzz input; past the end it yields zeros,
/// so every input decodes to something.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let got = self.bytes(N);
        out[..got.len()].copy_from_slice(got);
        out
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A length-prefixed (one byte) byte string.
    fn blob(&mut self) -> &'a [u8] {
        let n = self.byte() as usize;
        self.bytes(n)
    }

    fn string(&mut self) -> String {
        String::from_utf8_lossy(self.blob()).into_owned()
    }

    fn opt_string(&mut self) -> Option<String> {
        (self.byte() & 1 == 1).then(|| self.string())
    }

    fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
}

// ---------------------------------------------------------------------------
// config

const CONFIG_ORIGIN: &str = "fuzz.yaml";

/// YAML config text; after a NUL byte, override lines `dotted.path=value`
/// (what `DLQ_BRIDGE__*` variables become).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (yaml, overrides) = match text.split_once('\0') {
        Some((yaml, rest)) => {
            let overrides: Vec<(String, String)> = rest
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                .collect();
            (yaml, overrides)
        }
        None => (text, Vec::new()),
    };
    let config = match Config::from_yaml(yaml, CONFIG_ORIGIN, &overrides) {
        Ok(c) => c,
        Err(e) => return check_config_error(&e),
    };
    check_config(&config);
    // A loaded config serializes back to a file that loads to the same config.
    let written = serde_yaml::to_string(&config).expect("a loaded config serializes");
    let again = Config::from_yaml(&written, "again.yaml", &[])
        .unwrap_or_else(|e| panic!("a loaded config, written back, does not load: {e}\n---\n{written}"));
    let rewritten = serde_yaml::to_string(&again).expect("a loaded config serializes");
    assert_eq!(written, rewritten, "a config changed on a write-and-load round trip");
}

fn check_config_error(e: &ConfigError) {
    let text = e.to_string();
    assert!(!text.trim().is_empty(), "empty config error: {e:?}");
    match e {
        ConfigError::Invalid {
            location,
            field,
            message,
        } => {
            assert!(
                location.starts_with(CONFIG_ORIGIN),
                "error location `{location}` does not name the file"
            );
            if let Some(pos) = location.strip_prefix(CONFIG_ORIGIN).and_then(|p| p.strip_prefix(':')) {
                let parts: Vec<&str> = pos.split(':').collect();
                assert!(
                    parts.len() == 2 && parts.iter().all(|p| p.parse::<usize>().is_ok()),
                    "error location `{location}` is not file:line:column"
                );
            }
            assert!(!field.is_empty(), "error names no field: {e:?}");
            assert!(!message.trim().is_empty(), "error has no message: {e:?}");
        }
        ConfigError::Env { var, .. } => {
            assert!(var.starts_with("DLQ_BRIDGE__"), "override error names `{var}`");
        }
        ConfigError::Read { .. } => panic!("from_yaml reads no file: {e:?}"),
    }
}

/// What `validate` promises about a config it accepted.
fn check_config(c: &Config) {
    let mut names = std::collections::HashSet::new();
    for q in &c.queues {
        assert!(!q.name.trim().is_empty(), "accepted an empty queue name");
        assert!(names.insert(q.name.as_str()), "accepted a duplicate queue `{}`", q.name);
        assert!(!q.reason_attribute.is_empty(), "reason_attribute left unresolved");
        assert!(
            !q.description_attribute.is_empty(),
            "description_attribute left unresolved"
        );
    }
    assert!(c.redrive.concurrency >= 1, "accepted concurrency 0");
    for s in &c.alerts.sinks {
        assert!(s.target().is_some(), "accepted a sink with no single target");
    }
    for s in &c.schedules {
        assert!(
            c.queue(&s.queue).is_some(),
            "accepted a schedule for unknown `{}`",
            s.queue
        );
        assert!(
            s.every.is_some() != s.cron.is_some(),
            "accepted a schedule without one trigger"
        );
        if let Some(f) = &s.filter {
            assert!(
                Filter::compile(f).is_ok(),
                "accepted a schedule filter that does not compile"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// filter

/// A fixed evaluation time, so a run is reproducible.
fn fuzz_now() -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(1_767_225_600, 0).expect("2026-01-01 is a valid time")
}

/// A CEL expression, a NUL byte, then the message to evaluate it against.
pub fn filter(data: &[u8]) {
    let (expr, rest) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(expr) = std::str::from_utf8(expr) else {
        return;
    };
    let filter = match Filter::compile(expr) {
        Ok(f) => f,
        Err(e) => return check_filter_error(expr, &e),
    };
    assert_eq!(filter.source(), expr);
    let msg = fuzz_message(rest);
    let now = fuzz_now();
    let quick = filter.matches(&msg, now);
    let full = filter.matches_reference(&msg, now);
    assert_eq!(
        quick, full,
        "binding only the referenced variables, borrowed, changed the result of `{expr}`"
    );
    assert_eq!(filter.matches(&msg, now), quick, "evaluation is not deterministic");
}

fn check_filter_error(expr: &str, e: &FilterError) {
    let text = e.to_string();
    assert!(text.starts_with("invalid filter"), "{text}");
    match e {
        FilterError::Syntax {
            line,
            column,
            source_line,
            ..
        } => {
            assert!(*line >= 1 && *column >= 1, "position {line}:{column} is not 1-based");
            assert!(
                *column <= source_line.chars().count() + 1,
                "column {column} is past the end of `{source_line}`"
            );
            let lines = expr.lines().count();
            if *line <= lines {
                assert_eq!(
                    expr.lines().nth(line - 1),
                    Some(source_line.as_str()),
                    "the quoted line is not line {line}"
                );
            } else {
                assert!(source_line.is_empty(), "quoted `{source_line}` from past the end");
            }
        }
        FilterError::UnknownVariable {
            name,
            line,
            column,
            source_line,
        } => {
            assert!(!crate::filter::VARIABLES.contains(&name.as_str()));
            assert!(*line >= 1 && *column >= 1, "position {line}:{column} is not 1-based");
            assert_eq!(
                expr.lines().nth(line - 1).unwrap_or(""),
                source_line.as_str(),
                "the quoted line is not line {line}"
            );
        }
        FilterError::UnknownFunction {
            line,
            column,
            source_line,
            ..
        }
        | FilterError::BadArgument {
            line,
            column,
            source_line,
            ..
        }
        | FilterError::TypeMismatch {
            line,
            column,
            source_line,
            ..
        } => {
            assert!(*line >= 1 && *column >= 1, "position {line}:{column} is not 1-based");
            assert_eq!(
                expr.lines().nth(line - 1).unwrap_or(""),
                source_line.as_str(),
                "the quoted line is not line {line}"
            );
        }
        FilterError::TooComplex(why) => {
            assert!(why.contains("the limit is"), "{why}");
        }
    }
}

/// The message a filter input describes: JSON of a [`DlqMessage`] (readable
/// seeds), else the bytes decoded field by field (what mutation explores best).
fn fuzz_message(data: &[u8]) -> DlqMessage {
    if let Ok(m) = serde_json::from_slice::<DlqMessage>(data) {
        return m;
    }
    let mut inp = Input::new(data);
    let id = inp.string();
    let mut attributes = Attributes::new();
    for _ in 0..inp.byte() % 8 {
        let name = inp.string();
        let attr = model_attribute(&mut inp);
        attributes.insert(name, attr);
    }
    let reason = inp.opt_string();
    let description = inp.opt_string();
    let delivery_count = (inp.byte() & 1 == 1).then(|| inp.u32());
    let enqueued_at = (inp.byte() & 1 == 1)
        .then(|| DateTime::<Utc>::from_timestamp_millis(inp.u64() as i64))
        .flatten();
    let source = inp.opt_string();
    let ordering_key = inp.opt_string();
    DlqMessage {
        id,
        body: Bytes::copy_from_slice(inp.rest()),
        attributes,
        properties: Default::default(),
        reason,
        description,
        delivery_count,
        enqueued_at,
        source,
        ordering_key,
    }
}

/// Any model attribute, including type labels no provider would pair with its
/// value (an export file can be edited by hand before `import`).
fn model_attribute(inp: &mut Input) -> Attribute {
    let value = match inp.byte() % 8 {
        0 => AttrValue::String(inp.string()),
        1 => AttrValue::Number(inp.string()),
        2 => AttrValue::Binary(Bytes::copy_from_slice(inp.blob())),
        3 => AttrValue::Bool(inp.byte() & 1 == 1),
        4 => AttrValue::Int(inp.u64() as i64),
        5 => AttrValue::Float(f64::from_bits(inp.u64())),
        6 => match DateTime::<Utc>::from_timestamp_millis(inp.u64() as i64) {
            Some(t) => AttrValue::Timestamp(t),
            None => AttrValue::Timestamp(fuzz_now()),
        },
        _ => AttrValue::Uuid(uuid::Uuid::from_bytes(inp.array())),
    };
    const LABELS: &[&str] = &[
        "String",
        "Number",
        "Binary",
        "String.custom",
        "Number.float",
        "Binary.gif",
        "null",
        "ubyte",
        "ushort",
        "uint",
        "ulong",
        "byte",
        "short",
        "int",
        "float",
        "char",
        "symbol",
        "decimal32",
        "decimal64",
        "decimal128",
        "described:com.microsoft:datetime-offset",
        "described:0x0000000000000001",
    ];
    let data_type = match inp.byte() {
        0..=63 => None,
        64..=127 => Some(inp.string()),
        b => Some(LABELS[b as usize % LABELS.len()].to_string()),
    };
    Attribute { value, data_type }
}

// ---------------------------------------------------------------------------
// servicebus_atom

/// The ATOM count parser: on raw XML (first byte even), or on an entry shaped
/// like the ones Azure and the emulator send, built from the input (odd).
pub fn servicebus_atom(data: &[u8]) {
    #[cfg(feature = "servicebus")]
    servicebus::atom(data);
    #[cfg(not(feature = "servicebus"))]
    let _ = data;
}

// ---------------------------------------------------------------------------
// attributes

/// Message and attribute conversions; the first byte picks which.
pub fn attributes(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 6 {
        #[cfg(feature = "sqs")]
        0 => sqs::from_provider(rest),
        #[cfg(feature = "sqs")]
        1 => sqs::from_model(rest),
        #[cfg(feature = "pubsub")]
        2 => pubsub::round_trip(rest),
        #[cfg(feature = "servicebus")]
        3 => servicebus::from_provider(rest),
        #[cfg(feature = "servicebus")]
        4 => servicebus::from_model(rest),
        #[cfg(feature = "servicebus")]
        5 => servicebus::body(rest),
        _ => {}
    }
}

/// Whether two attribute values are the same, NaN payloads aside.
fn same_value(a: &AttrValue, b: &AttrValue) -> bool {
    match (a, b) {
        (AttrValue::Float(x), AttrValue::Float(y)) => x == y || (x.is_nan() && y.is_nan()),
        _ => a == b,
    }
}

#[cfg(feature = "sqs")]
mod sqs {
    use aws_sdk_sqs::primitives::Blob;
    use aws_sdk_sqs::types::MessageAttributeValue;

    use super::{Input, model_attribute};
    use crate::backend::sqs::{attribute_from_sqs, attribute_to_sqs};
    use crate::model::AttrValue;

    /// An attribute as SQS delivers it: its DataType (`String`, `Number` or
    /// `Binary`, maybe with a custom suffix) and the matching value field.
    /// The model keeps it exactly: converting back gives the same attribute.
    pub fn from_provider(data: &[u8]) {
        let mut inp = Input::new(data);
        let family = ["String", "Number", "Binary"][inp.byte() as usize % 3];
        let suffix = inp.string();
        let data_type = if suffix.is_empty() {
            family.to_string()
        } else {
            format!("{family}.{suffix}")
        };
        let builder = MessageAttributeValue::builder().data_type(&data_type);
        let v = if family == "Binary" {
            builder.binary_value(Blob::new(inp.rest().to_vec()))
        } else {
            builder.string_value(String::from_utf8_lossy(inp.rest()).into_owned())
        }
        .build()
        .expect("data_type is set");
        let a = attribute_from_sqs(&v);
        assert_eq!(a.data_type.as_deref(), Some(data_type.as_str()));
        assert_eq!(
            attribute_to_sqs(&a),
            v,
            "an SQS attribute changed on its way through the model"
        );
    }

    /// Any model attribute to SQS: the DataType is always one SQS accepts and
    /// says which value field is set, and the value survives the way back
    /// (as text, or as bytes for binary).
    pub fn from_model(data: &[u8]) {
        let mut inp = Input::new(data);
        let a = model_attribute(&mut inp);
        let v = attribute_to_sqs(&a);
        let dt = v.data_type();
        let binary = dt.starts_with("Binary");
        assert!(
            binary || dt.starts_with("String") || dt.starts_with("Number"),
            "SQS DataType `{dt}` for {a:?}"
        );
        assert_eq!(
            v.binary_value().is_some(),
            binary,
            "DataType `{dt}` does not match the value field set for {a:?}"
        );
        assert_eq!(v.string_value().is_some(), !binary, "DataType `{dt}` for {a:?}");
        let back = attribute_from_sqs(&v);
        match (&a.value, &back.value) {
            (AttrValue::Binary(x), AttrValue::Binary(y)) => assert_eq!(x, y),
            (_, AttrValue::Binary(_)) => panic!("{a:?} came back binary: {back:?}"),
            _ => assert_eq!(back.as_text(), a.as_text(), "{a:?} came back as {back:?}"),
        }
        // Once in SQS's shape, an attribute is a fixed point.
        assert_eq!(attribute_to_sqs(&back), v);
    }
}

#[cfg(feature = "pubsub")]
mod pubsub {
    use std::collections::HashMap;

    use gcloud_googleapis::pubsub::v1::PubsubMessage;

    use super::Input;
    use crate::backend::pubsub::{
        ATTR_DELIVERY_COUNT, ATTR_SOURCE_PROJECT, ATTR_SOURCE_PUBLISH_TIME, ATTR_SOURCE_SUBSCRIPTION,
        PROP_SOURCE_SUBSCRIPTION, copy_size, message_to_model, pubsub_message,
    };
    use crate::model::{AttrValue, Outgoing};

    const NAMES: &[&str] = &[
        ATTR_SOURCE_SUBSCRIPTION,
        ATTR_SOURCE_PROJECT,
        ATTR_DELIVERY_COUNT,
        ATTR_SOURCE_PUBLISH_TIME,
        "error",
        "error_description",
        "goog-reserved",
    ];

    /// A pulled message to the model and back out as a copy: the data bytes,
    /// the attributes and the ordering key are kept exactly, or the publish
    /// is refused with a reason that holds.
    pub fn round_trip(data: &[u8]) {
        let mut inp = Input::new(data);
        let mut attributes = HashMap::new();
        for _ in 0..inp.byte() % 8 {
            let b = inp.byte();
            let name = if b < 128 {
                NAMES[b as usize % NAMES.len()].to_string()
            } else {
                inp.string()
            };
            attributes.insert(name, inp.string());
        }
        let mut m = PubsubMessage {
            attributes,
            ..Default::default()
        };
        if inp.byte() & 1 == 1 {
            let t = m.publish_time.insert(Default::default());
            t.seconds = inp.u64() as i64;
            t.nanos = inp.u32() as i32;
        }
        let target = inp.opt_string();
        m.message_id = inp.string();
        m.ordering_key = inp.string();
        m.data = bytes::Bytes::copy_from_slice(inp.rest());
        let (model, source_sub) = message_to_model(m.clone(), "fuzz-project", "error", "error_description");
        assert_eq!(model.body, m.data, "data bytes changed");
        assert_eq!(model.id, m.message_id);
        assert_eq!(model.attributes.len(), m.attributes.len());
        for (k, v) in &m.attributes {
            let a = &model.attributes[k];
            assert_eq!(a.value, AttrValue::String(v.clone()));
            assert_eq!(a.data_type, None);
        }
        assert_eq!(
            model.reason.as_ref(),
            m.attributes.get("error").filter(|v| !v.is_empty())
        );
        assert_eq!(model.ordering_key.as_deref().unwrap_or(""), m.ordering_key);
        assert_eq!(
            source_sub.is_some(),
            m.attributes
                .get(ATTR_SOURCE_SUBSCRIPTION)
                .is_some_and(|s| !s.is_empty())
        );
        if let Some(s) = &source_sub {
            assert!(s.starts_with("projects/"), "source subscription `{s}`");
            assert!(model.properties.contains_key(PROP_SOURCE_SUBSCRIPTION));
        }
        // The copy the engine builds (marks aside: they are attributes like any other).
        let copy = Outgoing {
            body: model.body.clone(),
            attributes: model.attributes.clone(),
            properties: model.properties.clone(),
            ordering_key: model.ordering_key.clone(),
            dedup_id: format!("{}-1", model.id),
            original_id: model.id.clone(),
        };
        match pubsub_message(&copy, target.as_deref()) {
            Ok(out) => {
                let size = out.data.len()
                    + out.ordering_key.len()
                    + out.attributes.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
                assert_eq!(
                    copy_size(&copy, target.as_deref()),
                    size,
                    "size reckoned without the message"
                );
                assert_eq!(out.data, m.data, "data bytes changed on the way out");
                assert_eq!(out.ordering_key, m.ordering_key, "ordering key changed");
                let mut expected = m.attributes.clone();
                if let (Some(t), Some(sub)) = (&target, model.properties.get(PROP_SOURCE_SUBSCRIPTION)) {
                    expected.insert(t.clone(), sub.clone());
                }
                assert_eq!(out.attributes, expected, "attributes changed on the way out");
                assert!(!out.data.is_empty() || !out.attributes.is_empty());
            }
            Err(why) => {
                // Pub/Sub's documented limits.
                let mut attrs = m.attributes.clone();
                if let (Some(t), Some(sub)) = (&target, model.properties.get(PROP_SOURCE_SUBSCRIPTION)) {
                    attrs.insert(t.clone(), sub.clone());
                }
                let size =
                    m.data.len() + m.ordering_key.len() + attrs.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
                let over_a_limit = (m.data.is_empty() && attrs.is_empty())
                    || attrs.len() > 100
                    || attrs
                        .iter()
                        .any(|(k, v)| k.len() > 256 || crate::backend::pubsub::reserved_attribute(k) || v.len() > 1024)
                    || size > 10_000_000;
                assert!(over_a_limit, "refused a publishable copy: {why}");
            }
        }
    }
}

#[cfg(feature = "servicebus")]
mod servicebus {
    use bytes::Bytes;
    use fe2o3_amqp_types::messaging::{Body, Data};
    use fe2o3_amqp_types::primitives::{Dec32, Dec64, Dec128, SimpleValue, Symbol, Timestamp, Uuid, Value};
    use serde_amqp::described::Described;
    use serde_amqp::descriptor::Descriptor;

    use super::{Input, model_attribute, same_value};
    use crate::backend::servicebus::{
        attribute_from_amqp, attribute_from_amqp_owned, attribute_to_amqp, body_bytes, body_into_bytes, parse_counts,
        parse_transfer_dead_letter_count,
    };
    use crate::model::AttrValue;

    const SB_NS: &str = "http://schemas.microsoft.com/netservices/2011/06/servicebus";

    /// Descriptors the .NET SDK writes for its own types.
    const DESCRIPTORS: &[&str] = &[
        "com.microsoft:datetime-offset",
        "com.microsoft:timespan",
        "com.microsoft:uri",
    ];

    fn amqp_value(inp: &mut Input) -> SimpleValue {
        match inp.byte() % 22 {
            0 => SimpleValue::Null,
            1 => SimpleValue::Bool(inp.byte() & 1 == 1),
            2 => SimpleValue::Ubyte(inp.byte()),
            3 => SimpleValue::Ushort(inp.u16()),
            4 => SimpleValue::Uint(inp.u32()),
            5 => SimpleValue::Ulong(inp.u64()),
            6 => SimpleValue::Byte(inp.byte() as i8),
            7 => SimpleValue::Short(inp.u16() as i16),
            8 => SimpleValue::Int(inp.u32() as i32),
            9 => SimpleValue::Long(inp.u64() as i64),
            10 => SimpleValue::Float(f32::from_bits(inp.u32()).into()),
            11 => SimpleValue::Double(f64::from_bits(inp.u64()).into()),
            12 => SimpleValue::Decimal32(Dec32::from(inp.array::<4>())),
            13 => SimpleValue::Decimal64(Dec64::from(inp.array::<8>())),
            14 => SimpleValue::Decimal128(Dec128::from(inp.array::<16>())),
            15 => SimpleValue::Char(char::from_u32(inp.u32()).unwrap_or('\u{fffd}')),
            16 => SimpleValue::Timestamp(Timestamp::from_milliseconds(inp.u64() as i64)),
            17 => SimpleValue::Uuid(Uuid::from(inp.array::<16>())),
            18 => SimpleValue::Binary(inp.blob().to_vec().into()),
            19 => SimpleValue::String(inp.string()),
            20 => SimpleValue::Symbol(Symbol::from(inp.string())),
            _ => {
                let b = inp.byte();
                let descriptor = if b < 128 {
                    Descriptor::Name(Symbol::from(DESCRIPTORS[b as usize % DESCRIPTORS.len()]))
                } else if b < 192 {
                    Descriptor::Code(inp.u64())
                } else {
                    Descriptor::Name(Symbol::from(inp.string()))
                };
                // The inner types the .NET SDK's described values carry.
                let value = match inp.byte() % 3 {
                    0 => Value::Long(inp.u64() as i64),
                    1 => Value::String(inp.string()),
                    _ => Value::Binary(inp.blob().to_vec().into()),
                };
                SimpleValue::Described(Box::new(Described { descriptor, value }))
            }
        }
    }

    /// Every application property Service Bus delivers survives the model:
    /// the copy carries the same AMQP type and value (module docs of the
    /// adapter, "attributes").
    pub fn from_provider(data: &[u8]) {
        let mut inp = Input::new(data);
        let v = amqp_value(&mut inp);
        let a = attribute_from_amqp(&v);
        let owned = attribute_from_amqp_owned(v.clone());
        assert!(
            same_value(&owned.value, &a.value) && owned.data_type == a.data_type,
            "a lease's attribute {owned:?} differs from a browse's {a:?}"
        );
        // An export (or a purge's backup) reads back as what was written.
        let json = serde_json::to_string(&a).expect("an attribute serializes");
        let read: crate::model::Attribute =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{a:?} exported as {json} does not read back: {e}"));
        assert!(
            same_value(&read.value, &a.value) && read.data_type == a.data_type,
            "{a:?} exported as {json} read back as {read:?}"
        );
        let back = attribute_to_amqp(&a).unwrap_or_else(|e| panic!("{v:?} → {a:?} cannot go back: {e}"));
        assert_eq!(back, v, "an application property changed type or value (model: {a:?})");
    }

    /// Any model attribute either converts or is refused with a reason; what
    /// converts keeps its value (timestamps to AMQP's millisecond precision,
    /// SQS numbers as strings) and is a fixed point from then on.
    pub fn from_model(data: &[u8]) {
        let mut inp = Input::new(data);
        let a = model_attribute(&mut inp);
        let Ok(v) = attribute_to_amqp(&a) else {
            return;
        };
        let back = attribute_from_amqp(&v);
        if a.data_type.is_none() {
            let expected = match &a.value {
                AttrValue::Number(n) => AttrValue::String(n.clone()),
                AttrValue::Timestamp(t) => match chrono::DateTime::from_timestamp_millis(t.timestamp_millis()) {
                    Some(t) => AttrValue::Timestamp(t),
                    None => AttrValue::Int(t.timestamp_millis()),
                },
                other => other.clone(),
            };
            assert!(same_value(&back.value, &expected), "{a:?} came back as {back:?}");
        }
        assert_eq!(
            attribute_to_amqp(&back).as_ref(),
            Ok(&v),
            "not a fixed point: {a:?} → {v:?} → {back:?}"
        );
    }

    /// The body is the data sections' bytes, concatenated exactly.
    pub fn body(data: &[u8]) {
        let mut inp = Input::new(data);
        let mut sections = Vec::new();
        let mut expected = Vec::new();
        for _ in 0..inp.byte() % 6 {
            let chunk = inp.blob();
            expected.extend_from_slice(chunk);
            sections.push(Data(chunk.to_vec().into()));
        }
        if sections.is_empty() {
            return;
        }
        let body = Body::Data(sections.into());
        let (bytes, note) = body_bytes(&body);
        assert_eq!(bytes, Bytes::from(expected), "data sections changed");
        assert_eq!(note, None);
        assert_eq!(
            body_into_bytes(body),
            (bytes, note),
            "a lease's body differs from a browse's"
        );
    }

    pub fn atom(data: &[u8]) {
        let Some((&mode, rest)) = data.split_first() else {
            return;
        };
        if mode & 1 == 0 {
            let Ok(xml) = std::str::from_utf8(rest) else {
                return;
            };
            if let Some((_, dead)) = parse_counts(xml) {
                assert!(
                    xml.contains("DeadLetterMessageCount"),
                    "a dead-letter count ({dead}) from XML without one"
                );
            }
            if let Some(transfer) = parse_transfer_dead_letter_count(xml) {
                assert!(
                    xml.contains("TransferDeadLetterMessageCount"),
                    "a transfer dead-letter count ({transfer}) from XML without one"
                );
            }
            return;
        }
        let mut inp = Input::new(rest);
        let active = inp.u64();
        let dead = inp.u64();
        // A namespace prefix (any XML name), padding and an escaped title.
        let prefix: String = inp.blob().iter().map(|b| (b'a' + b % 26) as char).take(12).collect();
        // `xml...` prefixes are reserved by the XML namespaces spec.
        let prefix = if prefix.is_empty() {
            "d2p1".to_string()
        } else if prefix.starts_with("xml") {
            format!("p{prefix}")
        } else {
            prefix
        };
        let pad = " \n\t\r"
            .chars()
            .cycle()
            .take(inp.byte() as usize % 8)
            .collect::<String>();
        let title = escape(&inp.string());
        let shape = inp.byte() % 3;
        // Read last, so that inputs written before it decode as they did.
        let transfer = inp.u64();
        let xml = match shape {
            0 => format!(
                r#"<?xml version="1.0" encoding="utf-8"?><entry xmlns="http://www.w3.org/2005/Atom"><title type="text">{title}</title><content type="application/xml"><QueueDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect" xmlns:i="http://www.w3.org/2001/XMLSchema-instance"><MessageCount>{total}</MessageCount><CountDetails xmlns:{prefix}="{SB_NS}"><{prefix}:ActiveMessageCount>{pad}{active}{pad}</{prefix}:ActiveMessageCount><{prefix}:DeadLetterMessageCount>{pad}{dead}{pad}</{prefix}:DeadLetterMessageCount><{prefix}:ScheduledMessageCount>0</{prefix}:ScheduledMessageCount><{prefix}:TransferDeadLetterMessageCount>{transfer}</{prefix}:TransferDeadLetterMessageCount></CountDetails></QueueDescription></content></entry>"#,
                total = active.wrapping_add(dead),
            ),
            // The default namespace instead of a prefix; no active count.
            1 => format!(
                r#"<entry xmlns="http://www.w3.org/2005/Atom"><title>{title}</title><content><SubscriptionDescription><CountDetails><DeadLetterMessageCount xmlns="{SB_NS}">{pad}{dead}</DeadLetterMessageCount></CountDetails></SubscriptionDescription></content></entry>"#
            ),
            // Azure's answer for a missing entity: an empty feed.
            _ => format!(
                r#"<feed xmlns="http://www.w3.org/2005/Atom"><title type="text">{title}</title><subtitle type="text">This is the list of publicly-listed services currently available.</subtitle><link rel="self" href="https://ns/{prefix}"/></feed>"#
            ),
        };
        let expected = match shape {
            0 => Some((active, dead)),
            1 => Some((0, dead)),
            _ => None,
        };
        assert_eq!(parse_counts(&xml), expected, "misread:\n{xml}");
        // Its name ends like the dead-letter count's: never taken for it.
        let expected_transfer = (shape == 0).then_some(transfer);
        assert_eq!(
            parse_transfer_dead_letter_count(&xml),
            expected_transfer,
            "misread:\n{xml}"
        );
    }

    fn escape(text: &str) -> String {
        text.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
            .chars()
            .filter(|c| !c.is_control() || matches!(c, '\n' | '\t'))
            .collect()
    }
}
