//! The provider-neutral message model (DESIGN §2, "The message model").
//!
//! Every adapter translates its provider's message into [`DlqMessage`] and back
//! from [`Outgoing`], so that the filter, the redrive engine and the output code
//! never see a provider type.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A typed attribute value.
///
/// The variants are the union of what the three providers can carry, so that a
/// message can be redriven without any attribute being coerced: SQS String /
/// Number / Binary (with custom type suffixes), Pub/Sub strings, and Service
/// Bus's typed AMQP application properties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum AttrValue {
    String(String),
    /// Kept as text: SQS numbers are decimal strings of up to 38 digits, which
    /// no Rust numeric type round-trips exactly.
    Number(String),
    #[serde(with = "base64_bytes")]
    Binary(Bytes),
    Bool(bool),
    Int(i64),
    /// NaN and the infinities, which JSON numbers cannot hold, are written
    /// as the strings `"NaN"`, `"Infinity"` and `"-Infinity"` (serde_json
    /// would write `null`, which reads back as nothing at all: an export or
    /// a purge's backup could not be imported).
    #[serde(with = "json_float")]
    Float(f64),
    Timestamp(DateTime<Utc>),
    Uuid(uuid::Uuid),
}

/// An attribute plus the provider's own type label when it carries more than the
/// variant says (for SQS, the full `DataType`, e.g. `Number.float` or
/// `Binary.gif`), so that the exact type survives a round trip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attribute {
    #[serde(flatten)]
    pub value: AttrValue,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_type: Option<String>,
}

impl Attribute {
    pub fn string(value: impl Into<String>) -> Self {
        Self {
            value: AttrValue::String(value.into()),
            data_type: None,
        }
    }

    /// An AMQP null (a Service Bus application property set to null), which
    /// the model carries as an empty string labelled `null` so that a redrive
    /// sends it back as null.
    pub fn is_null(&self) -> bool {
        self.data_type.as_deref() == Some("null") && self.value == AttrValue::String(String::new())
    }

    /// The value as text, for filters, tables and providers whose attributes are
    /// strings only. Binary values are base64.
    /// `as_text().len()`, without the copy for the common string case.
    pub fn text_len(&self) -> usize {
        match &self.value {
            AttrValue::String(s) | AttrValue::Number(s) => s.len(),
            _ => self.as_text().len(),
        }
    }

    pub fn as_text(&self) -> String {
        match &self.value {
            AttrValue::String(s) | AttrValue::Number(s) => s.clone(),
            AttrValue::Binary(b) => base64::engine::general_purpose::STANDARD.encode(b),
            AttrValue::Bool(b) => b.to_string(),
            AttrValue::Int(i) => i.to_string(),
            AttrValue::Float(f) => f.to_string(),
            AttrValue::Timestamp(t) => t.to_rfc3339(),
            AttrValue::Uuid(u) => u.to_string(),
        }
    }
}

pub type Attributes = BTreeMap<String, Attribute>;

/// Provider message properties that are not application attributes but must
/// survive a redrive (Service Bus's correlation id, subject, content type...).
pub type Properties = BTreeMap<String, String>;

/// One message in a dead-letter queue, as every part of dlq-bridge sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlqMessage {
    /// The provider's message ID (for Service Bus, MessageId; the sequence
    /// number is in `properties`).
    pub id: String,
    #[serde(with = "base64_bytes")]
    pub body: Bytes,
    pub attributes: Attributes,
    #[serde(default, skip_serializing_if = "Properties::is_empty")]
    pub properties: Properties,
    pub reason: Option<String>,
    pub description: Option<String>,
    pub delivery_count: Option<u32>,
    pub enqueued_at: Option<DateTime<Utc>>,
    /// The provider-native address of the entity the message failed on, when
    /// the provider or the config tells us.
    pub source: Option<String>,
    /// FIFO group, ordering key or session: the unit whose order is kept.
    pub ordering_key: Option<String>,
}

