//! Where an error is written: every config error names `file:line:column`
//! and the field (serde_yaml's own location is often the enclosing mapping,
//! and checks made after parsing have none), and suggests the field meant
//! when the name looks like a typo.

use super::ConfigError;

/// Where `field` (a path as errors name it: `queues[1].name`,
/// `redrive.concurrency`) is written in `text`: the 1-based line and column
/// of its key (or list item), or of the deepest part of the path that is
/// written there. Block YAML, and flow collections on one line; None when
/// not even the path's first key is in the file.
pub(super) fn locate(text: &str, field: &str) -> Option<(usize, usize)> {
    fn unindented(l: &str) -> &str {
        l.trim_start_matches(' ')
    }
    enum Step<'a> {
        Key(&'a str),
        Index(usize),
    }
    let mut steps = Vec::new();
    for part in field.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            steps.push(Step::Key(key));
        }
        while let Some((i, after)) = rest.split_once(']') {
            steps.push(Step::Index(i.parse().ok()?));
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    let lines: Vec<&str> = text.lines().collect();
    // Indentation is spaces alone: `trim_start` would also take other
    // whitespace (U+3000 is valid inside a quoted scalar), and a column
    // counted one way and sliced the other lands inside a character.
    let indent = |l: &str| l.len() - unindented(l).len();
    let meaningful = |l: &str| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#') && t != "---"
    };
    // Whether `line[col..]` is the key `key` (plain or quoted) followed by `:`.
    let key_at = |line: &str, col: usize, key: &str| {
        let rest = line.get(col..).unwrap_or("");
        [format!("{key}:"), format!("\"{key}\":"), format!("'{key}':")]
            .iter()
            .find(|k| rest.starts_with(k.as_str()))
            .map(|k| k.len())
            .filter(|len| rest[*len..].is_empty() || rest[*len..].starts_with([' ', '\t']))
    };
    // The current block: lines [from, to), the column its keys are at (None:
    // that of its first line), and an item line whose first key follows `- `.
    let (mut from, mut to) = (0, lines.len());
    let mut key_col: Option<usize> = None;
    let mut item_line: Option<usize> = None;
    // Inside a flow collection: its line and where the search goes on.
    let mut flow: Option<(usize, usize)> = None;
    let mut found = None;
    for step in steps {
        if let Some((n, pos)) = flow {
            // `{a: 1, b: {c: 2}}`: a key follows `{`, `,` or a space.
            let Step::Key(key) = step else { break };
            let line = lines[n];
            let at = line.get(pos..).and_then(|rest| {
                rest.match_indices(&format!("{key}:"))
                    .map(|(i, _)| pos + i)
                    .find(|&i| i == 0 || matches!(line.as_bytes()[i - 1], b'{' | b',' | b' '))
            });
            let Some(at) = at else { break };
            // Columns count characters, as an editor's do.
            found = Some((n + 1, line[..at].chars().count() + 1));
            flow = Some((n, at + key.len() + 1));
            continue;
        }
        match step {
            Step::Key(key) => {
                let col_of = |i: usize| {
                    if item_line == Some(i) {
                        key_col
                    } else {
                        Some(indent(lines[i]))
                    }
                };
                let Some(first) = (from..to).find(|&i| meaningful(lines[i])) else {
                    break;
                };
                let want = key_col.unwrap_or_else(|| indent(lines[first]));
                let Some((n, len)) = (from..to)
                    .filter(|&i| meaningful(lines[i]) && col_of(i) == Some(want))
                    .find_map(|i| key_at(lines[i], want, key).map(|len| (i, len)))
                else {
                    break;
                };
                found = Some((n + 1, want + 1));
                let value = lines[n][want + len..].trim_start();
                if value.starts_with('{') || value.starts_with('[') {
                    flow = Some((n, lines[n].len() - value.len()));
                    continue;
                }
                // The value's block: the lines below, more indented, or a
                // list at the key's own indentation.
                from = n + 1;
                to = (from..to)
                    .find(|&i| {
                        meaningful(lines[i])
                            && (indent(lines[i]) < want
                                || (indent(lines[i]) == want && !unindented(lines[i]).starts_with('-')))
                    })
                    .unwrap_or(to);
                key_col = None;
                item_line = None;
            }
            Step::Index(index) => {
                let Some(first) = (from..to).find(|&i| meaningful(lines[i])) else {
                    break;
                };
                if !unindented(lines[first]).starts_with('-') {
                    break;
                }
                let dash = indent(lines[first]);
                let is_item = |i: usize| indent(lines[i]) == dash && unindented(lines[i]).starts_with('-');
                let Some(n) = (from..to).filter(|&i| is_item(i)).nth(index) else {
                    break;
                };
                found = Some((n + 1, dash + 1));
                let after_dash = &lines[n][dash + 1..];
                let content = dash + 1 + (after_dash.len() - after_dash.trim_start().len());
                let end = (n + 1..to)
                    .find(|&i| meaningful(lines[i]) && indent(lines[i]) <= dash)
                    .unwrap_or(to);
                if lines[n][content..].starts_with('{') || lines[n][content..].starts_with('[') {
                    flow = Some((n, content));
                } else if lines[n][content..].trim().is_empty() {
                    (from, to, key_col, item_line) = (n + 1, end, None, None);
                } else {
                    (from, to, key_col, item_line) = (n, end, Some(content), Some(n));
                }
            }
        }
    }
    found
}

