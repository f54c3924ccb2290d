//! AMQP link addresses as Service Bus clients write them.

use std::fmt;

/// Which of an entity's message lists a path names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SubQueue {
    /// The queue or subscription itself.
    #[default]
    None,
    /// `$DeadLetterQueue`.
    DeadLetter,
    /// `$Transfer/$DeadLetterQueue`: messages that auto-forwarding
    /// (ForwardTo) could not deliver.
    TransferDeadLetter,
}

impl SubQueue {
    /// Either dead-letter sub-queue: nothing is sent to one, nothing in one
    /// is dead-lettered again, and it has no MaxDeliveryCount.
    pub fn is_dead_letter(self) -> bool {
        self != SubQueue::None
    }
}

/// A message store: a queue or subscription, or one of its dead-letter sub-queues.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntityPath {
    /// Queue or topic name, lower-cased: Service Bus names are case-insensitive.
    pub entity: String,
    pub subscription: Option<String>,
    pub sub_queue: SubQueue,
}

impl EntityPath {
    /// The same entity without the dead-letter suffix.
    pub fn parent(&self) -> EntityPath {
        EntityPath {
            sub_queue: SubQueue::None,
            ..self.clone()
        }
    }
}

impl fmt::Display for EntityPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.entity)?;
        if let Some(sub) = &self.subscription {
            write!(f, "/Subscriptions/{sub}")?;
        }
        match self.sub_queue {
            SubQueue::None => Ok(()),
            SubQueue::DeadLetter => f.write_str("/$DeadLetterQueue"),
            SubQueue::TransferDeadLetter => f.write_str("/$Transfer/$DeadLetterQueue"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Cbs,
    Entity(EntityPath),
    Management(EntityPath),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unsupported Service Bus address {0:?}")]
pub struct AddressError(pub String);

/// Accepts a bare path (`orders/$DeadLetterQueue`) or a full URI
/// (`amqps://host/orders`), which the Python SDK sends.
pub fn parse(address: &str) -> Result<Node, AddressError> {
    let invalid = || AddressError(address.to_owned());
    let path = path_of(address);
    let mut segments: Vec<&str> = path.split('/').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(invalid());
    }
    if segments == ["$cbs"] {
        return Ok(Node::Cbs);
    }
    let management = segments.last() == Some(&"$management");
    if management {
        segments.pop();
    }
    let mut sub_queue = SubQueue::None;
    if segments.last() == Some(&"$deadletterqueue") {
        segments.pop();
        sub_queue = SubQueue::DeadLetter;
        if segments.last() == Some(&"$transfer") {
            segments.pop();
            sub_queue = SubQueue::TransferDeadLetter;
        }
    }
    let entity = match segments.as_slice() {
        [entity] if !entity.starts_with('$') => EntityPath {
            entity: (*entity).to_owned(),
            subscription: None,
            sub_queue,
        },
        [topic, "subscriptions", sub] if !topic.starts_with('$') && !sub.starts_with('$') => EntityPath {
            entity: (*topic).to_owned(),
            subscription: Some((*sub).to_owned()),
            sub_queue,
        },
        _ => return Err(invalid()),
    };
    Ok(if management {
        Node::Management(entity)
    } else {
        Node::Entity(entity)
    })
}

/// The path of a bare path or a full URI, lower-cased, without scheme, host
/// and slashes at either end (`""` for the namespace itself).
pub fn path_of(address: &str) -> String {
    let path = match address.find("://") {
        Some(scheme_end) => {
            let rest = &address[scheme_end + 3..];
            rest.find('/').map_or("", |slash| &rest[slash + 1..])
        }
        None => address,
    };
    path.trim_matches('/').to_lowercase()
}

/// Whether a token for the path `audience` (a `$cbs` put's audience, or the
/// resource a signature was made for) covers `path`: Azure's audiences are
/// URI prefixes.
pub fn token_covers(audience: &str, path: &str) -> bool {
    audience.is_empty() || path == audience || path.strip_prefix(audience).is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_covers_its_path_and_what_lies_below_it() {
        assert!(token_covers("", "orders"));
        assert!(token_covers("orders", "orders"));
        assert!(token_covers("orders", "orders/$deadletterqueue/$management"));
        assert!(!token_covers("orders", "orders-2"));
        assert!(!token_covers("orders/$deadletterqueue", "orders"));
    }

    fn entity(entity: &str, subscription: Option<&str>, dead_letter: bool) -> EntityPath {
        EntityPath {
            entity: entity.into(),
            subscription: subscription.map(Into::into),
            sub_queue: if dead_letter {
                SubQueue::DeadLetter
            } else {
                SubQueue::None
            },
        }
    }

    fn transfer(entity: &str, subscription: Option<&str>) -> EntityPath {
        EntityPath {
            entity: entity.into(),
            subscription: subscription.map(Into::into),
            sub_queue: SubQueue::TransferDeadLetter,
        }
    }

    #[test]
    fn parses_service_bus_addresses() {
        assert_eq!(parse("$cbs"), Ok(Node::Cbs));
        assert_eq!(parse("Orders"), Ok(Node::Entity(entity("orders", None, false))));
        assert_eq!(
            parse("amqps://ns.servicebus.windows.net/Orders/$DeadLetterQueue"),
            Ok(Node::Entity(entity("orders", None, true)))
        );
        assert_eq!(
            parse("Events/Subscriptions/Audit/$deadletterqueue/$management"),
            Ok(Node::Management(entity("events", Some("audit"), true)))
        );
        assert_eq!(
            parse("events/subscriptions/audit"),
            Ok(Node::Entity(entity("events", Some("audit"), false)))
        );
        assert!(parse("a/b").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn parses_transfer_dead_letter_addresses() {
        assert_eq!(
            parse("Orders/$Transfer/$DeadLetterQueue"),
            Ok(Node::Entity(transfer("orders", None)))
        );
        assert_eq!(
            parse("amqps://ns/Events/Subscriptions/Audit/$Transfer/$DeadLetterQueue/$management"),
            Ok(Node::Management(transfer("events", Some("audit"))))
        );
        // `$Transfer` alone is no sub-queue, nor a transfer queue's own DLQ path reversed.
        assert!(parse("orders/$Transfer").is_err());
        assert!(parse("orders/$DeadLetterQueue/$Transfer").is_err());
        assert_eq!(
            transfer("t", Some("s")).to_string(),
            "t/Subscriptions/s/$Transfer/$DeadLetterQueue"
        );
        assert!(token_covers("orders", "orders/$transfer/$deadletterqueue/$management"));
    }

    #[test]
    fn displays_canonical_path() {
        assert_eq!(
            entity("t", Some("s"), true).to_string(),
            "t/Subscriptions/s/$DeadLetterQueue"
        );
    }
}