impl DlqMessage {
    pub fn age(&self, now: DateTime<Utc>) -> Option<Duration> {
        self.enqueued_at.map(|t| (now - t).to_std().unwrap_or(Duration::ZERO))
    }

    /// The body as text, lossily: what the `body` filter variable and previews see.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An opaque handle on a leased message: an SQS receipt handle, a Pub/Sub ack ID
/// or a Service Bus lock token. Only the backend that issued it understands it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub String);

/// A message hidden from other consumers until it is settled or released.
#[derive(Debug, Clone)]
pub struct Leased {
    pub message: DlqMessage,
    pub lease: LeaseId,
}

impl Leased {
    /// What is left to keep once the copy is confirmed: the settle and its
    /// journal records need the lease, the ID, the reason and the enqueue
    /// time, not the body, so a settle in flight holds no body.
    pub fn settling(mut self) -> Self {
        let m = &mut self.message;
        m.body = Bytes::new();
        m.attributes = Attributes::default();
        m.properties = Properties::default();
        m.description = None;
        self
    }
}

/// Where a redriven copy goes, as the provider names it: an SQS queue URL, a
/// Pub/Sub topic, a Service Bus entity path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Destination(pub String);

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A copy to be sent. Built by the redrive engine from a [`DlqMessage`]: the
/// engine decides which attributes are stripped and which marks are added; the
/// adapter only translates.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub body: Bytes,
    pub attributes: Attributes,
    pub properties: Properties,
    pub ordering_key: Option<String>,
    /// Stable across retries and crashes, so a provider with deduplication
    /// (SQS FIFO, Service Bus duplicate detection) absorbs a resend.
    pub dedup_id: String,
    /// The original message ID, for adapters that keep it on the copy.
    pub original_id: String,
}

/// The outcome of sending one [`Outgoing`], in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendResult {
    /// Confirmed by the destination, with the ID it gave the copy.
    Sent {
        dest_id: String,
    },
    Failed {
        error: String,
    },
}

/// The outcome of settling one lease, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleResult {
    Settled,
    Failed { error: String },
}

/// How a depth or age figure was obtained (DESIGN §2, "Depth and age").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exactness {
    /// Counted by the tool itself.
    Exact,
    /// The provider's approximate counter.
    Approximate,
    /// A metric that lags the truth by minutes.
    Lagged,
    /// Counted by browsing up to a limit, which was reached: the depth is a
    /// floor (Service Bus without the Manage right).
    AtLeast,
}

impl std::fmt::Display for Exactness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Exact => "exact",
            Self::Approximate => "approximate",
            Self::Lagged => "lagged",
            Self::AtLeast => "at least",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlqStats {
    pub depth: u64,
    /// Messages currently leased by some consumer, included in `depth`.
    pub in_flight: Option<u64>,
    #[serde(with = "opt_secs")]
    pub oldest_age: Option<Duration>,
    pub exactness: Exactness,
    /// How `oldest_age` was obtained, when not as `depth` was: on SQS the
    /// depth is SQS's own counter and the age CloudWatch's, minutes behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_age_exactness: Option<Exactness>,
}

impl DlqStats {
    /// How `oldest_age` was obtained.
    pub fn age_exactness(&self) -> Exactness {
        self.oldest_age_exactness.unwrap_or(self.exactness)
    }

    /// Whether a browse that read the whole queue tells the oldest age
    /// better than these stats do: they do not know it, or know it minutes
    /// late while the depth, which tells whether the browse was whole, is
    /// current (SQS with CloudWatch; not Pub/Sub on GCP, lagged throughout).
    pub fn age_better_from_whole_browse(&self) -> bool {
        self.oldest_age.is_none() || (self.age_exactness() == Exactness::Lagged && self.exactness != Exactness::Lagged)
    }

