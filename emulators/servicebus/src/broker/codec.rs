//! Splitting and re-assembling AMQP messages at the section level.
//!
//! The emulator stores the bare message (properties, application properties,
//! body, footer) as the exact bytes the client sent, so that every typed value
//! comes back unchanged. Only the header and the message annotations, which the
//! broker owns, are decoded and re-encoded.

use bytes::{BufMut, Bytes, BytesMut};
use fe2o3_amqp_types::messaging::Header;
use serde_amqp::{
    described::Described, descriptor::Descriptor, primitives::OrderedMap, primitives::Symbol, value::Value,
};

pub const HEADER: u64 = 0x70;
pub const DELIVERY_ANNOTATIONS: u64 = 0x71;
pub const MESSAGE_ANNOTATIONS: u64 = 0x72;
pub const PROPERTIES: u64 = 0x73;
pub const APPLICATION_PROPERTIES: u64 = 0x74;
pub const DATA: u64 = 0x75;
pub const AMQP_VALUE: u64 = 0x77;

/// Service Bus marks a transfer whose data sections each hold one encoded message.
pub const BATCH_MESSAGE_FORMAT: u32 = 0x8001_3700;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("truncated AMQP encoding")]
    Truncated,
    #[error("unknown AMQP format code 0x{0:02x}")]
    UnknownFormatCode(u8),
    #[error("not a message section (descriptor {0})")]
    NotASection(String),
    #[error("invalid {section} section: {source}")]
    Decode {
        section: &'static str,
        source: serde_amqp::Error,
    },
    #[error("encoding failed: {0}")]
    Encode(#[from] serde_amqp::Error),
}

/// One section of a message, with its raw bytes (descriptor included).
#[derive(Debug, Clone)]
pub struct Section {
    pub code: u64,
    pub raw: Bytes,
}

/// A message as received: the broker-owned parts decoded, the rest verbatim.
#[derive(Debug, Clone, Default)]
pub struct ParsedMessage {
    pub header: Header,
    pub annotations: OrderedMap<Value, Value>,
    /// Properties, application properties, body sections and footer, verbatim.
    pub bare: Vec<Section>,
}

impl ParsedMessage {
    /// What the message adds to its entity's size: its bare message.
    pub fn size(&self) -> usize {
        bare_size(&self.bare)
    }
}

/// The size Service Bus counts for a message: its bare message's sections.
pub fn bare_size(bare: &[Section]) -> usize {
    bare.iter().map(|s| s.raw.len()).sum()
}

/// Length of the encoded value at the start of `buf`, constructor included.
fn value_len(buf: &[u8]) -> Result<usize, CodecError> {
    let code = *buf.first().ok_or(CodecError::Truncated)?;
    if code == 0x00 {
        let descriptor = value_len(&buf[1..])?;
        let value = value_len(buf.get(1 + descriptor..).ok_or(CodecError::Truncated)?)?;
        return Ok(1 + descriptor + value);
    }
    let sized = |width: usize| -> Result<usize, CodecError> {
        let bytes = buf.get(1..1 + width).ok_or(CodecError::Truncated)?;
        let size = bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        Ok(1 + width + size)
    };
    let len = match code >> 4 {
        0x4 => 1,
        0x5 => 2,
        0x6 => 3,
        0x7 => 5,
        0x8 => 9,
        0x9 => 17,
        0xa | 0xc | 0xe => sized(1)?,
        0xb | 0xd | 0xf => sized(4)?,
        _ => return Err(CodecError::UnknownFormatCode(code)),
    };
    if buf.len() < len {
        return Err(CodecError::Truncated);
    }
    Ok(len)
}

fn section_code(descriptor: &Value) -> Result<u64, CodecError> {
    const NAMES: [(&str, u64); 9] = [
        ("amqp:header:list", 0x70),
        ("amqp:delivery-annotations:map", 0x71),
        ("amqp:message-annotations:map", 0x72),
        ("amqp:properties:list", 0x73),
        ("amqp:application-properties:map", 0x74),
        ("amqp:data:binary", 0x75),
        ("amqp:amqp-sequence:list", 0x76),
        ("amqp:amqp-value:*", 0x77),
        ("amqp:footer:map", 0x78),
    ];
    match descriptor {
        Value::Ulong(code @ 0x70..=0x78) => Ok(*code),
        Value::Symbol(name) => NAMES
            .iter()
            .find(|(known, _)| *known == name.as_str())
            .map(|(_, code)| *code)
            .ok_or_else(|| CodecError::NotASection(name.as_str().to_owned())),
        other => Err(CodecError::NotASection(format!("{other:?}"))),
    }
}

