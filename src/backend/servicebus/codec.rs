//! The AMQP message and the provider-neutral model, both ways: the system
//! properties and annotations a DLQ message is read from, its body's kind
//! (which its copy gets back), application properties as typed attributes,
//! and the message's `id` and its copy's MessageId. Apart from the adapter
//! because none of it needs a broker: the `attributes` fuzz target and the
//! unit tests drive it directly.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::messaging::{AmqpSequence, AmqpValue, Batch, Body, Data, Message, MessageId, Properties};
use fe2o3_amqp_types::primitives::{
    Binary, Dec32, Dec64, Dec128, SimpleValue, Symbol, Timestamp, Uuid as AmqpUuid, Value,
};
use sha2::{Digest, Sha256};

use super::{DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON, Result};
use crate::model::{AttrValue, Attribute};

/// [`PROP_BODY_TYPE`](super::PROP_BODY_TYPE)s: the body was an amqp-value
/// section holding a string (the body is its UTF-8), a binary (the body is
/// its bytes), or another value (the body is its AMQP encoding); or
/// amqp-sequence sections (the body is the AMQP encoding of the list of
/// their lists).
pub const BODY_VALUE_STRING: &str = "amqp-value";
pub const BODY_VALUE_BINARY: &str = "amqp-value-binary";
pub const BODY_VALUE_ENCODED: &str = "amqp-value-encoded";
pub const BODY_SEQUENCE: &str = "amqp-sequence";

/// Service Bus's limit on a MessageId.
const MAX_MESSAGE_ID: usize = 128;

/// The fields the peeked and received message types both have.
#[derive(Debug, PartialEq)]
pub(super) struct Fields {
    pub(super) message_id: Option<String>,
    pub(super) sequence_number: i64,
    pub(super) correlation_id: Option<String>,
    /// The CorrelationId's AMQP type when not a string (`uuid`, `ulong`,
    /// `binary`): JMS clients send those, and a copy must match as the
    /// original did.
    pub(super) correlation_id_type: Option<&'static str>,
    pub(super) subject: Option<String>,
    pub(super) content_type: Option<String>,
    pub(super) reply_to: Option<String>,
    pub(super) reply_to_session_id: Option<String>,
    pub(super) to: Option<String>,
    pub(super) partition_key: Option<String>,
    pub(super) session_id: Option<String>,
    pub(super) time_to_live: Option<Duration>,
    pub(super) dead_letter_source: Option<String>,
    pub(super) reason: Option<String>,
    pub(super) description: Option<String>,
    pub(super) delivery_count: Option<u32>,
    pub(super) enqueued_at: DateTime<Utc>,
}

/// The system properties of a message, read as azservicebus reads them
/// (`ServiceBusReceivedMessage`), but tolerant of unexpected types: a
/// message this adapter cannot interpret still goes through.
pub(super) fn fields_of(m: &Message<Body<Value>>) -> Fields {
    fields_with(m, m.properties.clone())
}

/// [`fields_of`] of a message the caller owns: its properties' strings move
/// into the fields instead of being copied (the message keeps none).
pub(super) fn fields_taking(m: &mut Message<Body<Value>>) -> Fields {
    let props = m.properties.take();
    fields_with(m, props)
}