/// The 1-based line and column of glob `glob` in the `rule`-th item of
/// `alerts.rules` (block style), or of that item when the glob is not written
/// out (the default `*`), or of `rules:` for a flow-style list.
pub(super) fn locate_rule_glob(text: &str, rule: usize, glob: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let blank = |l: &str| l.trim().is_empty() || l.trim_start().starts_with('#');
    let alerts = lines.iter().position(|l| l.starts_with("alerts:"))?;
    let (rules, rules_line) = lines
        .iter()
        .enumerate()
        .skip(alerts + 1)
        .take_while(|(_, l)| blank(l) || indent(l) > 0)
        .find(|(_, l)| l.trim_start().starts_with("rules:"))?;
    let key_indent = indent(rules_line);
    let rules_col = key_indent + 1;
    if rules_line
        .trim_start()
        .trim_start_matches("rules:")
        .trim_start()
        .starts_with('[')
    {
        return Some((rules + 1, rules_col));
    }
    // The list's items, up to the first line back at the key's indentation.
    let body: Vec<(usize, &str)> = lines
        .iter()
        .enumerate()
        .skip(rules + 1)
        .take_while(|(_, l)| {
            blank(l) || indent(l) > key_indent || (indent(l) == key_indent && l.trim_start().starts_with('-'))
        })
        .map(|(n, l)| (n, *l))
        .collect();
    let item_col = body.iter().find(|(_, l)| !blank(l)).map(|(_, l)| indent(l))?;
    let starts: Vec<usize> = body
        .iter()
        .filter(|(_, l)| indent(l) == item_col && l.trim_start().starts_with('-'))
        .map(|(n, _)| *n)
        .collect();
    let start = *starts.get(rule)?;
    let end = starts
        .get(rule + 1)
        .copied()
        .unwrap_or(body.last().map_or(start, |(n, _)| n + 1));
    let from = (start..end).find(|&n| lines[n].contains("queues:")).unwrap_or(start);
    for (n, l) in lines.iter().enumerate().take(end).skip(from) {
        for quoted in [format!("\"{glob}\""), format!("'{glob}'"), glob.to_string()] {
            if let Some(c) = l.find(&quoted) {
                return Some((n + 1, c + 1));
            }
        }
    }
    Some((start + 1, item_col + 1))
}

