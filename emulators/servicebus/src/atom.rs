//! The ATOM management endpoint: the one GET that reports message counts.

use std::{fmt::Write as _, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::post,
};
use chrono::{DateTime, SecondsFormat, Utc};

use crate::broker::{
    Broker, Counts, Description, StoreSettings,
    address::{self, Node},
    now_ms,
};

pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        // Emulator-only: not part of Service Bus.
        .route("/$emulator/reset", post(reset))
        .fallback(entity)
        .with_state(broker)
}

async fn reset(State(broker): State<Arc<Broker>>) -> StatusCode {
    broker.reset();
    tracing::info!("state reset");
    StatusCode::NO_CONTENT
}

async fn entity(State(broker): State<Arc<Broker>>, method: Method, uri: Uri) -> Response {
    if method != Method::GET {
        return (
            StatusCode::NOT_IMPLEMENTED,
            format!("servicebus-emulator implements only GET on entities, not {method}"),
        )
            .into_response();
    }
    let path = uri.path().replace("%24", "$");
    let self_link = format!("https://127.0.0.1{}", uri);
    let description = match address::parse(&path) {
        Ok(Node::Entity(path)) if !path.dead_letter => broker.describe(&path),
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
        r#"<CountDetails xmlns:d2p1="{ns}"><d2p1:ActiveMessageCount>{}</d2p1:ActiveMessageCount><d2p1:DeadLetterMessageCount>{}</d2p1:DeadLetterMessageCount><d2p1:ScheduledMessageCount>0</d2p1:ScheduledMessageCount><d2p1:TransferMessageCount>0</d2p1:TransferMessageCount><d2p1:TransferDeadLetterMessageCount>0</d2p1:TransferDeadLetterMessageCount></CountDetails>"#,
        counts.active, counts.dead_letter
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
        counts.active + counts.dead_letter
    );
    xml
}

fn entry(description: &Description, self_link: &str) -> String {
    let (title, created_at_ms, content) = match description {
        Description::Queue {
            name,
            settings,
            counts,
            created_at_ms,
        } => (
            name.clone(),
            *created_at_ms,
            format!(
                r#"<QueueDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">{}<MaxSizeInMegabytes>1024</MaxSizeInMegabytes><RequiresDuplicateDetection>false</RequiresDuplicateDetection><RequiresSession>false</RequiresSession><DeadLetteringOnMessageExpiration>false</DeadLetteringOnMessageExpiration><EnableBatchedOperations>true</EnableBatchedOperations><SizeInBytes>{}</SizeInBytes><Status>Active</Status><CreatedAt>{created}</CreatedAt><UpdatedAt>{created}</UpdatedAt><AccessedAt>{now}</AccessedAt>{}<EnablePartitioning>false</EnablePartitioning><EnableExpress>false</EnableExpress></QueueDescription>"#,
                store_fields(settings, counts),
                counts.size_bytes,
                count_details(counts),
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
        } => (
            name.clone(),
            *created_at_ms,
            format!(
                r#"<SubscriptionDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">{}<RequiresSession>false</RequiresSession><DeadLetteringOnMessageExpiration>false</DeadLetteringOnMessageExpiration><EnableBatchedOperations>true</EnableBatchedOperations><Status>Active</Status><CreatedAt>{created}</CreatedAt><UpdatedAt>{created}</UpdatedAt><AccessedAt>{now}</AccessedAt>{}</SubscriptionDescription>"#,
                store_fields(settings, counts),
                count_details(counts),
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
