//! The request/response nodes: `$cbs` and `<entity>/$management`.

use bytes::{BufMut, Bytes, BytesMut};
use fe2o3_amqp_types::messaging::Properties;
use serde_amqp::{
    primitives::{Array, OrderedMap, Timestamp},
    value::Value,
};
use uuid::Uuid;

use crate::broker::{
    Broker, BrokerError, EntityPath, Outcome, ReceiveMode, address,
    codec::{self, CodecError, Request},
};

/// A management answer before it is encoded.
#[derive(Debug)]
pub struct Reply {
    status: i32,
    description: String,
    condition: Option<&'static str>,
    body: Value,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Reply {
            status: 200,
            description: "OK".into(),
            condition: None,
            body,
        }
    }

    fn error(status: i32, condition: &'static str, description: String) -> Self {
        Reply {
            status,
            description,
            condition: Some(condition),
            body: Value::Null,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ManagementError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("bad request: {0}")]
    BadRequest(String),
}

impl From<ManagementError> for Reply {
    fn from(error: ManagementError) -> Self {
        let description = error.to_string();
        match error {
            ManagementError::Broker(BrokerError::LockLost) => {
                Reply::error(410, "com.microsoft:message-lock-lost", description)
            }
            ManagementError::Broker(BrokerError::NotFound(_)) => {
                Reply::error(404, "com.microsoft:entity-not-found", description)
            }
            ManagementError::Broker(BrokerError::MessageNotFound(_)) => {
                Reply::error(404, "com.microsoft:message-not-found", description)
            }
            ManagementError::Broker(BrokerError::NotAllowed(_)) => Reply::error(400, "amqp:not-allowed", description),
            ManagementError::Broker(BrokerError::Codec(_)) => Reply::error(500, "amqp:internal-error", description),
            ManagementError::Broker(BrokerError::QuotaExceeded { .. }) => {
                Reply::error(403, "amqp:resource-limit-exceeded", description)
            }
            ManagementError::Broker(BrokerError::Conflict(_)) => {
                Reply::error(409, "com.microsoft:entity-already-exists", description)
            }
            ManagementError::Broker(BrokerError::EntityDisabled(_)) => {
                Reply::error(400, "com.microsoft:entity-disabled", description)
            }
            ManagementError::Broker(BrokerError::ServerBusy(_)) => {
                Reply::error(503, "com.microsoft:server-busy", description)
            }
            ManagementError::BadRequest(_) => Reply::error(400, "amqp:invalid-field", description),
        }
    }
}

fn text(value: &Value) -> Option<&str> {
    match value {
        Value::String(s) => Some(s),
        Value::Symbol(s) => Some(s.as_str()),
        _ => None,
    }
}

fn field<'a>(body: &'a Value, key: &str) -> Option<&'a Value> {
    let Value::Map(map) = body else { return None };
    map.iter().find(|(k, _)| text(k) == Some(key)).map(|(_, v)| v)
}

fn integer(value: &Value) -> Option<i64> {
    match *value {
        Value::Byte(v) => Some(v.into()),
        Value::Short(v) => Some(v.into()),
        Value::Int(v) => Some(v.into()),
        Value::Long(v) => Some(v),
        Value::Ubyte(v) => Some(v.into()),
        Value::Ushort(v) => Some(v.into()),
        Value::Uint(v) => Some(v.into()),
        Value::Ulong(v) => i64::try_from(v).ok(),
        _ => None,
    }
}

fn required_integer(body: &Value, key: &str) -> Result<i64, ManagementError> {
    field(body, key)
        .and_then(integer)
        .ok_or_else(|| ManagementError::BadRequest(format!("'{key}' must be an integer")))
}

fn elements(value: &Value) -> &[Value] {
    match value {
        Value::Array(Array(items)) | Value::List(items) => items,
        _ => &[],
    }
}

fn lock_tokens(body: &Value) -> Result<Vec<Uuid>, ManagementError> {
    let tokens = field(body, "lock-tokens")
        .map(elements)
        .ok_or_else(|| ManagementError::BadRequest("'lock-tokens' is missing".into()))?;
    tokens
        .iter()
        .map(|token| match token {
            Value::Uuid(uuid) => Ok(Uuid::from_bytes(*uuid.as_inner())),
            other => Err(ManagementError::BadRequest(format!(
                "lock token {other:?} is not a uuid"
            ))),
        })
        .collect()
}