fn fields_with(m: &Message<Body<Value>>, props: Option<Properties>) -> Fields {
    let id = |v: MessageId| match v {
        MessageId::String(s) => s,
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => format!("{u:x}"),
        // Two hex digits a byte: 01 02 was "12", which 0x12 also gave.
        MessageId::Binary(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
    };
    let id_type = |v: &MessageId| match v {
        MessageId::String(_) => None,
        MessageId::Ulong(_) => Some("ulong"),
        MessageId::Uuid(_) => Some("uuid"),
        MessageId::Binary(_) => Some("binary"),
    };
    let annotation_str = |k: &str| match annotation(m, k) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let app_str = |k: &str| match m.application_properties.as_ref().and_then(|a| a.0.get(k)) {
        Some(SimpleValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let enqueued_ms = match annotation(m, "x-opt-enqueued-time") {
        Some(Value::Timestamp(t)) => t.milliseconds(),
        _ => 0,
    };
    let props = props.unwrap_or_default();
    Fields {
        message_id: props.message_id.map(id),
        sequence_number: sequence_number(m).unwrap_or_default(),
        correlation_id_type: props.correlation_id.as_ref().and_then(id_type),
        correlation_id: props.correlation_id.map(id),
        subject: props.subject,
        content_type: props.content_type.map(|s| s.0),
        reply_to: props.reply_to,
        reply_to_session_id: props.reply_to_group_id,
        to: props.to,
        partition_key: annotation_str("x-opt-partition-key"),
        session_id: props.group_id,
        time_to_live: m
            .header
            .as_ref()
            .and_then(|h| h.ttl)
            .map(|ms| Duration::from_millis(ms as u64)),
        dead_letter_source: annotation_str("x-opt-deadletter-source"),
        reason: app_str(DEAD_LETTER_REASON),
        description: app_str(DEAD_LETTER_DESCRIPTION),
        delivery_count: m.header.as_ref().map(|h| h.delivery_count.saturating_add(1)),
        enqueued_at: DateTime::<Utc>::from_timestamp_millis(enqueued_ms).unwrap_or_default(),
    }
}

/// A CorrelationId of AMQP type `ty` (`uuid`, `ulong`, `binary`) from its
/// text in the model; `None` when the text is not of that type (an import
/// line edited by hand), and the copy keeps it as a string.
pub(super) fn typed_message_id(text: &str, ty: &str) -> Option<MessageId> {
    match ty {
        "ulong" => text.parse().ok().map(MessageId::Ulong),
        "uuid" => uuid::Uuid::parse_str(text)
            .ok()
            .map(|u| MessageId::Uuid(u.into_bytes().into())),
        "binary" if text.len().is_multiple_of(2) => (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()
            .map(|b| MessageId::Binary(b.into())),
        _ => None,
    }
}

/// A message annotation by its symbol key.
pub(super) fn annotation<'a>(m: &'a Message<Body<Value>>, key: &str) -> Option<&'a Value> {
    m.message_annotations
        .as_ref()?
        .0
        .iter()
        .find_map(|(k, v)| matches!(k, OwnedKey::Symbol(s) if s.0 == key).then_some(v))
}

pub(super) fn sequence_number(m: &Message<Body<Value>>) -> Option<i64> {
    match annotation(m, "x-opt-sequence-number")? {
        Value::Long(n) => Some(*n),
        _ => None,
    }
}

/// Service Bus's `x-opt-message-state` 1: the message was deferred.
pub(super) fn is_deferred(m: &Message<Body<Value>>) -> bool {
    matches!(
        annotation(m, "x-opt-message-state"),
        Some(Value::Long(1) | Value::Int(1))
    )
}

/// The body bytes, and a note when the body was not data sections.
#[doc(hidden)]
pub fn body_bytes(body: &Body<Value>) -> (Bytes, Option<&'static str>) {
    match body {
        Body::Data(sections) => {
            if sections.len() == 1 {
                (Bytes::copy_from_slice(sections[0].0.as_ref()), None)
            } else {
                let mut all = Vec::new();
                for s in sections.iter() {
                    all.extend_from_slice(s.0.as_ref());
                }
                (Bytes::from(all), None)
            }
        }
        Body::Value(v) => match &v.0 {
            Value::String(s) => (Bytes::from(s.clone()), Some(BODY_VALUE_STRING)),
            Value::Binary(b) => (Bytes::copy_from_slice(b.as_ref()), Some(BODY_VALUE_BINARY)),
            other => (Bytes::from(encode_value(other)), Some(BODY_VALUE_ENCODED)),
        },
        Body::Sequence(sections) => {
            let lists: Vec<&Vec<Value>> = sections.iter().map(|s| &s.0).collect();
            (Bytes::from(encode_value(&lists)), Some(BODY_SEQUENCE))
        }
        Body::Empty => (Bytes::new(), None),
    }
}

/// [`body_bytes`] of a body that is no longer needed: a single data
/// section (what every SDK sends) becomes the bytes without a copy.
pub fn body_into_bytes(body: Body<Value>) -> (Bytes, Option<&'static str>) {
    match body {
        Body::Data(mut sections) if sections.len() == 1 => {
            let data = sections.pop().expect("one section");
            (Bytes::from(data.0.into_vec()), None)
        }
        other => body_bytes(&other),
    }
}

/// The AMQP encoding of a body's value or sequences. Values decoded from the
/// wire always encode again.
fn encode_value(v: &impl serde::Serialize) -> Vec<u8> {
    serde_amqp::to_vec(v).unwrap_or_default()
}

/// The copy's body: the section kind the original had (`body_type`, from
/// [`body_bytes`]), so that a consumer reads the copy as it would have read
/// the original: a JMS TextMessage is an amqp-value string, a MapMessage an
/// amqp-value map, a StreamMessage amqp-sequence sections.
#[doc(hidden)]
pub fn copy_body(body: &Bytes, body_type: Option<&str>) -> Result<Body<Value>, String> {
    let undecodable = |e: serde_amqp::Error| {
        format!("the body (body_type {body_type:?}) is not the AMQP encoding it was read as: {e}")
    };
    Ok(match body_type {
        Some(BODY_VALUE_STRING) => match std::str::from_utf8(body) {
            Ok(s) => Body::Value(AmqpValue(Value::String(s.to_string()))),
            Err(_) => return Err("the body (body_type amqp-value, a string) is not UTF-8".into()),
        },
        Some(BODY_VALUE_BINARY) => Body::Value(AmqpValue(Value::Binary(Binary::from(body.to_vec())))),
        Some(BODY_VALUE_ENCODED) => Body::Value(AmqpValue(serde_amqp::from_slice(body).map_err(undecodable)?)),
        Some(BODY_SEQUENCE) => {
            let lists: Vec<Vec<Value>> = serde_amqp::from_slice(body).map_err(undecodable)?;
            if lists.is_empty() {
                return Err("the body (body_type amqp-sequence) holds no sequence section".into());
            }
            Body::Sequence(Batch::from(lists.into_iter().map(AmqpSequence).collect::<Vec<_>>()))
        }
        _ => Body::Data(Batch::from(vec![Data(Binary::from(body.to_vec()))])),
    })
}

/// `m` (the SDK's message, which has a data section) with `body` instead.
pub(super) fn with_body(m: Message<Data>, body: Body<Value>) -> Message<Body<Value>> {
    Message {
        header: m.header,
        delivery_annotations: m.delivery_annotations,
        message_annotations: m.message_annotations,
        properties: m.properties,
        application_properties: m.application_properties,
        body,
        footer: m.footer,
    }
}

/// A message's `id`: its MessageId and its SequenceNumber (`order-42@1187`),
/// or `seq-1187` when it has no MessageId. A MessageId alone does not name
/// one message: senders choose them, and reuse them. Two DLQ messages under
/// one MessageId would share a copy MessageId, so with duplicate detection on
/// the destination the second copy would be dropped, and its original then
/// completed; and a pass's seen-set would skip the second as already
/// examined. The sequence number is unique in the entity and stays with the
/// message in its DLQ, so a crash-resend still gets the same copy MessageId.
pub(super) fn message_key(message_id: Option<&str>, sequence_number: i64) -> String {
    match message_id {
        Some(id) => format!("{id}@{sequence_number}"),
        None => format!("seq-{sequence_number}"),
    }
}

/// The copy's MessageId: the engine's dedup ID (`<original>-<count>`) and
/// the DLQ's `scope` (`order-42@1187-1~3f9a2c1b`), hashed when longer than
/// Service Bus allows. Without the scope, one message that failed in two
/// subscriptions of a topic (one MessageId, and the topic's one sequence
/// number) gave both DLQs' copies one MessageId: with duplicate detection on
/// the topic, the second redrive's copy was accepted, dropped as a
/// duplicate, and its original completed. A resend from the same DLQ (after
/// a crash) still gets the same MessageId.
pub(super) fn copy_message_id(dedup_id: &str, scope: &str) -> String {
    let id = format!("{dedup_id}~{scope}");
    if id.len() <= MAX_MESSAGE_ID {
        return id;
    }
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("dlq-bridge-{hex}")
}

/// A DLQ's part of its copies' MessageIds: 8 hex digits of its path (entity
/// names are case-insensitive, so is this).
pub(super) fn copy_scope(dlq_path: &str) -> String {
    let digest = Sha256::digest(dlq_path.to_ascii_lowercase().as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

fn typed(value: AttrValue, t: &str) -> Attribute {
    Attribute {
        value,
        data_type: Some(t.to_string()),
    }
}

fn plain(value: AttrValue) -> Attribute {
    Attribute { value, data_type: None }
}

/// [`attribute_from_amqp`] of a value that is no longer needed: text moves
/// into the attribute instead of being copied.
pub fn attribute_from_amqp_owned(v: SimpleValue) -> Attribute {
    match v {
        SimpleValue::String(s) => plain(AttrValue::String(s)),
        other => attribute_from_amqp(&other),
    }
}

pub fn attribute_from_amqp(v: &SimpleValue) -> Attribute {
    match v {
        SimpleValue::Null => typed(AttrValue::String(String::new()), "null"),
        SimpleValue::Bool(b) => plain(AttrValue::Bool(*b)),
        SimpleValue::Ubyte(n) => typed(AttrValue::Int(*n as i64), "ubyte"),
        SimpleValue::Ushort(n) => typed(AttrValue::Int(*n as i64), "ushort"),
        SimpleValue::Uint(n) => typed(AttrValue::Int(*n as i64), "uint"),
        SimpleValue::Ulong(n) => match i64::try_from(*n) {
            Ok(i) => typed(AttrValue::Int(i), "ulong"),
            Err(_) => typed(AttrValue::Number(n.to_string()), "ulong"),
        },
        SimpleValue::Byte(n) => typed(AttrValue::Int(*n as i64), "byte"),
        SimpleValue::Short(n) => typed(AttrValue::Int(*n as i64), "short"),
        SimpleValue::Int(n) => typed(AttrValue::Int(*n as i64), "int"),
        SimpleValue::Long(n) => plain(AttrValue::Int(*n)),
        SimpleValue::Float(f) => typed(AttrValue::Float(f.into_inner() as f64), "float"),
        SimpleValue::Double(f) => plain(AttrValue::Float(f.into_inner())),
        SimpleValue::Decimal32(d) => typed(
            AttrValue::Binary(Bytes::copy_from_slice(&d.clone().into_inner())),
            "decimal32",
        ),
        SimpleValue::Decimal64(d) => typed(
            AttrValue::Binary(Bytes::copy_from_slice(&d.clone().into_inner())),
            "decimal64",
        ),
        SimpleValue::Decimal128(d) => typed(
            AttrValue::Binary(Bytes::copy_from_slice(&d.clone().into_inner())),
            "decimal128",
        ),
        SimpleValue::Char(c) => typed(AttrValue::String(c.to_string()), "char"),
        // AMQP timestamps span ±292 million years, chrono's ±262,000: one
        // outside that is kept as its milliseconds, labelled, so the copy
        // still carries a timestamp (found by the `attributes` fuzz target).
        SimpleValue::Timestamp(t) => match DateTime::<Utc>::from_timestamp_millis(t.milliseconds()) {
            Some(ts) => plain(AttrValue::Timestamp(ts)),
            None => typed(AttrValue::Int(t.milliseconds()), "timestamp"),
        },
        SimpleValue::Uuid(u) => plain(AttrValue::Uuid(uuid::Uuid::from_bytes(u.clone().into_inner()))),
        SimpleValue::Binary(b) => plain(AttrValue::Binary(Bytes::copy_from_slice(b.as_ref()))),
        SimpleValue::String(s) => plain(AttrValue::String(s.clone())),
        SimpleValue::Symbol(s) => typed(AttrValue::String(s.0.clone()), "symbol"),
        SimpleValue::Described(d) => {
            let descriptor = match &d.descriptor {
                serde_amqp::descriptor::Descriptor::Name(s) => s.0.clone(),
                serde_amqp::descriptor::Descriptor::Code(c) => format!("0x{c:016x}"),
            };
            let inner = match &d.value {
                Value::Long(n) => AttrValue::Int(*n),
                Value::String(s) => AttrValue::String(s.clone()),
                Value::Binary(b) => AttrValue::Binary(Bytes::copy_from_slice(b.as_ref())),
                other => AttrValue::String(format!("{other:?}")),
            };
            typed(inner, &format!("described:{descriptor}"))
        }
    }
}

pub fn attribute_to_amqp(a: &Attribute) -> Result<SimpleValue, String> {
    let t = a.data_type.as_deref().unwrap_or("");
    let int = |i: i64| -> Result<SimpleValue, String> {
        let range = |_| format!("{i} does not fit AMQP type {t}");
        Ok(match t {
            "ubyte" => SimpleValue::Ubyte(u8::try_from(i).map_err(range)?),
            "ushort" => SimpleValue::Ushort(u16::try_from(i).map_err(range)?),
            "uint" => SimpleValue::Uint(u32::try_from(i).map_err(range)?),
            "ulong" => SimpleValue::Ulong(u64::try_from(i).map_err(range)?),
            "byte" => SimpleValue::Byte(i8::try_from(i).map_err(range)?),
            "short" => SimpleValue::Short(i16::try_from(i).map_err(range)?),
            "int" => SimpleValue::Int(i32::try_from(i).map_err(range)?),
            "timestamp" => SimpleValue::Timestamp(Timestamp::from_milliseconds(i)),
            _ => SimpleValue::Long(i),
        })
    };
    if let Some(descriptor) = t.strip_prefix("described:") {
        let value = match &a.value {
            AttrValue::Int(n) => Value::Long(*n),
            AttrValue::Binary(b) => Value::Binary(b.to_vec().into()),
            _ => Value::String(a.as_text()),
        };
        let descriptor = match descriptor.strip_prefix("0x").map(|h| u64::from_str_radix(h, 16)) {
            Some(Ok(code)) => serde_amqp::descriptor::Descriptor::Code(code),
            _ => serde_amqp::descriptor::Descriptor::Name(Symbol::from(descriptor)),
        };
        return Ok(SimpleValue::Described(Box::new(serde_amqp::described::Described {
            descriptor,
            value,
        })));
    }
    Ok(match &a.value {
        AttrValue::String(s) => match t {
            "null" if s.is_empty() => SimpleValue::Null,
            "symbol" => SimpleValue::Symbol(Symbol::from(s.as_str())),
            "char" if s.chars().count() == 1 => SimpleValue::Char(s.chars().next().expect("one char")),
            _ => SimpleValue::String(s.clone()),
        },
        AttrValue::Number(n) => match (t, n.parse::<u64>()) {
            ("ulong", Ok(u)) => SimpleValue::Ulong(u),
            _ => SimpleValue::String(n.clone()),
        },
        AttrValue::Binary(b) => match t {
            "decimal32" => SimpleValue::Decimal32(Dec32::try_from(b.as_ref()).map_err(|e| format!("{e:?}"))?),
            "decimal64" => SimpleValue::Decimal64(Dec64::try_from(b.as_ref()).map_err(|e| format!("{e:?}"))?),
            "decimal128" => SimpleValue::Decimal128(Dec128::try_from(b.as_ref()).map_err(|e| format!("{e:?}"))?),
            _ => SimpleValue::Binary(b.to_vec().into()),
        },
        AttrValue::Bool(b) => SimpleValue::Bool(*b),
        AttrValue::Int(i) => int(*i)?,
        AttrValue::Float(f) => match t {
            "float" => SimpleValue::Float((*f as f32).into()),
            _ => SimpleValue::Double((*f).into()),
        },
        AttrValue::Timestamp(ts) => SimpleValue::Timestamp(Timestamp::from_milliseconds(ts.timestamp_millis())),
        AttrValue::Uuid(u) => SimpleValue::Uuid(AmqpUuid::from(*u.as_bytes())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_taken_from_a_message_are_the_fields_read_from_it() {
        use fe2o3_amqp_types::messaging::{ApplicationProperties, Header, MessageAnnotations};
        for (id, correlation) in [
            (MessageId::String("order-1".into()), MessageId::Ulong(7)),
            (
                MessageId::Uuid(AmqpUuid::from([9u8; 16])),
                MessageId::Binary(vec![0u8, 1, 254].into()),
            ),
        ] {
            let props = Properties {
                message_id: Some(id),
                correlation_id: Some(correlation),
                subject: Some("subject".into()),
                content_type: Some(Symbol::from("application/json")),
                reply_to: Some("replies".into()),
                reply_to_group_id: Some("reply-session".into()),
                to: Some("orders".into()),
                group_id: Some("session-1".into()),
                ..Default::default()
            };
            let mut annotations = MessageAnnotations::default();
            annotations.insert(OwnedKey::from("x-opt-sequence-number"), Value::Long(42));
            annotations.insert(OwnedKey::from("x-opt-partition-key"), Value::String("pk".into()));
            annotations.insert(
                OwnedKey::from("x-opt-enqueued-time"),
                Value::Timestamp(Timestamp::from_milliseconds(1_704_164_645_123)),
            );
            let app = ApplicationProperties::builder()
                .insert(DEAD_LETTER_REASON, "Timeout")
                .insert(DEAD_LETTER_DESCRIPTION, "took 30s")
                .build();
            let mut m: Message<Body<Value>> = Message::builder()
                .header(Header {
                    ttl: Some(60_000),
                    delivery_count: 2,
                    ..Default::default()
                })
                .properties(props)
                .message_annotations(annotations)
                .application_properties(app)
                .body(Body::Value(AmqpValue(Value::Null)))
                .build();
            let read = fields_of(&m);
            assert_eq!(read.sequence_number, 42);
            assert_eq!(read.reason.as_deref(), Some("Timeout"));
            assert_eq!(fields_taking(&mut m), read);
            assert!(m.properties.is_none(), "taken");
        }
    }

    #[test]
    fn amqp_types_round_trip() {
        for v in [
            SimpleValue::Int(-7),
            SimpleValue::Long(1 << 40),
            SimpleValue::Double(1.5.into()),
            SimpleValue::Float(0.25f32.into()),
            SimpleValue::Bool(true),
            SimpleValue::String("acme".into()),
            SimpleValue::Symbol(Symbol::from("sym")),
            SimpleValue::Binary(vec![0u8, 255].into()),
            SimpleValue::Uuid(AmqpUuid::from([7u8; 16])),
            SimpleValue::Timestamp(Timestamp::from_milliseconds(1_704_164_645_123)),
            SimpleValue::Ubyte(200),
            SimpleValue::Ushort(60000),
            SimpleValue::Uint(4_000_000_000),
            SimpleValue::Ulong(u64::MAX),
            SimpleValue::Byte(-5),
            SimpleValue::Short(-300),
            SimpleValue::Char('é'),
            SimpleValue::Null,
            SimpleValue::Decimal128(Dec128::from([3u8; 16])),
            // Outside chrono's range (the `attributes` fuzz target's first find).
            SimpleValue::Timestamp(Timestamp::from_milliseconds(i64::MAX)),
            SimpleValue::Timestamp(Timestamp::from_milliseconds(i64::MIN)),
        ] {
            let a = attribute_from_amqp(&v);
            assert_eq!(attribute_to_amqp(&a).unwrap(), v, "{a:?}");
        }
    }

    /// A CorrelationId that is not a string (JMS clients send uuid, ulong
    /// and binary ones) is read as text with its type, and made again from
    /// them for the copy: it became a string, and a binary 01 02 read as
    /// "12", which 0x12 also gave.
    #[test]
    fn a_typed_correlation_id_is_made_again_from_its_text_and_type() {
        for id in [
            MessageId::Ulong(12345),
            MessageId::Uuid(AmqpUuid::from([0x6fu8; 16])),
            MessageId::Binary(vec![1u8, 2].into()),
            MessageId::Binary(vec![0x12u8].into()),
        ] {
            let m = Message::builder()
                .properties(Properties {
                    correlation_id: Some(id.clone()),
                    ..Default::default()
                })
                .body(Body::Value(AmqpValue(Value::Null)))
                .build();
            let f = fields_of(&m);
            let (text, ty) = (f.correlation_id.unwrap(), f.correlation_id_type.unwrap());
            assert_eq!(typed_message_id(&text, ty), Some(id), "{text} ({ty})");
        }
        assert_eq!(
            typed_message_id("0102", "binary"),
            Some(MessageId::Binary(vec![1u8, 2].into()))
        );
        // Text that is not of its type (an import line edited by hand) stays a string.
        assert_eq!(typed_message_id("12x", "ulong"), None);
        assert_eq!(typed_message_id("abc", "binary"), None);
        let m = Message::builder()
            .properties(Properties {
                correlation_id: Some(MessageId::String("req-1".into())),
                ..Default::default()
            })
            .body(Body::Value(AmqpValue(Value::Null)))
            .build();
        assert_eq!(fields_of(&m).correlation_id_type, None);
    }

    #[test]
    fn long_message_ids_are_hashed_to_fit() {
        assert_eq!(copy_message_id("abc-1", "0a1b2c3d"), "abc-1~0a1b2c3d");
        let long = copy_message_id(&"x".repeat(200), "0a1b2c3d");
        assert!(long.len() <= MAX_MESSAGE_ID && long.starts_with("dlq-bridge-"));
    }

    /// One message that failed in two subscriptions of a topic: its copies
    /// from the two DLQs differ, so a topic's duplicate detection keeps both.
    #[test]
    fn copies_of_one_message_from_two_dlqs_have_two_message_ids() {
        let a = copy_scope("orders/Subscriptions/billing/$DeadLetterQueue");
        let b = copy_scope("orders/Subscriptions/shipping/$DeadLetterQueue");
        assert_ne!(
            copy_message_id("order-42@1187-1", &a),
            copy_message_id("order-42@1187-1", &b)
        );
        assert_eq!(a.len(), 8);
        assert_eq!(
            a,
            copy_scope("ORDERS/subscriptions/Billing/$deadletterqueue"),
            "case-insensitive"
        );
    }

    #[test]
    fn a_copy_has_the_body_section_kind_and_value_of_its_original() {
        use fe2o3_amqp_types::primitives::OrderedMap;
        let mut map = OrderedMap::new();
        map.insert(Value::String("qty".into()), Value::Int(3));
        map.insert(Value::String("blob".into()), Value::Binary(vec![0u8, 255].into()));
        let bodies = [
            Body::Value(AmqpValue(Value::String("héllo".into()))),
            Body::Value(AmqpValue(Value::Binary(vec![0xc3u8, 0x28].into()))),
            Body::Value(AmqpValue(Value::Map(map))),
            Body::Value(AmqpValue(Value::Long(-42))),
            Body::Value(AmqpValue(Value::Null)),
            Body::Sequence(Batch::from(vec![
                AmqpSequence(vec![Value::Int(1), Value::String("two".into())]),
                AmqpSequence(vec![]),
            ])),
            Body::Data(Batch::from(vec![Data(vec![1u8, 2].into())])),
        ];
        for original in bodies {
            let (bytes, kind) = body_bytes(&original);
            assert_eq!(copy_body(&bytes, kind).as_ref(), Ok(&original), "{kind:?}");
        }
        let (text, kind) = body_bytes(&Body::Value(AmqpValue(Value::String("héllo".into()))));
        assert_eq!(
            (&text[..], kind),
            ("héllo".as_bytes(), Some(BODY_VALUE_STRING)),
            "shown as its text"
        );
        let not_utf8 = copy_body(&Bytes::from_static(b"\xff"), Some(BODY_VALUE_STRING));
        assert!(not_utf8.is_err(), "{not_utf8:?}");
        let not_amqp = copy_body(&Bytes::from_static(b"\xff"), Some(BODY_SEQUENCE));
        assert!(not_amqp.is_err(), "{not_amqp:?}");
    }
}
