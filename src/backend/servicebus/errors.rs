//! What the broker refused, read out of an error: the AMQP condition or the
//! `$cbs`/`$management` status it names, the broker's own words, and the
//! [`BackendError`] each comes to. Apart from the adapter because the
//! azservicebus client and the link ([`super::link`]) both classify by
//! them, so that a refusal reads the same whichever connection met it.

use fe2o3_amqp_types::definitions::ErrorCondition;
use fe2o3_amqp_types::primitives::Symbol;

use super::{BackendError, PROVIDER};

/// An AMQP error condition as the broker named it (`amqp:resource-limit-exceeded`,
/// `com.microsoft:entity-disabled`), which is what Azure's documentation
/// and its exception names go by, not the client library's enum.
pub(super) fn condition_name(condition: &ErrorCondition) -> String {
    let symbol = match condition {
        ErrorCondition::AmqpError(e) => Symbol::from(e),
        ErrorCondition::ConnectionError(e) => Symbol::from(e),
        ErrorCondition::SessionError(e) => Symbol::from(e),
        ErrorCondition::LinkError(e) => Symbol::from(e),
        ErrorCondition::Custom(s) => s.clone(),
        #[allow(unreachable_patterns)]
        other => return format!("{other:?}"),
    };
    symbol.0
}

/// What the broker said when it refused a call, read from an AMQP error
/// condition (an attach answered with a detach, a link detached) or a
/// `$cbs`/`$management` status code in an error's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// `amqp:unauthorized-access`, status 401 or 403.
    Unauthorized,
    /// `amqp:not-found`, `amqp:resource-deleted`, status 404.
    NotFound,
    /// `com.microsoft:entity-disabled`.
    Disabled,
    /// Any other refusal, which asking again will not change
    /// (`amqp:not-allowed`, `amqp:resource-limit-exceeded`, status 400...):
    /// the condition's symbol or the status.
    Refused(String),
    /// A condition that passes (a forced detach or close, the broker busy or
    /// timing out): the link or connection is to be opened again.
    Transient,
}

/// The status code of a `$management` answer in fe2o3-amqp's `Debug` of an
/// error (`StatusCode(503)`).
fn status_code_in(text: &str) -> Option<u16> {
    text.split_once("StatusCode(")?.1.split(')').next()?.trim().parse().ok()
}

/// Whether fe2o3-amqp's `Debug` of an error is Service Bus throttling:
/// `com.microsoft:server-busy` on a link, 503 (or 429) from `$management`.
/// Azure counts peeks against a namespace's throttling credits as it does
/// sends, and asks for the request again after a pause.
pub(super) fn is_server_busy(text: &str) -> bool {
    text.contains("com.microsoft:server-busy") || matches!(status_code_in(text), Some(503 | 429))
}

/// The broker's condition or status in an error's text (its `Debug`, or
/// azservicebus's `Display`, which quotes fe2o3-amqp's), as a [`Refusal`];
/// None when there is none (an I/O error, a timeout, a local state).
pub(super) fn refusal_in(text: &str) -> Option<Refusal> {
    if let Some(symbol) = condition_in(text) {
        return Some(refusal_of(symbol));
    }
    let code = status_code_in(text)?;
    Some(match code {
        401 | 403 => Refusal::Unauthorized,
        404 | 410 => Refusal::NotFound,
        408 | 429 => Refusal::Transient,
        400..=499 => Refusal::Refused(format!("status {code}")),
        _ => Refusal::Transient,
    })
}

/// What an AMQP condition, by the broker's symbol, says was refused.
pub(super) fn refusal_of(symbol: String) -> Refusal {
    match symbol.as_str() {
        "amqp:unauthorized-access" => Refusal::Unauthorized,
        "amqp:not-found" | "amqp:resource-deleted" => Refusal::NotFound,
        "com.microsoft:entity-disabled" => Refusal::Disabled,
        "amqp:internal-error"
        | "amqp:illegal-state"
        | "amqp:link:detach-forced"
        | "amqp:link:stolen"
        | "amqp:link:redirect"
        | "com.microsoft:server-busy"
        | "com.microsoft:timeout"
        | "com.microsoft:operation-cancelled" => Refusal::Transient,
        s if s.starts_with("amqp:connection:") || s.starts_with("amqp:session:") => Refusal::Transient,
        _ => Refusal::Refused(symbol),
    }
}

