//! Durations as the config writes them (`30s`, `5m`, `1h30m`), for
//! `#[serde(with = ...)]`; poll intervals also refuse anything shorter than
//! [`MIN_POLL_INTERVAL`].

use std::time::Duration;

/// Serde for durations written as text: `30s`, `5m`, `1h30m`, `250ms`.
pub mod duration_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    pub fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim()).map_err(|e| match e {
            // humantime's own advice (`7sec`, `7ms`) is not this tool's style.
            humantime::DurationError::NumberExpected(_) | humantime::DurationError::UnknownUnit { .. }
                if text.trim().chars().all(|c| c.is_ascii_digit()) =>
            {
                format!(
                    "invalid duration `{text}`: a unit is needed, e.g. `{0}s`, `{0}m`, `{0}h` or `{0}d`",
                    text.trim()
                )
            }
            e => format!("invalid duration `{text}` ({e}); expected e.g. `30s`, `5m`, `1h30m`"),
        })
    }
}

/// Like [`duration_text`], for optional fields.
pub mod opt_duration_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_text::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => super::duration_text::parse(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

/// The shortest poll interval: shorter ones hammer the provider's admin API
/// (and a failing one, the log) for no fresher data.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// [`duration_text`] for poll intervals, refusing those under `MIN_POLL_INTERVAL`.
pub mod poll_interval_text {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        super::duration_text::serialize(d, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        check(super::duration_text::deserialize(d)?).map_err(serde::de::Error::custom)
    }

    pub fn check(d: Duration) -> Result<Duration, String> {
        if d < super::MIN_POLL_INTERVAL {
            return Err(format!(
                "poll interval {} is too short: at least {}",
                humantime::format_duration(d),
                humantime::format_duration(super::MIN_POLL_INTERVAL)
            ));
        }
        Ok(d)
    }
}

/// Like [`poll_interval_text`], for a queue's optional own interval.
pub mod opt_poll_interval_text {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        super::opt_duration_text::serialize(d, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::opt_duration_text::deserialize(d)?
            .map(super::poll_interval_text::check)
            .transpose()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    #[test]
    fn a_number_without_a_unit_asks_for_one() {
        let err = duration_text::parse("7").unwrap_err();
        assert_eq!(
            err,
            "invalid duration `7`: a unit is needed, e.g. `7s`, `7m`, `7h` or `7d`"
        );
    }

    #[test]
    fn bad_duration_is_explained() {
        let err = parse("redrive:\n  hold: 5 parsecs\n").unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:2:"), "{err}");
        assert!(err.contains("redrive.hold"), "{err}");
        assert!(err.contains("invalid duration `5 parsecs`"), "{err}");
    }

    #[test]
    fn poll_intervals_under_a_second_are_refused_where_written() {
        let err = parse("serve:\n  listen: 127.0.0.1:1\n  poll_interval: 0s\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.yaml:3:"), "{err}");
        assert!(
            err.contains("serve.poll_interval") && err.contains("at least 1s"),
            "{err}"
        );
        let y = "queues:\n  - name: a\n    sqs: {queue: x, region: r}\n    poll_interval: 500ms\n";
        let err = parse(y).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:4:"), "{err}");
        assert!(err.contains("queues[0].poll_interval"), "{err}");
        assert_eq!(
            parse("serve:\n  poll_interval: 1s\n").unwrap().serve.poll_interval,
            Duration::from_secs(1)
        );
    }
}