pub(super) fn parse_located<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        // The typed reading checks each value as it is read, so a syntax
        // error further on (an unclosed `[` at the end of the file) surfaced
        // as a type error of the value before it. A file that is not YAML
        // says so first.
        let syntax = field == "?" || field.ends_with(".?");
        if !syntax && let Err(syntax) = serde_yaml::from_str::<serde::de::IgnoredAny>(text) {
            return invalid(origin, "?", &syntax);
        }
        let mut err = invalid(origin, &field, e.inner());
        if let (ConfigError::Invalid { location, message, .. }, Some(loc)) = (&mut err, e.inner().location()) {
            let refined = match duplicate_key(message) {
                Some(key) => duplicate_key_location(text, loc.line(), loc.column(), key),
                None => refine_location(text, loc.line(), loc.column(), &field),
            };
            if let Some((line, column)) = refined {
                *location = format!("{origin}:{line}:{column}");
            }
        }
        err
    })
}

/// serde's words for Rust's types in the words of the config: `expected
/// usize` reads "expected a whole number", an empty value "unit value".
fn plain_types(message: &str) -> String {
    let mut out = message.replace("invalid type: unit value", "an empty value");
    for t in ["usize", "u64", "u32", "u16", "u8"] {
        out = out.replace(&format!("expected {t}"), "expected a whole number");
    }
    for t in ["i64", "i32"] {
        out = out.replace(&format!("expected {t}"), "expected a number");
    }
    out.replace("expected f64", "expected a number")
}

/// A value that may carry a secret: a URL, a `key=value` string (connection
/// strings), or a long token.
fn looks_secret(value: &str) -> bool {
    value.contains("://") || value.contains('=') || value.contains(';') || value.chars().count() > 40
}

/// serde's message about a value, in the user's words and without a value
/// that may be a secret. serde quotes a string it cannot take ("invalid
/// type: string \"…\", expected struct SinkTarget"): in a config, or an
/// override from the environment, that may be a secret (a webhook URL where
/// `{url: …}` was meant), and the error already says where it is. Short
/// plain values ("fast" for a rate) stay: they say what was read.
pub(super) fn readable(message: &str) -> String {
    let mut message = message.to_string();
    for kind in ["invalid type: string \"", "invalid value: string \""] {
        if let Some(rest) = message.strip_prefix(kind)
            && let Some(end) = rest.rfind("\", expected")
            && looks_secret(&rest[..end])
        {
            message = format!("{}{}", kind.trim_end_matches(" \""), &rest[end + 1..]);
        }
    }
    plain_types(&message).replace(
        "expected struct SinkTarget",
        "expected `{url: …}` or `{url_env: VARIABLE}`",
    )
}

/// The key serde's "duplicate field `KEY`" names.
fn duplicate_key(message: &str) -> Option<&str> {
    message.strip_prefix("duplicate field `")?.split('`').next()
}

/// serde_yaml places a duplicate key's error at the first key of its
/// mapping (`line`, `column`). The duplicate is the second `KEY:` among that
/// mapping's keys: those in `column`, up to the first line indented less.
fn duplicate_key_location(text: &str, line: usize, column: usize, key: &str) -> Option<(usize, usize)> {
    let indent = column.checked_sub(1)?;
    let mut seen = 0;
    for (n, l) in text.lines().enumerate().skip(line.checked_sub(1)?) {
        let body = l.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        // The mapping's first key may follow a list item's `- `.
        let at = if n + 1 == line { indent } else { l.len() - body.len() };
        if at < indent {
            break;
        }
        let Some(rest) = l.get(indent..) else { continue };
        if at == indent && rest.strip_prefix(key).is_some_and(|r| r.trim_start().starts_with(':')) {
            seen += 1;
            if seen == 2 {
                return Some((n + 1, column));
            }
        }
    }
    None
}

