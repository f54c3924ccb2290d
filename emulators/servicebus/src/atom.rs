//! The ATOM management endpoint: the GET that reports message counts, the
//! PUT that creates a queue or subscription, and the DELETE that removes an
//! entity.

use std::{fmt::Write as _, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{Request, State},
    http::{Method, StatusCode, Uri, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::post,
};
use chrono::{DateTime, SecondsFormat, Utc};

use crate::broker::{
    Broker, BrokerError, Counts, Description, EntityStatus, StoreSettings, SubQueue,
    address::{self, Node},
    now_ms,
};
use crate::entra::Entra;
use crate::sas::{Right, SasRules};

/// Who may call the ATOM endpoint, as Azure checks its `Authorization`
/// header. With neither Entra ID nor SAS rules on, anyone may.
pub struct AtomAuth {
    pub entra: Option<Arc<Entra>>,
    pub sas: Option<Arc<SasRules>>,
}

/// The ATOM endpoint (and, with Entra ID on, its token endpoint beside it).
pub fn router(broker: Arc<Broker>, auth: AtomAuth) -> Router {
    let token_endpoint = auth.entra.as_ref().map(Entra::router);
    let mut atom = Router::new().fallback(entity).with_state(broker.clone());
    if auth.entra.is_some() || auth.sas.is_some() {
        atom = atom.layer(axum::middleware::from_fn_with_state(Arc::new(auth), authorize));
    }
    if let Some(token_endpoint) = token_endpoint {
        atom = atom.merge(token_endpoint);
    }
    Router::new()
        // Emulator-only: not part of Service Bus.
        .route("/$emulator/reset", post(reset))
        .route("/$emulator/throttle-peeks/{entity}/{count}", post(throttle_peeks))
        .with_state(broker)
        .merge(atom)
}

/// A bearer token must be one the emulator issued, still valid (with Entra
/// ID on); a shared access signature must check out against the rules, cover
/// the entity and carry Manage (with SAS rules on); with SAS rules on, a call
/// without either is refused. Azure answers each with 401 and an XML error.
async fn authorize(State(auth): State<Arc<AtomAuth>>, request: Request, next: Next) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let path = address::path_of(&request.uri().path().replace("%24", "$"));
    let refusal: Option<String> = if let Some(token) = header.strip_prefix("Bearer ") {
        auth.entra
            .as_ref()
            .and_then(|entra| entra.verify(token).err().map(|r| r.description().to_string()))
    } else if header.starts_with("SharedAccessSignature ") {
        auth.sas.as_ref().and_then(|rules| match rules.verify(header) {
            Err(refusal) => Some(refusal),
            Ok(v) if !address::token_covers(&v.resource, &path) => Some(format!(
                "InvalidAudience: the token is for '{}', which does not cover '{path}'",
                v.resource
            )),
            Ok(v) if !Right::Manage.granted_by(v.rights) => {
                // Azure's words for a Listen or Send key on the ATOM endpoint.
                Some("Manage,EntityRead claims required for this operation.".into())
            }
            Ok(_) => None,
        })
    } else {
        auth.sas
            .as_ref()
            .map(|_| "MissingToken: The authorization header was not found.".to_string())
    };
    match refusal {
        None => next.run(request).await,
        Some(detail) => (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "application/xml; charset=utf-8")],
            format!("<Error><Code>401</Code><Detail>{}</Detail></Error>", escape(&detail)),
        )
            .into_response(),
    }
}

async fn reset(State(broker): State<Arc<Broker>>) -> StatusCode {
    broker.reset();
    tracing::info!("state reset");
    StatusCode::NO_CONTENT
}

/// Refuse the next `count` peeks of `entity` as throttled (see
/// [`Broker::throttle_peeks`]).
async fn throttle_peeks(
    State(broker): State<Arc<Broker>>,
    axum::extract::Path((entity, count)): axum::extract::Path<(String, usize)>,
) -> StatusCode {
    broker.throttle_peeks(&entity, count);
    tracing::info!(%entity, count, "peeks throttled");
    StatusCode::NO_CONTENT
}