fn map(entries: impl IntoIterator<Item = (&'static str, Value)>) -> Value {
    let mut map = OrderedMap::new();
    for (key, value) in entries {
        map.insert(Value::String(key.to_owned()), value);
    }
    Value::Map(map)
}

fn messages(items: impl IntoIterator<Item = Value>) -> Value {
    map([("messages", Value::List(items.into_iter().collect()))])
}

fn peek(broker: &Broker, path: &EntityPath, body: &Value) -> Result<Reply, ManagementError> {
    let from = required_integer(body, "from-sequence-number")?;
    let count = usize::try_from(required_integer(body, "message-count")?).unwrap_or(0);
    let found = broker.peek(path, from, count)?;
    if found.is_empty() {
        return Ok(Reply {
            status: 204,
            description: "No messages".into(),
            condition: None,
            body: Value::Null,
        });
    }
    Ok(Reply::ok(messages(found.into_iter().map(|payload| {
        map([("message", Value::Binary(payload.to_vec().into()))])
    }))))
}

fn renew(broker: &Broker, path: &EntityPath, body: &Value) -> Result<Reply, ManagementError> {
    let expirations = broker.renew(path, &lock_tokens(body)?)?;
    let expirations = expirations
        .into_iter()
        .map(|ms| Value::Timestamp(Timestamp::from_milliseconds(ms)))
        .collect();
    Ok(Reply::ok(map([("expirations", Value::Array(Array(expirations)))])))
}

fn update_disposition(broker: &Broker, path: &EntityPath, body: &Value) -> Result<Reply, ManagementError> {
    let status = field(body, "disposition-status").and_then(text).unwrap_or("");
    let string = |key| field(body, key).and_then(text).map(str::to_owned);
    let outcome = match status {
        "completed" => Outcome::Complete,
        "abandoned" => Outcome::Abandon {
            annotations: properties_to_modify(body),
        },
        "defered" | "deferred" => Outcome::Defer,
        "suspended" => Outcome::DeadLetter {
            reason: string("deadletter-reason"),
            description: string("deadletter-description"),
        },
        other => {
            return Err(ManagementError::BadRequest(format!(
                "unknown disposition-status {other:?}"
            )));
        }
    };
    for token in lock_tokens(body)? {
        broker.settle(path, &token, outcome.clone())?;
    }
    Ok(Reply::ok(map([])))
}

fn properties_to_modify(body: &Value) -> Vec<(Value, Value)> {
    match field(body, "properties-to-modify") {
        Some(Value::Map(map)) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        _ => Vec::new(),
    }
}

fn receive_deferred(broker: &Broker, path: &EntityPath, body: &Value) -> Result<Reply, ManagementError> {
    let sequence_numbers = field(body, "sequence-numbers")
        .map(elements)
        .unwrap_or_default()
        .iter()
        .map(|v| integer(v).ok_or_else(|| ManagementError::BadRequest("bad sequence number".into())))
        .collect::<Result<Vec<_>, _>>()?;
    // The SDKs send ReceiverSettleMode: first (0) means receive-and-delete.
    let mode = match field(body, "receiver-settle-mode").and_then(integer) {
        Some(0) => ReceiveMode::ReceiveAndDelete,
        _ => ReceiveMode::PeekLock,
    };
    let acquired = broker.receive_deferred(path, &sequence_numbers, mode)?;
    Ok(Reply::ok(messages(acquired.into_iter().map(|a| {
        let mut entries = vec![("message", Value::Binary(a.payload.to_vec().into()))];
        if let Some(token) = a.lock_token {
            entries.push((
                "lock-token",
                Value::Uuid(serde_amqp::primitives::Uuid::from(*token.as_bytes())),
            ));
        }
        map(entries)
    }))))
}

/// Answers one `$management` request.
pub fn handle(broker: &Broker, path: &EntityPath, request: &Request) -> Reply {
    let operation = request.app_property("operation").and_then(text).unwrap_or("");
    let result = match operation {
        "com.microsoft:peek-message" => peek(broker, path, &request.body),
        "com.microsoft:renew-lock" => renew(broker, path, &request.body),
        "com.microsoft:update-disposition" => update_disposition(broker, path, &request.body),
        "com.microsoft:receive-by-sequence-number" => receive_deferred(broker, path, &request.body),
        other => {
            tracing::warn!(operation = other, %path, "management operation not implemented");
            return Reply::error(
                501,
                "amqp:not-implemented",
                format!("servicebus-emulator does not implement the operation {other:?}"),
            );
        }
    };
    result.unwrap_or_else(Reply::from)
}

/// The entity path a `put-token` names (its `name`, a URI or a path),
/// lower-cased, without scheme, host and slashes at either end: `""` for a
/// token put for the whole namespace.
pub fn token_audience(request: &Request) -> Option<String> {
    let name = request.app_property("name").and_then(text)?;
    Some(address::path_of(name))
}

/// When a `put-token`'s token expires, in Unix milliseconds: a SAS token's
/// own `se` (what Azure checks), else the put's `expiration` (a timestamp,
/// or seconds as the Python SDK sends it).
pub fn token_expiry(request: &Request) -> Option<i64> {
    let from_token = text(&request.body).and_then(|token| {
        token
            .split(['&', ' '])
            .find_map(|part| part.strip_prefix("se="))
            .and_then(|secs| secs.parse::<i64>().ok())
    });
    if let Some(secs) = from_token {
        return Some(secs.saturating_mul(1000));
    }
    match request.app_property("expiration")? {
        Value::Timestamp(t) => Some(t.milliseconds()),
        Value::Long(s) => Some(s.saturating_mul(1000)),
        Value::Int(s) => Some(i64::from(*s) * 1000),
        Value::Ulong(s) => i64::try_from(*s).ok().map(|s| s.saturating_mul(1000)),
        Value::Uint(s) => Some(i64::from(*s) * 1000),
        Value::Double(s) => Some((s.0 * 1000.0) as i64),
        _ => None,
    }
}

/// A `put-token`'s token when it is a shared access signature. Told by its
/// text, not by the put's `type`: Microsoft's Python SDK puts its SAS
/// tokens with type `jwt`, and Azure takes them.
pub fn sas_token(request: &Request) -> Option<&str> {
    text(&request.body).filter(|token| token.starts_with("SharedAccessSignature "))
}

/// A `put-token`'s token when it is an Entra ID access token: type `jwt`,
/// and not a shared access signature.
pub fn jwt_token(request: &Request) -> Option<&str> {
    if request.app_property("type").and_then(text) != Some("jwt") || sas_token(request).is_some() {
        return None;
    }
    Some(text(&request.body).unwrap_or(""))
}

/// Answers a `$cbs` put-token: the emulator accepts any token.
pub fn handle_cbs(request: &Request) -> (i32, &'static str) {
    match request.app_property("operation").and_then(text) {
        Some("put-token") => (202, "Accepted"),
        _ => (501, "servicebus-emulator only implements put-token on $cbs"),
    }
}

fn response(
    request: &Request,
    application_properties: Vec<(&'static str, Value)>,
    body: Value,
) -> Result<Bytes, CodecError> {
    let properties = Properties {
        correlation_id: request.properties.message_id.clone(),
        to: request.properties.reply_to.clone(),
        ..Default::default()
    };
    let mut app = OrderedMap::new();
    for (key, value) in application_properties {
        app.insert(Value::String(key.to_owned()), value);
    }
    let mut out = BytesMut::new();
    out.put_slice(&serde_amqp::to_vec(&properties)?);
    out.put_slice(&codec::encode_map_section(codec::APPLICATION_PROPERTIES, app)?);
    out.put_slice(&codec::encode_value_section(body)?);
    Ok(out.freeze())
}

/// `$management` replies use camel-case keys, as Service Bus does.
pub fn encode_reply(request: &Request, reply: Reply) -> Result<Bytes, CodecError> {
    let mut props = vec![
        ("statusCode", Value::Int(reply.status)),
        ("statusDescription", Value::String(reply.description)),
    ];
    if let Some(condition) = reply.condition {
        props.push(("errorCondition", codec::symbol(condition)));
    }
    response(request, props, reply.body)
}

/// `$cbs` replies use the dashed keys of the AMQP CBS draft.
pub fn encode_cbs_reply(request: &Request, status: i32, description: &str) -> Result<Bytes, CodecError> {
    response(
        request,
        vec![
            ("status-code", Value::Int(status)),
            ("status-description", Value::String(description.to_owned())),
        ],
        Value::Null,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_token(name: &str, token: &str, expiration: Option<Value>) -> Request {
        let mut request = Request::default();
        let props = &mut request.application_properties;
        props.insert(Value::String("operation".into()), Value::String("put-token".into()));
        props.insert(Value::String("name".into()), Value::String(name.into()));
        if let Some(e) = expiration {
            props.insert(Value::String("expiration".into()), e);
        }
        request.body = Value::String(token.into());
        request
    }

    #[test]
    fn a_put_token_names_its_audience_and_expiry_as_azure_reads_them() {
        let sas = "SharedAccessSignature sr=sb%3a%2f%2fns%2f&sig=abc%3d&se=1700000000&skn=key";
        let r = put_token(
            "sb://ns/Orders/$DeadLetterQueue",
            sas,
            Some(Value::Timestamp(Timestamp::from_milliseconds(5))),
        );
        assert_eq!(token_audience(&r).as_deref(), Some("orders/$deadletterqueue"));
        // The SAS token's own `se` wins over the put's `expiration`.
        assert_eq!(token_expiry(&r), Some(1_700_000_000_000));
        let jwt = put_token(
            "sb://ns/",
            "eyJ.x.y",
            Some(Value::Timestamp(Timestamp::from_milliseconds(42))),
        );
        assert_eq!(token_audience(&jwt).as_deref(), Some(""));
        assert_eq!(token_expiry(&jwt), Some(42));
        assert_eq!(token_expiry(&put_token("q", "t", Some(Value::Long(7)))), Some(7000));
        assert_eq!(token_expiry(&put_token("q", "t", None)), None);
    }
}