/// serde_yaml places errors raised by a value's own checks (a bad duration, a
/// queue with two backends) at the start of the enclosing mapping or list, not
/// at the offending entry. Move such a location to the entry the field path
/// names: the line of the path's last key at or after `line`, or the item of
/// a list for a path ending in `[i]`. None when the location already fits or
/// the entry cannot be found.
fn refine_location(text: &str, line: usize, column: usize, field: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let last = field.rsplit('.').next()?;
    if let Some(index) = last
        .rsplit_once('[')
        .and_then(|(_, i)| i.strip_suffix(']'))
        .and_then(|i| i.parse::<usize>().ok())
    {
        // The list's items start with `-` in the column the error points at.
        let col = column.checked_sub(1)?;
        let is_item = |l: &&str| l.get(..col).is_some_and(|p| p.trim().is_empty()) && l[col..].starts_with('-');
        if !lines.get(line.checked_sub(1)?).is_some_and(is_item) {
            return None;
        }
        let (n, _) = lines
            .iter()
            .enumerate()
            .skip(line - 1)
            .filter(|(_, l)| is_item(l))
            .nth(index)?;
        return (n + 1 != line).then_some((n + 1, column));
    }
    if last.is_empty() || last.contains(['[', '?']) {
        return None;
    }
    let key = format!("{last}:");
    let (n, l) = lines.iter().enumerate().skip(line.checked_sub(1)?).find(|(_, l)| {
        let t = l.trim_start().trim_start_matches("- ").trim_start();
        t.starts_with(&key)
            || l.contains(&format!("{{{key}"))
            || l.contains(&format!("{{ {key}"))
            || l.contains(&format!(", {key}"))
    })?;
    let column = l.find(&key).map_or(1, |c| c + 1);
    (n + 1 != line).then_some((n + 1, column))
}

pub(super) fn invalid(origin: &str, field: &str, e: &serde_yaml::Error) -> ConfigError {
    let location = match e.location() {
        Some(loc) => format!("{origin}:{}:{}", loc.line(), loc.column()),
        None => origin.to_string(),
    };
    // serde_yaml appends its own " at line N column M"; the location is
    // already in front, so keep the message short.
    // A syntax error's context stays: "…, while parsing a flow sequence at
    // line 4 column 14" is where the unclosed `[` is.
    let mut message = e.to_string();
    if let Some(cut) = message.find(" at line ") {
        let context = message[cut..]
            .find(", while ")
            .map(|at| message[cut + at..].to_string());
        message.truncate(cut);
        message.push_str(context.as_deref().unwrap_or_default());
    }
    // serde_yaml also puts its own idea of the path in front (`queues[0]: `,
    // sometimes shorter than ours); ours is already in the error.
    if let Some((prefix, rest)) = message.split_once(": ")
        && !prefix.contains(' ')
        && field.starts_with(prefix)
    {
        message = rest.to_string();
    }
    message = readable(&message);
    // A syntax error deep in a document ends its path with `?` (the key that
    // could not be read): name the part that was read, and say it is syntax.
    let syntax = field == "?" || field.ends_with(".?");
    let field = field.trim_end_matches('?').trim_end_matches('.');
    if syntax {
        message = format!("YAML syntax: {message} (check the indentation and brackets)");
    }
    if let Some(hint) = did_you_mean(&message) {
        message.push_str(&format!("; did you mean `{hint}`?"));
    }
    ConfigError::Invalid {
        location,
        field: if field.is_empty() || field == "." {
            "(top level)".into()
        } else {
            field.into()
        },
        message,
    }
}