async fn entity(State(broker): State<Arc<Broker>>, method: Method, uri: Uri, body: String) -> Response {
    let path = uri.path().replace("%24", "$");
    let self_link = format!("https://127.0.0.1{}", uri);
    if method == Method::PUT {
        return create(&broker, &path, &body, &self_link);
    }
    if method == Method::DELETE {
        return delete(&broker, &path);
    }
    if method != Method::GET {
        return (
            StatusCode::NOT_IMPLEMENTED,
            format!("servicebus-emulator implements only GET, PUT (of a queue) and DELETE on entities, not {method}"),
        )
            .into_response();
    }
    let description = match address::parse(&path) {
        Ok(Node::Entity(path)) if path.sub_queue == SubQueue::None => broker.describe(&path),
        _ => None,
    };
    // Like Azure, an unknown entity is an empty feed with status 200.
    let body = match description {
        Some(description) => entry(&description, &self_link),
        None => empty_feed(&self_link),
    };
    (
        [(header::CONTENT_TYPE, "application/atom+xml;type=entry;charset=utf-8")],
        body,
    )
        .into_response()
}

/// A PUT of a `QueueDescription` creates the queue, as on Azure; of its
/// settings only `MaxSizeInMegabytes`, `Status` and `ForwardTo` are read (the
/// rest come from the emulator's defaults). A PUT of a
/// `SubscriptionDescription` to `topic/Subscriptions/sub` creates a
/// subscription of an existing topic, of whose settings only `ForwardTo` is
/// read. Topics come from the topology or from a link that names them.
fn create(broker: &Broker, path: &str, body: &str, self_link: &str) -> Response {
    let entity = match address::parse(path) {
        Ok(Node::Entity(p)) if p.sub_queue == SubQueue::None => p,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                format!("cannot create {path:?}: name a queue or a subscription"),
            )
                .into_response();
        }
    };
    // Azure's clients write a ForwardTo as the target's name or its full URI.
    let forward_to = element(body, "ForwardTo").filter(|t| !t.is_empty());
    if let Some(sub) = &entity.subscription {
        if !body.contains("<SubscriptionDescription") {
            return (
                StatusCode::BAD_REQUEST,
                "a PUT to topic/Subscriptions/sub needs a SubscriptionDescription",
            )
                .into_response();
        }
        return match broker.create_subscription(&entity.entity, sub, forward_to) {
            Ok(()) => created(broker, &entity, self_link),
            Err(e @ BrokerError::Conflict(_)) => (StatusCode::CONFLICT, e.to_string()).into_response(),
            Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        };
    }
    if !body.contains("<QueueDescription") {
        return (
            StatusCode::NOT_IMPLEMENTED,
            "servicebus-emulator creates only queues (a QueueDescription) and subscriptions (a SubscriptionDescription) by PUT",
        )
            .into_response();
    }
    let max_size_mb = match element(body, "MaxSizeInMegabytes").map(str::parse::<usize>) {
        None => None,
        Some(Ok(mb)) => Some(mb),
        Some(Err(e)) => return (StatusCode::BAD_REQUEST, format!("MaxSizeInMegabytes: {e}")).into_response(),
    };
    let status = match element(body, "Status").map(|s| EntityStatus::parse(s.trim())) {
        None => EntityStatus::Active,
        Some(Some(status)) => status,
        Some(None) => return (StatusCode::BAD_REQUEST, "Status: not an entity status").into_response(),
    };
    match broker.create_queue(&entity.entity, max_size_mb.map(|mb| mb << 20), status, forward_to) {
        Ok(()) => created(broker, &entity, self_link),
        Err(e @ BrokerError::Conflict(_)) => (StatusCode::CONFLICT, e.to_string()).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// 201 with the entry of the entity just created.
fn created(broker: &Broker, entity: &address::EntityPath, self_link: &str) -> Response {
    let Some(description) = broker.describe(entity) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/atom+xml;type=entry;charset=utf-8")],
        entry(&description, self_link),
    )
        .into_response()
}

