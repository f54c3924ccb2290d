//! The topology file: which queues, topics and subscriptions exist at start-up.

use std::{path::Path, time::Duration};

use serde::{Deserialize, Deserializer};

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read topology file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid topology file {path}: {source}")]
    Parse { path: String, source: serde_yaml::Error },
    #[error("entity {0:?} is declared twice")]
    Duplicate(String),
}

/// Per-entity settings; every field falls back to `defaults`, then to the CLI flags.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntitySettings {
    pub max_delivery_count: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    pub lock_duration: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub default_message_ttl: Option<Duration>,
}

impl EntitySettings {
    /// `self` where set, otherwise `fallback`.
    pub fn or(&self, fallback: &EntitySettings) -> EntitySettings {
        EntitySettings {
            max_delivery_count: self.max_delivery_count.or(fallback.max_delivery_count),
            lock_duration: self.lock_duration.or(fallback.lock_duration),
            default_message_ttl: self.default_message_ttl.or(fallback.default_message_ttl),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSpec {
    pub name: String,
    pub max_delivery_count: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    pub lock_duration: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub default_message_ttl: Option<Duration>,
}

impl QueueSpec {
    pub fn settings(&self) -> EntitySettings {
        EntitySettings {
            max_delivery_count: self.max_delivery_count,
            lock_duration: self.lock_duration,
            default_message_ttl: self.default_message_ttl,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    pub name: String,
    pub max_delivery_count: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    pub lock_duration: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub default_message_ttl: Option<Duration>,
}

impl SubscriptionSpec {
    pub fn settings(&self) -> EntitySettings {
        EntitySettings {
            max_delivery_count: self.max_delivery_count,
            lock_duration: self.lock_duration,
            default_message_ttl: self.default_message_ttl,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    #[serde(default, deserialize_with = "duration")]
    pub default_message_ttl: Option<Duration>,
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    #[serde(default)]
    pub defaults: EntitySettings,
    #[serde(default)]
    pub queues: Vec<QueueSpec>,
    #[serde(default)]
    pub topics: Vec<TopicSpec>,
}

impl Topology {
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: display.clone(),
            source,
        })?;
        let topology: Topology =
            serde_yaml::from_str(&text).map_err(|source| TopologyError::Parse { path: display, source })?;
        topology.check_unique()?;
        Ok(topology)
    }

    /// Queues and topics share one namespace in Service Bus, as do a topic's subscriptions.
    fn check_unique(&self) -> Result<(), TopologyError> {
        let mut seen = std::collections::HashSet::new();
        let names = self
            .queues
            .iter()
            .map(|q| q.name.to_lowercase())
            .chain(self.topics.iter().map(|t| t.name.to_lowercase()));
        for name in names {
            if !seen.insert(name.clone()) {
                return Err(TopologyError::Duplicate(name));
            }
        }
        for topic in &self.topics {
            let mut subs = std::collections::HashSet::new();
            for sub in &topic.subscriptions {
                if !subs.insert(sub.name.to_lowercase()) {
                    return Err(TopologyError::Duplicate(format!(
                        "{}/Subscriptions/{}",
                        topic.name, sub.name
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Accepts `30s`, `1m 30s`, `500ms` (humantime) or a bare number of seconds.
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Raw::Seconds(secs)) => Ok(Some(Duration::from_secs(secs))),
        Some(Raw::Text(text)) => humantime::parse_duration(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_example() {
        let yaml = r#"
defaults: { max_delivery_count: 5, lock_duration: 30s }
queues:
  - name: orders
    max_delivery_count: 3
    default_message_ttl: 1h
topics:
  - name: events
    subscriptions:
      - { name: audit, lock_duration: 10 }
"#;
        let t: Topology = serde_yaml::from_str(yaml).unwrap();
        t.check_unique().unwrap();
        assert_eq!(t.queues[0].max_delivery_count, Some(3));
        assert_eq!(
            t.topics[0].subscriptions[0].lock_duration,
            Some(Duration::from_secs(10))
        );
        assert_eq!(t.defaults.lock_duration, Some(Duration::from_secs(30)));
    }

    #[test]
    fn rejects_unknown_fields() {
        assert!(serde_yaml::from_str::<Topology>("queues: [{name: a, colour: red}]").is_err());
    }
}