/// For serde's "unknown field `X`, expected one of `A`, `B`..." (or unknown
/// variant), the expected name closest to X when it is a plausible typo.
pub(super) fn did_you_mean(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (typo, expected) = rest.split_once('`')?;
    let (_, expected) = expected.split_once("expected")?;
    let typo = typo.to_ascii_lowercase();
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|name| (edit_distance(&typo, &name.to_ascii_lowercase()), name))
        .filter(|(d, name)| *d <= 2.max(name.chars().count() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, name)| name.to_string())
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    #[test]
    fn unknown_field_names_file_line_field_and_expected() {
        let err = parse("queues:\n  - name: orders\n    sqs:\n      queue: q\n      regoin: eu-west-1\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.yaml:5:"), "{err}");
        assert!(err.contains("queues[0].sqs"), "{err}");
        assert!(err.contains("unknown field `regoin`"), "{err}");
        assert!(err.contains("`region`"), "{err}");
        assert!(err.ends_with("did you mean `region`?"), "{err}");
    }

    #[test]
    fn a_duplicate_key_is_reported_where_it_repeats() {
        let q = "queues:\n  - name: q\n    sqs:\n      queue: q\n";
        for (text, at) in [
            (
                format!("{q}      region: a\n      # a comment\n\n      region: b\n"),
                "test.yaml:8:7:",
            ),
            (
                format!("{q}redrive:\n  hold: 1m\n  rate: 5\n  hold: 2m\n"),
                "test.yaml:8:3:",
            ),
            (
                format!("{q}serve:\n  listen: 127.0.0.1:1\nserve:\n  poll_interval: 1s\n"),
                "test.yaml:7:1:",
            ),
            (
                "queues:\n  - name: q\n    name: r\n    sqs: {queue: q}\n".to_string(),
                "test.yaml:3:5:",
            ),
        ] {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.starts_with(at) && err.contains("duplicate field"), "{text}\n{err}");
        }
    }

    /// A quoted scalar may hold other whitespace (U+3000) before a `-`:
    /// it is no list item, and locating past it used to slice inside it.
    #[test]
    fn unicode_whitespace_before_a_dash_is_no_item() {
        let text = "queues:\n  - name: a\n    sqs: {queue: q}\n    source: \"x\n  \u{3000}- y\"\n  - name: b\n    sqs: {queue: q}\n";
        assert_eq!(locate(text, "queues[1].name"), Some((6, 5)));
        assert_eq!(locate(text, "queues[1]"), Some((6, 3)));
    }

    /// Columns in a flow collection count characters, not bytes.
    #[test]
    fn flow_columns_count_characters() {
        let text = "queues:\n  - name: q\n    sqs: {queue: \"日本語\", region: x}\n";
        assert_eq!(locate(text, "queues[0].sqs.region"), Some((3, 25)));
    }

    #[test]
    fn suggestions_only_for_plausible_typos() {
        assert_eq!(
            did_you_mean("unknown field `concurency`, expected one of `concurrency`, `hold`"),
            Some("concurrency".into())
        );
        assert_eq!(
            did_you_mean("unknown variant `delet`, expected `alert` or `delete`"),
            Some("delete".into())
        );
        assert_eq!(
            did_you_mean("unknown field `kafka`, expected one of `sqs`, `pubsub`"),
            None
        );
        assert_eq!(did_you_mean("invalid type: string, expected u32"), None);
    }

    #[test]
    fn errors_from_value_checks_point_at_the_entry() {
        let err = parse("redrive:\n  hold: 5m\n  deadline: 30\n").unwrap_err().to_string();
        assert!(
            err.starts_with("test.yaml:3:3: redrive.deadline: invalid duration"),
            "{err}"
        );
        let y = "queues:\n  - name: a\n    sqs: {queue: x}\n  - name: b\n    servicebus: {queue: y}\n";
        let err = parse(y).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:4:3: queues[1]: queue `b`"), "{err}");
        let y = "queues:\n  - name: a\n    sqs: {queue: x, region: r}\n    retention: {check_every: 1h, max_age: 1 fortnight}\n";
        let err = parse(y).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:4:"), "{err}");
        assert!(err.contains("queues[0].retention.max_age (queue `a`): "), "{err}");
    }

    /// An error inside a queue's entry names the queue besides its index,
    /// whether serde or a later check found it; an error that already names
    /// it, or is about the name itself, is left as it is.
    #[test]
    fn errors_inside_a_queue_name_it() {
        let two = |second: &str| format!("queues:\n  - name: a\n    sqs: {{queue: x}}\n  - name: orders-eu\n{second}");
        let err = parse(&two("    sqs: {queue: y, regoin: r}\n")).unwrap_err().to_string();
        assert!(
            err.contains(": queues[1].sqs.regoin (queue `orders-eu`): unknown field"),
            "{err}"
        );
        let err = parse(&two(
            "    pubsub: {project: p, subscription: s, endpoint: \"https://x\"}\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(": queues[1].pubsub.endpoint (queue `orders-eu`): "),
            "{err}"
        );
        let err = parse("queues:\n  - name: a\n    sqs: {queue: x}\n  - name: a\n    sqs: {queue: y}\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("(queue"), "{err}");
        // A name the typed parse reads as text.
        let err = parse("queues:\n  - name: 123\n    sqs: {queue: ''}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("queues[0].sqs.queue (queue `123`): "), "{err}");
        // An override of the whole list: the file's names are not its queues.
        let env = [("queues".to_string(), "[{name: pay, sqs: {queue: ''}}]".to_string())];
        let err = crate::config::Config::from_yaml(&two("    sqs: {queue: y}\n"), "test.yaml", &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("environment override DLQ_BRIDGE__QUEUES: queues[0].sqs.queue: "),
            "{err}"
        );
        // A typed error inside that list names the variable that was set,
        // not one for the field (`DLQ_BRIDGE__QUEUES[0]__SQS`).
        let env = [(
            "queues".to_string(),
            "[{name: pay, sqs: {queue: q, regoin: r}}]".to_string(),
        )];
        let err = crate::config::Config::from_yaml(&two("    sqs: {queue: y}\n"), "test.yaml", &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("environment override DLQ_BRIDGE__QUEUES: queues[0].sqs.regoin: unknown field `regoin`"),
            "{err}"
        );
    }

    #[test]
    fn malformed_yaml_gives_position() {
        let err = parse("queues:\n  - name: [unclosed\n").unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:"), "{err}");
    }

    #[test]
    fn locate_finds_keys_and_items_in_block_and_flow_yaml() {
        let y = "# a comment\nredrive:\n  hold: 5m\n\n  concurrency: 0\nqueues:\n  - name: a\n    sqs:\n      queue: x\n  -\n    name: b\n    pubsub: {project: p, subscription: ''}\nserve: {listen: 'x'}\n";
        assert_eq!(locate(y, "redrive.concurrency"), Some((5, 3)));
        assert_eq!(locate(y, "queues[0].name"), Some((7, 5)));
        assert_eq!(locate(y, "queues[0].sqs.queue"), Some((9, 7)));
        assert_eq!(locate(y, "queues[1]"), Some((10, 3)));
        assert_eq!(locate(y, "queues[1].name"), Some((11, 5)));
        assert_eq!(locate(y, "queues[1].pubsub.subscription"), Some((12, 26)));
        assert_eq!(locate(y, "serve.listen"), Some((13, 9)));
        // What is not written: the deepest part that is, or nothing.
        assert_eq!(locate(y, "redrive.rate"), Some((2, 1)));
        assert_eq!(locate(y, "queues[7].name"), Some((6, 1)));
        assert_eq!(locate(y, "alerts.rules[0]"), None);
        // `hold:` under another key is not `redrive.hold`.
        assert_eq!(locate("serve:\n  hold: 1\nredrive: {}\n", "serve.listen"), Some((1, 1)));
        assert_eq!(locate("a:\n  hold: 1\n", "hold"), None);
        // A key with nothing under it, CRLF line ends, odd input: no panic.
        assert_eq!(locate("redrive:\n", "redrive.rate"), Some((1, 1)));
        assert_eq!(locate("redrive:\r\n  rate: 0\r\n", "redrive.rate"), Some((2, 3)));
        for odd in [
            "queues:\n  -\u{3000}name: a\n",
            "queues: [\n",
            "- x\n- y\n",
            "queues:\n-\n",
            "\u{e9}: 1\n",
        ] {
            let _ = locate(odd, "queues[0].name");
            let _ = locate(odd, "queues[1].sqs.queue");
        }
    }

    /// README: a glob that matches no queue is an error with its file:line,
    /// whatever the YAML style (a flow-style `alerts:` had no line at all).
    #[test]
    fn alert_rule_errors_have_a_line_in_flow_style_too() {
        let q = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        let err = parse(&format!(
            "{q}alerts: {{rules: [{{queues: [nope], new_reason: true}}]}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("test.yaml:4:"), "{err}");
        let err = parse(&format!(
            "{q}alerts: {{rules: [{{new_reason: true}}, {{new_reason: true}}]}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("test.yaml:4:") && err.contains("same name"), "{err}");
    }
}