    /// Take `oldest`, the age of the oldest of `browsed` messages a browse
    /// read, when the browse read the whole queue (its oldest message is the
    /// queue's oldest) and that is better than these stats' own age. When it
    /// read part of the queue and the stats know no age, take it as a floor
    /// (`at_least`): the queue holds a message that old. Without it the age
    /// was unknown, and a gauge kept its last known value for good while the
    /// oldest message aged past every threshold.
    pub fn take_whole_browse_age(&mut self, browsed: u64, oldest: Option<Duration>) {
        let Some(age) = oldest else { return };
        if self.age_better_from_whole_browse() && browsed >= self.depth {
            self.oldest_age = Some(age);
            self.oldest_age_exactness = None;
        } else if self.oldest_age.is_none() && browsed > 0 {
            self.oldest_age = Some(age);
            self.oldest_age_exactness = Some(Exactness::AtLeast);
        }
    }
}

mod base64_bytes {
    use base64::Engine as _;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

mod json_float {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(f: &f64, s: S) -> Result<S::Ok, S::Error> {
        match *f {
            f if f.is_finite() => s.serialize_f64(f),
            f if f.is_nan() => s.serialize_str("NaN"),
            f if f > 0.0 => s.serialize_str("Infinity"),
            _ => s.serialize_str("-Infinity"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Float {
            Number(f64),
            Text(String),
        }
        match Float::deserialize(d)? {
            Float::Number(f) => Ok(f),
            Float::Text(t) if t == "NaN" => Ok(f64::NAN),
            Float::Text(t) if t == "Infinity" => Ok(f64::INFINITY),
            Float::Text(t) if t == "-Infinity" => Ok(f64::NEG_INFINITY),
            Float::Text(other) => Err(serde::de::Error::custom(format!(
                "a float is a JSON number, or \"NaN\", \"Infinity\" or \"-Infinity\", not {other:?}"
            ))),
        }
    }
}

mod opt_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.map(Duration::from_secs_f64))
    }
}

/// Characters that change how a terminal lays out the text around them
/// without showing themselves: the bidirectional formatting characters
/// (embeddings and overrides U+202A–U+202E, isolates U+2066–U+2069, the
/// marks U+200E, U+200F and U+061C) and the line and paragraph separators
/// U+2028 and U+2029. An ID, reason or body holding them can make a table
/// or an error line read other than it is (Trojan Source, CVE-2021-42574).
pub fn is_bidi_or_separator(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}'
    )
}

/// One line of text, at most `max` characters, control characters shown as
/// spaces and bidirectional formatting characters escaped (`\u{202e}`, see
/// [`is_bidi_or_separator`]): safe to put in a table cell.
pub fn preview(text: &str, max: usize) -> String {
    let mut shown = text.chars().flat_map(|c| {
        let escaped = if is_bidi_or_separator(c) {
            c.escape_unicode().to_string()
        } else if c.is_control() {
            " ".to_string()
        } else {
            c.to_string()
        };
        escaped.chars().collect::<Vec<_>>()
    });
    let mut out: String = shown.by_ref().take(max).collect();
    if shown.next().is_some() {
        out.pop();
        out.push('…');
    }
    out
}

