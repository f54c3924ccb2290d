//! `DLQ_BRIDGE__<PATH>` environment overrides: read from the process, and
//! applied to the YAML tree before it is typed, so they pass the same checks
//! as the file.

use super::ConfigError;
use super::locate::{did_you_mean, readable};

/// Overrides are `DLQ_BRIDGE__` + path; the double underscore keeps them apart
/// from the CLI's own variables (`DLQ_BRIDGE_CONFIG`, `DLQ_BRIDGE_LOG`).
const ENV_PREFIX: &str = "DLQ_BRIDGE";
const ENV_SEPARATOR: &str = "__";

/// Collect `DLQ_BRIDGE__*` overrides from the process environment through the
/// `config` crate's environment source.
pub fn env_overrides_from_process() -> Vec<(String, String)> {
    use config::Source as _;
    let env = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR);
    let Ok(map) = env.collect() else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = map.into_iter().map(|(k, v)| (k, v.to_string())).collect();
    out.sort();
    out
}

/// For the `*_env` fields: the name of an environment variable (letters,
/// digits, `_`, `.` and `-`, not starting with a digit), checked when the
/// file is loaded. A value that cannot be one is most likely the secret
/// itself pasted in (a connection string, a webhook URL): it is refused
/// without being repeated, since every later error would print it as the
/// name of a variable that is not set.
pub(super) fn opt_var_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::Deserialize as _;
    let name = Option::<String>::deserialize(d)?;
    if let Some(n) = &name
        && !n.trim().is_empty()
        && !is_var_name(n)
    {
        return Err(serde::de::Error::custom(
            "must be the name of an environment variable (letters, digits, `_`, `.`, `-`), which holds \
             the secret: this value is not one (is it the secret itself? it is not repeated here)",
        ));
    }
    Ok(name)
}

fn is_var_name(n: &str) -> bool {
    n.len() <= 256
        && n.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && n.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

pub(super) fn env_var_for(dotted: &str) -> String {
    format!(
        "{ENV_PREFIX}{ENV_SEPARATOR}{}",
        dotted.replace('.', ENV_SEPARATOR).to_uppercase()
    )
}

pub(super) fn apply_override(tree: &mut serde_yaml::Value, key: &str, raw: &str) -> Result<(), ConfigError> {
    let value: serde_yaml::Value = serde_yaml::from_str(raw).unwrap_or_else(|_| serde_yaml::Value::String(raw.into()));
    set_override(tree, key, value)
}

/// [`apply_override`] with the value as the text it is, not read as YAML.
pub(super) fn apply_override_text(tree: &mut serde_yaml::Value, key: &str, raw: &str) -> Result<(), ConfigError> {
    set_override(tree, key, serde_yaml::Value::String(raw.into()))
}

/// The longest override key that set a map or list holding `field`.
pub(super) fn override_holding<'a>(overrides: &'a [(String, String)], field: &str) -> Option<&'a String> {
    overrides
        .iter()
        .map(|(key, _)| key)
        .filter(|key| field.starts_with(&format!("{key}.")) || field.starts_with(&format!("{key}[")))
        .max_by_key(|key| key.len())
}

/// The error of a config that overrides made invalid at `field`, naming the
/// variable the user set: the one for `field` itself, the one that set
/// something holding it, or the one that set something inside it (an unknown
/// key is reported at its parent, and `DLQ_BRIDGE__NOPE__X` was named
/// `DLQ_BRIDGE__NOPE`, a variable nobody set).
pub(super) fn env_error(overrides: &[(String, String)], field: &str, message: String) -> ConfigError {
    let keys = || overrides.iter().map(|(key, _)| key);
    // The variable for the field itself, else the nearest one that set
    // something holding it (a whole list or map), else one inside it.
    let set = keys()
        .find(|key| *key == field)
        .or_else(|| override_holding(overrides, field))
        .or_else(|| keys().find(|key| key.starts_with(&format!("{field}.")) || field.is_empty()));
    let mut message = readable(&message);
    if let Some(hint) = did_you_mean(&message) {
        message.push_str(&format!("; did you mean `{hint}`?"));
    }
    ConfigError::Env {
        var: env_var_for(set.map_or(field, String::as_str)),
        message: if field.is_empty() {
            message
        } else {
            format!("{field}: {message}")
        },
    }
}

fn set_override(tree: &mut serde_yaml::Value, key: &str, value: serde_yaml::Value) -> Result<(), ConfigError> {
    let var = env_var_for(key);
    if key.split('.').any(|seg| seg.is_empty()) {
        return Err(ConfigError::Env {
            var,
            message: "empty path segment".into(),
        });
    }
    let mut node = tree;
    for seg in key.split('.') {
        let map = match node {
            serde_yaml::Value::Mapping(m) => m,
            serde_yaml::Value::Null => {
                *node = serde_yaml::Value::Mapping(Default::default());
                node.as_mapping_mut().expect("just set")
            }
            _ => {
                return Err(ConfigError::Env {
                    var,
                    message: format!("`{seg}` is inside a value that is not a map (lists cannot be overridden)"),
                });
            }
        };
        node = map
            .entry(serde_yaml::Value::String(seg.into()))
            .or_insert(serde_yaml::Value::Null);
    }
    *node = value;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn env_override_sets_nested_value_and_reports_bad_ones() {
        let y = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        let c = Config::from_yaml(y, "t", &[("redrive.concurrency".into(), "9".into())]).unwrap();
        assert_eq!(c.redrive.concurrency, 9);
        let err = Config::from_yaml(y, "t", &[("redrive.concurency".into(), "9".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("DLQ_BRIDGE__REDRIVE__CONCURENCY"), "{err}");
        assert!(err.contains("unknown field `concurency`"), "{err}");
    }

    /// A value that did not fit, set from the environment (often from a
    /// Secret), is not quoted back: a webhook URL given where `{url: …}`
    /// was meant carries its token.
    #[test]
    fn an_override_error_does_not_quote_a_secret() {
        let y = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        let env = [(
            "alerts.sinks".to_string(),
            r#"[{slack: "https://hooks.slack.com/services/T0/B0/SECRETTOKEN"}]"#.to_string(),
        )];
        let err = Config::from_yaml(y, "t", &env).unwrap_err().to_string();
        assert!(!err.contains("SECRETTOKEN"), "{err}");
        assert!(err.contains("DLQ_BRIDGE__ALERTS__SINKS"), "{err}");
        assert!(err.contains("expected `{url: …}` or `{url_env: VARIABLE}`"), "{err}");
    }

    /// With a map and a field inside it both set, an error at the field
    /// names the field's own variable.
    #[test]
    fn the_nearest_override_is_named() {
        let y = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        let env = [
            ("redrive".to_string(), "{hold: 5m}".to_string()),
            ("redrive.hold".to_string(), "soon".to_string()),
        ];
        let err = Config::from_yaml(y, "t", &env).unwrap_err().to_string();
        assert!(
            err.starts_with("environment override DLQ_BRIDGE__REDRIVE__HOLD:"),
            "{err}"
        );
    }
}