/// Splits an encoded message into its sections without decoding their values.
pub fn split_sections(payload: &Bytes) -> Result<Vec<Section>, CodecError> {
    let mut sections = Vec::new();
    let mut offset = 0;
    while offset < payload.len() {
        let rest = &payload[offset..];
        if rest[0] != 0x00 {
            return Err(CodecError::NotASection(format!("format code 0x{:02x}", rest[0])));
        }
        let descriptor_len = value_len(&rest[1..])?;
        let descriptor: Value =
            serde_amqp::from_slice(&rest[1..1 + descriptor_len]).map_err(|source| CodecError::Decode {
                section: "descriptor",
                source,
            })?;
        let len = value_len(rest)?;
        sections.push(Section {
            code: section_code(&descriptor)?,
            raw: payload.slice(offset..offset + len),
        });
        offset += len;
    }
    Ok(sections)
}

/// The value inside a described section, as a map (annotations, properties maps).
fn section_map(section: &Section, name: &'static str) -> Result<OrderedMap<Value, Value>, CodecError> {
    let value: Value =
        serde_amqp::from_slice(&section.raw).map_err(|source| CodecError::Decode { section: name, source })?;
    match value {
        Value::Described(described) => match described.value {
            Value::Map(map) => Ok(map),
            Value::Null => Ok(OrderedMap::new()),
            _ => Err(CodecError::NotASection(name.to_owned())),
        },
        _ => Err(CodecError::NotASection(name.to_owned())),
    }
}

pub fn parse_message(payload: &Bytes) -> Result<ParsedMessage, CodecError> {
    let mut message = ParsedMessage::default();
    for section in split_sections(payload)? {
        match section.code {
            HEADER => {
                message.header = serde_amqp::from_slice(&section.raw).map_err(|source| CodecError::Decode {
                    section: "header",
                    source,
                })?
            }
            // Delivery annotations are hop-by-hop: they never reach a receiver.
            DELIVERY_ANNOTATIONS => {}
            MESSAGE_ANNOTATIONS => message.annotations = section_map(&section, "message-annotations")?,
            _ => message.bare.push(section),
        }
    }
    Ok(message)
}

/// A transfer payload becomes one message, or N for a Service Bus batch.
pub fn parse_transfer(message_format: u32, payload: &Bytes) -> Result<Vec<ParsedMessage>, CodecError> {
    if message_format != BATCH_MESSAGE_FORMAT {
        return Ok(vec![parse_message(payload)?]);
    }
    split_sections(payload)?
        .into_iter()
        .filter(|section| section.code == DATA)
        .map(|section| parse_message(&data_section_bytes(&section)?))
        .collect()
}

/// The binary inside a data section.
fn data_section_bytes(section: &Section) -> Result<Bytes, CodecError> {
    let descriptor_len = value_len(&section.raw[1..])?;
    let start = 1 + descriptor_len;
    let (header_len, len) = match section.raw.get(start) {
        Some(0xa0) => (
            2,
            usize::from(*section.raw.get(start + 1).ok_or(CodecError::Truncated)?),
        ),
        Some(0xb0) => {
            let size = section.raw.get(start + 1..start + 5).ok_or(CodecError::Truncated)?;
            (5, u32::from_be_bytes([size[0], size[1], size[2], size[3]]) as usize)
        }
        Some(code) => return Err(CodecError::UnknownFormatCode(*code)),
        None => return Err(CodecError::Truncated),
    };
    let begin = start + header_len;
    if section.raw.len() < begin + len {
        return Err(CodecError::Truncated);
    }
    Ok(section.raw.slice(begin..begin + len))
}

/// Adds string application properties, keeping every other entry and its type.
pub fn set_application_properties(bare: &mut Vec<Section>, entries: &[(&str, String)]) -> Result<(), CodecError> {
    let existing = bare.iter().position(|s| s.code == APPLICATION_PROPERTIES);
    let mut map = match existing {
        Some(index) => section_map(&bare[index], "application-properties")?,
        None => OrderedMap::new(),
    };
    for (key, value) in entries {
        map.insert(Value::String((*key).to_owned()), Value::String(value.clone()));
    }
    let section = Section {
        code: APPLICATION_PROPERTIES,
        raw: encode_map_section(APPLICATION_PROPERTIES, map)?,
    };
    match existing {
        Some(index) => bare[index] = section,
        None => {
            // Sections have a fixed order: application properties follow properties.
            let at = bare
                .iter()
                .position(|s| s.code > APPLICATION_PROPERTIES)
                .unwrap_or(bare.len());
            bare.insert(at, section);
        }
    }
    Ok(())
}

pub fn encode_map_section(code: u64, map: OrderedMap<Value, Value>) -> Result<Bytes, CodecError> {
    let described = Described {
        descriptor: Descriptor::Code(code),
        value: Value::Map(map),
    };
    Ok(Bytes::from(serde_amqp::to_vec(&described)?))
}

pub fn encode_value_section(value: Value) -> Result<Bytes, CodecError> {
    let described = Described {
        descriptor: Descriptor::Code(AMQP_VALUE),
        value,
    };
    Ok(Bytes::from(serde_amqp::to_vec(&described)?))
}