/// The AMQP condition named in fe2o3-amqp's `Debug` of an error
/// (`condition: AmqpError(NotAllowed)`,
/// `condition: Custom(Symbol("com.microsoft:entity-disabled"))`), as the
/// broker's symbol (`amqp:not-allowed`).
fn condition_in(text: &str) -> Option<String> {
    let rest = text.split_once("condition: ")?.1;
    if let Some(custom) = rest.strip_prefix("Custom(Symbol(\"") {
        return custom.split('"').next().map(str::to_string);
    }
    let (kind, rest) = rest.split_once('(')?;
    let name = rest.split(')').next()?;
    let prefix = match kind {
        "AmqpError" => "amqp:",
        "LinkError" => "amqp:link:",
        "SessionError" => "amqp:session:",
        "ConnectionError" if name == "ConnectionForced" => return Some("amqp:connection:forced".into()),
        "ConnectionError" => "amqp:connection:",
        _ => return None,
    };
    // The spec's symbols are the variants' names in kebab case.
    let mut symbol = prefix.to_string();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            symbol.push('-');
        }
        symbol.push(c.to_ascii_lowercase());
    }
    Some(symbol)
}

/// The broker's own description in a fe2o3-amqp error's debug text (an
/// AMQP error's `description`, a `$cbs` or `$management` status
/// description), which is what Azure's documentation and a user's search go
/// by; None when it has none.
pub(super) fn broker_words(debug: &str) -> Option<String> {
    let start = debug.find("description: Some(\"")? + "description: Some(\"".len();
    let mut words = String::new();
    let mut chars = debug[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(words),
            '\\' => match chars.next()? {
                'n' => words.push('\n'),
                't' => words.push('\t'),
                other => words.push(other),
            },
            c => words.push(c),
        }
    }
    None
}

/// A refusal's [`BackendError`]: `entity` is what was refused (named in
/// the error), `what` the call, `words` the broker's description. None for
/// a transient condition, which the caller reports as a connection's
/// failure.
pub(super) fn refusal_error(refusal: &Refusal, entity: &str, what: &str, words: &str) -> Option<BackendError> {
    let detail = format!("{what}: {words}");
    Some(match refusal {
        Refusal::Unauthorized => BackendError::Auth {
            provider: PROVIDER,
            detail,
        },
        Refusal::NotFound => BackendError::NotFound {
            queue: entity.to_string(),
            detail,
        },
        // Reached, and refused: the connection is fine (an unreachable
        // error would also drop the dead-letter queue's link, and what it
        // holds, for a destination that refuses sends).
        Refusal::Disabled => BackendError::Refused {
            provider: PROVIDER,
            detail: format!("{entity} is disabled ({detail}): set its status to Active"),
        },
        Refusal::Refused(condition) => BackendError::Refused {
            provider: PROVIDER,
            detail: format!("{entity} refused {what}: {condition}: {words}"),
        },
        Refusal::Transient => return None,
    })
}