/// A DELETE removes the queue, topic or subscription, as on Azure: 200, or
/// 404 for an entity that does not exist.
fn delete(broker: &Broker, path: &str) -> Response {
    let entity = match address::parse(path) {
        Ok(Node::Entity(p)) if p.sub_queue == SubQueue::None => p,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                format!("cannot delete {path:?}: name an entity"),
            )
                .into_response();
        }
    };
    match broker.delete(&entity) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => (StatusCode::NOT_FOUND, e.to_string()).into_response(),
    }
}

/// The text of the first `<name>` element (any namespace prefix).
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = xml.find(&format!("{name}>"))? + name.len() + 1;
    let len = xml[open..].find('<')?;
    Some(xml[open..open + len].trim())
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn timestamp(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// xs:duration, as .NET's TimeSpan serializer writes it.
fn iso_duration(duration: Option<Duration>) -> String {
    match duration {
        None => "P10675199DT2H48M5.4775807S".into(),
        Some(d) if d.subsec_millis() == 0 => format!("PT{}S", d.as_secs()),
        Some(d) => format!("PT{}.{:03}S", d.as_secs(), d.subsec_millis()),
    }
}

fn empty_feed(self_link: &str) -> String {
    format!(
        r#"<feed xmlns="http://www.w3.org/2005/Atom"><title type="text">Publicly Listed Services</title><subtitle type="text">This is the list of publicly-listed services currently available.</subtitle><id>uuid:{}</id><updated>{}</updated><generator>Service Bus 1.1</generator><link rel="self" href="{}"/></feed>"#,
        uuid::Uuid::new_v4(),
        timestamp(now_ms()),
        escape(self_link)
    )
}

fn count_details(counts: &Counts) -> String {
    let ns = "http://schemas.microsoft.com/netservices/2011/06/servicebus";
    format!(
        r#"<CountDetails xmlns:d2p1="{ns}"><d2p1:ActiveMessageCount>{}</d2p1:ActiveMessageCount><d2p1:DeadLetterMessageCount>{}</d2p1:DeadLetterMessageCount><d2p1:ScheduledMessageCount>0</d2p1:ScheduledMessageCount><d2p1:TransferMessageCount>0</d2p1:TransferMessageCount><d2p1:TransferDeadLetterMessageCount>{}</d2p1:TransferDeadLetterMessageCount></CountDetails>"#,
        counts.active, counts.dead_letter, counts.transfer_dead_letter
    )
}

fn store_fields(settings: &StoreSettings, counts: &Counts) -> String {
    let mut xml = String::new();
    let _ = write!(
        xml,
        "<LockDuration>{}</LockDuration>",
        iso_duration(Some(settings.lock_duration))
    );
    let _ = write!(
        xml,
        "<DefaultMessageTimeToLive>{}</DefaultMessageTimeToLive>",
        iso_duration(settings.default_message_ttl)
    );
    let _ = write!(
        xml,
        "<MaxDeliveryCount>{}</MaxDeliveryCount>",
        settings.max_delivery_count
    );
    let _ = write!(
        xml,
        "<MessageCount>{}</MessageCount>",
        counts.active + counts.dead_letter + counts.transfer_dead_letter
    );
    xml
}

/// `<ForwardTo>`, where Azure writes it: after the dead-lettering settings.
fn forward_to_element(forward_to: &Option<String>) -> String {
    forward_to
        .as_ref()
        .map_or(String::new(), |t| format!("<ForwardTo>{}</ForwardTo>", escape(t)))
}

fn entry(description: &Description, self_link: &str) -> String {
    let (title, created_at_ms, content) = match description {
        Description::Queue {
            name,
            settings,
            counts,
            created_at_ms,
            forward_to,
        } => (
            name.clone(),
            *created_at_ms,
            format!(
                r#"<QueueDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">{}<MaxSizeInMegabytes>{}</MaxSizeInMegabytes><RequiresDuplicateDetection>false</RequiresDuplicateDetection><RequiresSession>false</RequiresSession><DeadLetteringOnMessageExpiration>false</DeadLetteringOnMessageExpiration><EnableBatchedOperations>true</EnableBatchedOperations><SizeInBytes>{}</SizeInBytes><Status>{}</Status><CreatedAt>{created}</CreatedAt><UpdatedAt>{created}</UpdatedAt><AccessedAt>{now}</AccessedAt>{}<EnablePartitioning>false</EnablePartitioning><EnableExpress>false</EnableExpress>{}</QueueDescription>"#,
                store_fields(settings, counts),
                settings.max_size_bytes.map_or(1024, |b| b >> 20),
                counts.size_bytes,
                settings.status.as_str(),
                count_details(counts),
                forward_to_element(forward_to),
                created = timestamp(*created_at_ms),
                now = timestamp(now_ms()),
            ),
        ),
        Description::Topic {
            name,
            subscription_count,
            created_at_ms,
        } => (
            name.clone(),
            *created_at_ms,
            format!(
                r#"<TopicDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect" xmlns:i="http://www.w3.org/2001/XMLSchema-instance"><DefaultMessageTimeToLive>{}</DefaultMessageTimeToLive><MaxSizeInMegabytes>1024</MaxSizeInMegabytes><SizeInBytes>0</SizeInBytes><Status>Active</Status><CreatedAt>{created}</CreatedAt><UpdatedAt>{created}</UpdatedAt><SubscriptionCount>{subscription_count}</SubscriptionCount><EnablePartitioning>false</EnablePartitioning></TopicDescription>"#,
                iso_duration(None),
                created = timestamp(*created_at_ms),
            ),
        ),
        Description::Subscription {
            name,
            settings,
            counts,
            created_at_ms,
            forward_to,
        } => (
            name.clone(),
            *created_at_ms,
            format!(
                r#"<SubscriptionDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">{}<RequiresSession>false</RequiresSession><DeadLetteringOnMessageExpiration>false</DeadLetteringOnMessageExpiration><EnableBatchedOperations>true</EnableBatchedOperations><Status>Active</Status><CreatedAt>{created}</CreatedAt><UpdatedAt>{created}</UpdatedAt><AccessedAt>{now}</AccessedAt>{}{}</SubscriptionDescription>"#,
                store_fields(settings, counts),
                count_details(counts),
                forward_to_element(forward_to),
                created = timestamp(*created_at_ms),
                now = timestamp(now_ms()),
            ),
        ),
    };
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><entry xmlns="http://www.w3.org/2005/Atom"><id>{link}</id><title type="text">{}</title><published>{created}</published><updated>{created}</updated><author><name>servicebus-emulator</name></author><link rel="self" href="{link}"/><content type="application/xml">{content}</content></entry>"#,
        escape(&title),
        link = escape(self_link),
        created = timestamp(created_at_ms),
    )
}

#[cfg(test)]
mod tests {
    use super::element;

    #[test]
    fn element_reads_the_first_element_whatever_its_prefix() {
        let xml = r#"<entry><content><QueueDescription><d:MaxSizeInMegabytes> 1 </d:MaxSizeInMegabytes><LockDuration>PT1M</LockDuration></QueueDescription></content></entry>"#;
        assert_eq!(element(xml, "MaxSizeInMegabytes"), Some("1"));
        assert_eq!(element(xml, "LockDuration"), Some("PT1M"));
        assert_eq!(element(xml, "Status"), None);
    }
}