/// Header + delivery annotations + message annotations + verbatim bare message.
pub fn encode_message(
    header: &Header,
    delivery_annotations: Option<OrderedMap<Value, Value>>,
    annotations: OrderedMap<Value, Value>,
    bare: &[Section],
) -> Result<Bytes, CodecError> {
    // Every header field is written, delivery-count included: a composite
    // encoder drops trailing defaults, and clients then report no count at all.
    let header = serde_amqp::to_vec(&Described {
        descriptor: Descriptor::Code(HEADER),
        value: Value::List(vec![
            Value::Bool(header.durable),
            Value::Ubyte(header.priority.0),
            header.ttl.map_or(Value::Null, Value::Uint),
            Value::Bool(header.first_acquirer),
            Value::Uint(header.delivery_count),
        ]),
    })?;
    let delivery_annotations = delivery_annotations
        .map(|map| encode_map_section(DELIVERY_ANNOTATIONS, map))
        .transpose()?
        .unwrap_or_default();
    let annotations = encode_map_section(MESSAGE_ANNOTATIONS, annotations)?;
    let bare_len: usize = bare.iter().map(|s| s.raw.len()).sum();
    let mut out = BytesMut::with_capacity(header.len() + delivery_annotations.len() + annotations.len() + bare_len);
    out.put_slice(&header);
    out.put_slice(&delivery_annotations);
    out.put_slice(&annotations);
    for section in bare {
        out.put_slice(&section.raw);
    }
    Ok(out.freeze())
}

pub fn symbol(name: &str) -> Value {
    Value::Symbol(Symbol::from(name))
}

/// Decoded view of a request message (management and `$cbs` requests).
#[derive(Debug, Default)]
pub struct Request {
    pub properties: fe2o3_amqp_types::messaging::Properties,
    pub application_properties: OrderedMap<Value, Value>,
    pub body: Value,
}

impl Request {
    pub fn parse(payload: &Bytes) -> Result<Self, CodecError> {
        let mut request = Request::default();
        for section in split_sections(payload)? {
            match section.code {
                PROPERTIES => {
                    request.properties = serde_amqp::from_slice(&section.raw).map_err(|source| CodecError::Decode {
                        section: "properties",
                        source,
                    })?
                }
                APPLICATION_PROPERTIES => {
                    request.application_properties = section_map(&section, "application-properties")?
                }
                AMQP_VALUE => {
                    let value: Value = serde_amqp::from_slice(&section.raw).map_err(|source| CodecError::Decode {
                        section: "amqp-value",
                        source,
                    })?;
                    if let Value::Described(described) = value {
                        request.body = described.value;
                    }
                }
                _ => {}
            }
        }
        Ok(request)
    }

    pub fn app_property(&self, key: &str) -> Option<&Value> {
        self.application_properties.get(&Value::String(key.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bytes {
        let props = fe2o3_amqp_types::messaging::Properties {
            message_id: Some(fe2o3_amqp_types::messaging::MessageId::String("m1".into())),
            ..Default::default()
        };
        let mut app = OrderedMap::new();
        app.insert(Value::String("n".into()), Value::Long(7));
        let mut out = Vec::new();
        out.extend(serde_amqp::to_vec(&Header::default()).unwrap());
        out.extend(serde_amqp::to_vec(&props).unwrap());
        out.extend(encode_map_section(APPLICATION_PROPERTIES, app).unwrap());
        out.extend(
            serde_amqp::to_vec(&Described {
                descriptor: Descriptor::Code(DATA),
                value: Value::Binary(serde_bytes_buf(b"hello")),
            })
            .unwrap(),
        );
        Bytes::from(out)
    }

    fn serde_bytes_buf(bytes: &[u8]) -> serde_amqp::primitives::Binary {
        serde_amqp::primitives::Binary::from(bytes.to_vec())
    }

    #[test]
    fn bare_message_is_kept_verbatim() {
        let payload = sample();
        let parsed = parse_message(&payload).unwrap();
        assert_eq!(parsed.bare.len(), 3);
        let encoded = encode_message(&parsed.header, None, OrderedMap::new(), &parsed.bare).unwrap();
        assert!(encoded.ends_with(&payload[payload.len() - 20..]));
    }

    #[test]
    fn batch_is_split_into_messages() {
        let inner = sample();
        let section = serde_amqp::to_vec(&Described {
            descriptor: Descriptor::Code(DATA),
            value: Value::Binary(serde_bytes_buf(&inner)),
        })
        .unwrap();
        let batch = Bytes::from([section.clone(), section].concat());
        let messages = parse_transfer(BATCH_MESSAGE_FORMAT, &batch).unwrap();
        assert_eq!(messages.len(), 2);
    }

    #[test]
    fn dead_letter_properties_keep_existing_types() {
        let mut parsed = parse_message(&sample()).unwrap();
        set_application_properties(&mut parsed.bare, &[("DeadLetterReason", "r".into())]).unwrap();
        let app = parsed.bare.iter().find(|s| s.code == APPLICATION_PROPERTIES).unwrap();
        let map = section_map(app, "application-properties").unwrap();
        assert_eq!(map.get(&Value::String("n".into())), Some(&Value::Long(7)));
        assert_eq!(
            map.get(&Value::String("DeadLetterReason".into())),
            Some(&Value::String("r".into()))
        );
    }
}