/// Sort an azservicebus error into the backend's classes, by its kind and
/// the AMQP condition it names.
pub(super) fn classify(e: &azure_core::Error, unreachable: &BackendError, entity: &str, what: &str) -> BackendError {
    let text = format!("{e} ({e:?})");
    // Words are looked for outside the entity's name (which may hold "sasl").
    let lower = text.replace(entity, "").to_ascii_lowercase();
    let detail = format!("{what}: {e}");
    if let BackendError::Unreachable { endpoint, .. } = unreachable
        && let tls @ BackendError::Tls { .. } = BackendError::unreachable(endpoint.clone(), format!("{what}: {text}"))
    {
        return tls;
    }
    // The broker answered with a condition or a status: a refusal is told as
    // what it is, in the broker's words, never as "cannot reach".
    if let Some(refusal) = refusal_in(&text)
        && let Some(err) = refusal_error(
            &refusal,
            entity,
            what,
            &broker_words(&text).unwrap_or_else(|| e.to_string()),
        )
    {
        return err;
    }
    if lower.contains("not-found") || lower.contains("notfound") || lower.contains("messagingentitynotfound") {
        BackendError::NotFound {
            queue: entity.to_string(),
            detail,
        }
    } else if lower.contains("unauthorized")
        || lower.contains("unauthorized-access")
        || lower.contains("sasl")
        || lower.contains("status code: 401")
        || lower.contains("credential")
    {
        BackendError::Auth {
            provider: PROVIDER,
            detail,
        }
    } else if lower.contains("connection refused")
        || lower.contains("connect")
        || lower.contains("dns")
        || lower.contains("timed out")
        || lower.contains("broken pipe")
        || lower.contains("reset by peer")
        || lower.contains("io error")
        || matches!(e.kind(), azure_core::error::ErrorKind::Io)
    {
        match unreachable {
            BackendError::Unreachable { endpoint, .. } => BackendError::Unreachable {
                endpoint: endpoint.clone(),
                detail,
            },
            _ => BackendError::Provider {
                provider: PROVIDER,
                detail,
            },
        }
    } else {
        BackendError::Provider {
            provider: PROVIDER,
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_its_condition_as_the_broker_does() {
        use fe2o3_amqp_types::definitions::{AmqpError, LinkError};
        let named = |c| condition_name(&c);
        assert_eq!(
            named(ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded)),
            "amqp:resource-limit-exceeded"
        );
        assert_eq!(
            named(ErrorCondition::LinkError(LinkError::MessageSizeExceeded)),
            "amqp:link:message-size-exceeded"
        );
        assert_eq!(
            named(ErrorCondition::Custom(Symbol::from("com.microsoft:entity-disabled"))),
            "com.microsoft:entity-disabled"
        );
    }

    #[test]
    fn a_refusal_is_read_from_the_brokers_condition_or_status() {
        let of = |text: &str| refusal_in(text);
        let closed = |condition: &str| {
            format!(
                "RemoteClosedWithError(Error {{ condition: {condition}, description: Some(\"words\"), info: None }})"
            )
        };
        assert_eq!(
            of(&closed("AmqpError(UnauthorizedAccess)")),
            Some(Refusal::Unauthorized)
        );
        assert_eq!(of(&closed("AmqpError(NotFound)")), Some(Refusal::NotFound));
        assert_eq!(
            of(&closed(r#"Custom(Symbol("com.microsoft:entity-disabled"))"#)),
            Some(Refusal::Disabled)
        );
        assert_eq!(
            of(&closed("AmqpError(NotAllowed)")),
            Some(Refusal::Refused("amqp:not-allowed".into()))
        );
        assert_eq!(
            of(&closed("AmqpError(ResourceLimitExceeded)")),
            Some(Refusal::Refused("amqp:resource-limit-exceeded".into()))
        );
        assert_eq!(
            of(&closed(r#"Custom(Symbol("com.microsoft:argument-out-of-range"))"#)),
            Some(Refusal::Refused("com.microsoft:argument-out-of-range".into()))
        );
        for transient in [
            "LinkError(DetachForced)",
            "ConnectionError(ConnectionForced)",
            "SessionError(WindowViolation)",
            "AmqpError(InternalError)",
            r#"Custom(Symbol("com.microsoft:server-busy"))"#,
        ] {
            assert_eq!(of(&closed(transient)), Some(Refusal::Transient), "{transient}");
        }
        let status =
            |code: u16| format!("Status(StatusError {{ code: StatusCode({code}), description: Some(\"w\") }})");
        assert_eq!(of(&status(401)), Some(Refusal::Unauthorized));
        assert_eq!(of(&status(403)), Some(Refusal::Unauthorized));
        assert_eq!(of(&status(404)), Some(Refusal::NotFound));
        assert_eq!(of(&status(400)), Some(Refusal::Refused("status 400".into())));
        assert_eq!(of(&status(503)), Some(Refusal::Transient));
        // Throttling, which a browse asks again after a pause; nothing else is.
        assert!(is_server_busy(&status(503)) && is_server_busy(&status(429)));
        assert!(is_server_busy(&closed(
            r#"Custom(Symbol("com.microsoft:server-busy"))"#
        )));
        assert!(!is_server_busy(&status(500)) && !is_server_busy(&closed("AmqpError(InternalError)")));
        assert_eq!(of("Io(Custom { kind: ConnectionRefused })"), None);
        // As the user reads it: what was refused, the condition, the words.
        let e = refusal_error(
            &Refusal::Refused("amqp:not-allowed".into()),
            "dlq (events)",
            "attach",
            "'events' is a topic",
        )
        .unwrap();
        assert_eq!(
            e.to_string(),
            "Service Bus: dlq (events) refused attach: amqp:not-allowed: 'events' is a topic"
        );
        assert!(refusal_error(&Refusal::Transient, "q", "attach", "w").is_none());
    }

    #[test]
    fn the_brokers_words_are_read_out_of_an_error() {
        let attach = r#"RemoteClosedWithError(Error { condition: AmqpError(UnauthorizedAccess), description: Some("Unauthorized access. 'Send' claim(s) are required. Resource: \"q\"."), info: None })"#;
        assert_eq!(
            broker_words(attach).as_deref(),
            Some("Unauthorized access. 'Send' claim(s) are required. Resource: \"q\".")
        );
        let put = r#"Status(StatusError { code: StatusCode(401), description: Some("InvalidSignature: The token has an invalid signature.") })"#;
        assert_eq!(
            broker_words(put).as_deref(),
            Some("InvalidSignature: The token has an invalid signature.")
        );
        assert_eq!(broker_words("IllegalState"), None);
        assert_eq!(broker_words(r#"Error { description: None }"#), None);
    }
}