/// `text` whole, with each control character and each bidirectional
/// formatting character escaped (`\u{1b}`, `\u{202e}`): for what must stay
/// exact and tell apart, such as a message ID, where [`preview`] would cut
/// or blank it. A sender sets a Service Bus MessageId, so an ID can carry
/// terminal escape sequences, or an override that reverses what follows it.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() || is_bidi_or_separator(c);
    if !text.chars().any(unsafe_char) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if unsafe_char(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_json_keeps_type_and_custom_label() {
        let attr = Attribute {
            value: AttrValue::Binary(Bytes::from_static(&[0, 159, 146, 150])),
            data_type: Some("Binary.gif".into()),
        };
        let json = serde_json::to_string(&attr).unwrap();
        assert_eq!(json, r#"{"type":"binary","value":"AJ+Slg==","data_type":"Binary.gif"}"#);
        let back: Attribute = serde_json::from_str(&json).unwrap();
        assert_eq!(back, attr);
    }

    #[test]
    fn floats_json_cannot_hold_round_trip_as_strings() {
        for (f, json) in [
            (f64::NAN, r#"{"type":"float","value":"NaN"}"#),
            (f64::INFINITY, r#"{"type":"float","value":"Infinity"}"#),
            (f64::NEG_INFINITY, r#"{"type":"float","value":"-Infinity"}"#),
            (-0.0, r#"{"type":"float","value":-0.0}"#),
            (f64::MAX, r#"{"type":"float","value":1.7976931348623157e+308}"#),
        ] {
            let attr = Attribute {
                value: AttrValue::Float(f),
                data_type: None,
            };
            assert_eq!(serde_json::to_string(&attr).unwrap(), json);
            let AttrValue::Float(back) = serde_json::from_str::<Attribute>(json).unwrap().value else {
                panic!("{json} did not read back as a float");
            };
            assert!(
                back.to_bits() == f.to_bits() || (back.is_nan() && f.is_nan()),
                "{json}: {back}"
            );
        }
        let e = serde_json::from_str::<Attribute>(r#"{"type":"float","value":"nan"}"#).unwrap_err();
        assert!(e.to_string().contains(r#"not "nan""#), "{e}");
    }

    #[test]
    fn a_settling_lease_keeps_what_its_settle_and_journal_need_and_no_body() {
        let enqueued_at = DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let leased = Leased {
            message: DlqMessage {
                id: "m-1".into(),
                body: Bytes::from(vec![7u8; 1 << 20]),
                attributes: [("kind".to_string(), Attribute::string("retry"))].into(),
                properties: [("x-seq".to_string(), "9".to_string())].into(),
                reason: Some("MaxDeliveryCountExceeded".into()),
                description: Some("too many".into()),
                delivery_count: Some(10),
                enqueued_at: Some(enqueued_at),
                source: Some("orders".into()),
                ordering_key: Some("g-1".into()),
            },
            lease: LeaseId("lock-1".into()),
        }
        .settling();
        let m = &leased.message;
        assert!(m.body.is_empty() && m.attributes.is_empty() && m.properties.is_empty());
        assert_eq!(m.description, None);
        assert_eq!(leased.lease, LeaseId("lock-1".into()));
        assert_eq!(m.id, "m-1");
        assert_eq!(m.reason.as_deref(), Some("MaxDeliveryCountExceeded"));
        assert_eq!(m.enqueued_at, Some(enqueued_at));
        assert_eq!(m.ordering_key.as_deref(), Some("g-1"));
    }

    #[test]
    fn bidi_controls_are_escaped_in_tables_and_error_lines() {
        // "Timeout" would read "tuoemiT"-style reversed, and an ID could hide
        // what follows it behind an override.
        let spoof = "ord-1\u{202E}fdp.exe\u{202C} \u{2066}x\u{2069}\u{200F}\u{061C}\u{2028}";
        let id = printable(spoof);
        assert_eq!(
            id,
            "ord-1\\u{202e}fdp.exe\\u{202c} \\u{2066}x\\u{2069}\\u{200f}\\u{61c}\\u{2028}"
        );
        assert!(!id.chars().any(is_bidi_or_separator), "{id}");
        let cell = preview(spoof, 200);
        assert!(!cell.chars().any(is_bidi_or_separator), "{cell}");
        assert!(cell.starts_with("ord-1\\u{202e}fdp.exe"), "{cell}");
        // A preview still cuts at `max` characters, escapes included.
        assert_eq!(preview("ab\u{202E}cd", 5), "ab\\u…");
        assert_eq!(preview("ab\u{202E}", 12), "ab\\u{202e}");
        // Text without them is left as it was; emoji joiners are not bidi.
        assert_eq!(printable("注文 👩\u{200D}💻"), "注文 👩\u{200D}💻");
        assert_eq!(preview("a\tb", 10), "a b");
    }
}
