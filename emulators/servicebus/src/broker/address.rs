//! AMQP link addresses as Service Bus clients write them.

use std::fmt;

/// A message store: a queue or subscription, or its dead-letter sub-queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntityPath {
    /// Queue or topic name, lower-cased: Service Bus names are case-insensitive.
    pub entity: String,
    pub subscription: Option<String>,
    pub dead_letter: bool,
}

impl EntityPath {
    /// The same entity without the dead-letter suffix.
    pub fn parent(&self) -> EntityPath {
        EntityPath {
            dead_letter: false,
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
        if self.dead_letter {
            f.write_str("/$DeadLetterQueue")?;
        }
        Ok(())
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
    let dead_letter = segments.last() == Some(&"$deadletterqueue");
    if dead_letter {
        segments.pop();
    }
    let entity = match segments.as_slice() {
        [entity] if !entity.starts_with('$') => EntityPath {
            entity: (*entity).to_owned(),
            subscription: None,
            dead_letter,
        },
        [topic, "subscriptions", sub] if !topic.starts_with('$') && !sub.starts_with('$') => EntityPath {
            entity: (*topic).to_owned(),
            subscription: Some((*sub).to_owned()),
            dead_letter,
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
            dead_letter,
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
    fn displays_canonical_path() {
        assert_eq!(
            entity("t", Some("s"), true).to_string(),
            "t/Subscriptions/s/$DeadLetterQueue"
        );
    }
}
