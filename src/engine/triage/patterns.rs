//! Failure patterns: normalised reasons and descriptions, and grouping
//! messages by pattern, reason or attribute in bounded memory.

use std::collections::HashMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::DlqMessage;
use crate::model::preview;

/// Distinct keys a report tracks; keys beyond it count towards `other`, so
/// memory stays bounded whatever the DLQ holds.
pub(super) const MAX_TRACKED_GROUPS: usize = 10_000;
/// Longest group key kept (patterns of huge descriptions are cut).
pub const MAX_KEY_CHARS: usize = 200;

/// Normalise failure text so that messages failing the same way group
/// together: quoted values become `<str>`, UUIDs `<uuid>`, hex strings
/// (`0x…`, or 8+ hex characters mixing digits and letters) `<hex>`, other
/// generated IDs (13+ letters and digits, a digit after a letter; a short
/// `type_` prefix kept) `<id>`, email addresses `<email>`, and numbers `<n>`. Only whole tokens are replaced: a number must start a word (so
/// `3000ms` becomes `<n>ms` and `ord-17` `ord-<n>`, but `http2` and `s3` stay),
/// and an apostrophe inside a word (`can't`) is not a quote.
pub fn normalize(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let at_start = i == 0 || !word(chars[i - 1]);
        if at_start && matches!(c, '"' | '\'' | '`') {
            if let Some(len) = chars[i + 1..].iter().position(|&d| d == c) {
                let close = i + 1 + len;
                if chars.get(close + 1).is_none_or(|&n| !word(n)) {
                    out.push_str("<str>");
                    i = close + 1;
                    continue;
                }
            }
            out.push(c);
            i += 1;
            continue;
        }
        if at_start && word(c) {
            if is_uuid_at(&chars[i..]) {
                out.push_str("<uuid>");
                i += 36;
                continue;
            }
            if let Some(len) = email_len(&chars[i..]) {
                out.push_str("<email>");
                i += len;
                continue;
            }
            let end = (i..chars.len()).find(|&j| !word(chars[j])).unwrap_or(chars.len());
            let token = &chars[i..end];
            if is_hex_token(token) {
                out.push_str("<hex>");
                i = end;
                continue;
            }
            // An ID with a short type prefix (`cus_`, `pi_`) keeps the prefix.
            let prefix = token
                .iter()
                .position(|&c| c == '_')
                .filter(|&p| (1..=5).contains(&p) && token[..p].iter().all(char::is_ascii_lowercase))
                .map_or(0, |p| p + 1);
            if is_id_token(&token[prefix..]) {
                out.extend(&token[..prefix]);
                out.push_str("<id>");
                i = end;
                continue;
            }
            if c.is_ascii_digit() {
                let mut j = i;
                while j < chars.len() && chars[j].is_ascii_digit() {
                    j += 1;
                }
                if j + 1 < chars.len() && chars[j] == '.' && chars[j + 1].is_ascii_digit() {
                    j += 1;
                    while j < chars.len() && chars[j].is_ascii_digit() {
                        j += 1;
                    }
                }
                out.push_str("<n>");
                // A unit suffix (`ms`, `kb`) stays as it is; numbers inside
                // it do not (the `T10` of `2024-01-02T10:20:30Z`, else every
                // hour of the day would be a pattern of its own).
                let mut k = j;
                while k < end {
                    if chars[k].is_ascii_digit() {
                        while k < end && chars[k].is_ascii_digit() {
                            k += 1;
                        }
                        out.push_str("<n>");
                    } else {
                        out.push(chars[k]);
                        k += 1;
                    }
                }
                i = j.max(end);
                continue;
            }
            out.extend(token);
            i = end;
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

fn is_uuid_at(chars: &[char]) -> bool {
    if chars.len() < 36 || chars.get(36).is_some_and(|c| c.is_alphanumeric() || *c == '_') {
        return false;
    }
    chars[..36].iter().enumerate().all(|(k, c)| match k {
        8 | 13 | 18 | 23 => *c == '-',
        _ => c.is_ascii_hexdigit(),
    })
}

/// A generated ID (ULIDs, Stripe's, base62 keys): 13 or more ASCII letters
/// and digits with a digit after a letter. Every message's reason that
/// carries one was a pattern of its own, and `new_reason` announced each.
/// Shorter words (`Float64Array`), a number with its unit (`1500000000ns`)
/// and names with underscores stay.
fn is_id_token(token: &[char]) -> bool {
    token.len() >= 13
        && token.iter().all(char::is_ascii_alphanumeric)
        && token
            .iter()
            .skip_while(|c| !c.is_ascii_alphabetic())
            .any(char::is_ascii_digit)
}

/// The longest local part and domain of an address (RFC 5321). The scans
/// stop there: tried at every word start, an unbounded scan made a long run
/// of such characters (`a-a-a-…`, a form-encoded payload) quadratic.
const EMAIL_LOCAL_MAX: usize = 64;
const EMAIL_DOMAIN_MAX: usize = 255;

/// The length of an email address at the start of `chars`: `local@host.tld`.
fn email_len(chars: &[char]) -> Option<usize> {
    let local = |c: &char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '%' | '+' | '-');
    let host = |c: &char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-');
    let at = chars.iter().take(EMAIL_LOCAL_MAX + 1).position(|c| !local(c))?;
    if at == 0 || chars[at] != '@' {
        return None;
    }
    let len = chars[at + 1..]
        .iter()
        .take(EMAIL_DOMAIN_MAX)
        .take_while(|c| host(c))
        .count();
    let domain: String = chars[at + 1..at + 1 + len].iter().collect();
    let domain = domain.trim_end_matches(['.', '-']);
    let (name, tld) = domain.rsplit_once('.')?;
    (!name.is_empty() && tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic()))
        .then_some(at + 1 + domain.chars().count())
}

fn is_hex_token(token: &[char]) -> bool {
    if token.len() > 2 && token[0] == '0' && matches!(token[1], 'x' | 'X') {
        return token[2..].iter().all(char::is_ascii_hexdigit);
    }
    token.len() >= 8
        && token.iter().all(char::is_ascii_hexdigit)
        && token.iter().any(char::is_ascii_digit)
        && token.iter().any(char::is_ascii_alphabetic)
}

/// A message's failure pattern: its normalised reason and description
/// (`Timeout: payment gateway timed out after <n> ms`), or `(none)`.
pub fn pattern_of(m: &DlqMessage) -> String {
    let key = match (m.reason.as_deref(), m.description.as_deref()) {
        (Some(r), Some(d)) => format!("{}: {}", normalize(r), normalize(d)),
        (Some(t), None) | (None, Some(t)) => normalize(t),
        (None, None) => "(none)".into(),
    };
    preview(&key, MAX_KEY_CHARS)
}

/// A failure reason's pattern: the reason normalised, cut to the longest key.
pub fn reason_pattern(reason: &str) -> String {
    preview(&normalize(reason), MAX_KEY_CHARS)
}

// ---------------------------------------------------------------------------
// Grouping

/// What a report groups by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    Reason,
    /// The value of one attribute (as text); `(unset)` when a message lacks it.
    Attribute(String),
    Source,
    Pattern,
}

impl FromStr for GroupBy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "reason" => Ok(Self::Reason),
            "source" => Ok(Self::Source),
            "pattern" => Ok(Self::Pattern),
            other => match other.strip_prefix("attribute:") {
                Some(name) if !name.is_empty() => Ok(Self::Attribute(name.to_string())),
                _ => Err(format!(
                    "cannot group by `{other}`: use reason, source, pattern or attribute:NAME"
                )),
            },
        }
    }
}

impl std::fmt::Display for GroupBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reason => f.write_str("reason"),
            Self::Attribute(n) => write!(f, "attribute:{n}"),
            Self::Source => f.write_str("source"),
            Self::Pattern => f.write_str("pattern"),
        }
    }
}

impl GroupBy {
    pub fn key(&self, m: &DlqMessage) -> String {
        let key = match self {
            Self::Reason => m.reason.clone().unwrap_or_else(|| "(none)".into()),
            Self::Attribute(name) => m
                .attributes
                .get(name)
                .map(|a| a.as_text())
                .unwrap_or_else(|| "(unset)".into()),
            Self::Source => m.source.clone().unwrap_or_else(|| "(unknown)".into()),
            Self::Pattern => return pattern_of(m),
        };
        // The value itself, cut only for length: a key is what a script
        // turns into `--filter 'reason == "…"'`, and the display form
        // (control characters blanked, bidirectional ones escaped) merged
        // distinct values into one group. Tables escape it when shown.
        match (
            key.chars().nth(MAX_KEY_CHARS),
            key.char_indices().nth(MAX_KEY_CHARS - 1),
        ) {
            (Some(_), Some((cut, _))) => format!("{}…", &key[..cut]),
            _ => key,
        }
    }
}

/// One group of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub key: String,
    pub count: u64,
    /// `count` over the messages grouped (0..=1).
    pub share: f64,
    pub first_enqueued_at: Option<DateTime<Utc>>,
    pub last_enqueued_at: Option<DateTime<Utc>>,
    pub min_delivery_count: Option<u32>,
    pub max_delivery_count: Option<u32>,
    /// One message of the group, to inspect.
    pub sample_id: String,
    /// For `other`: how many distinct groups it folds together.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub groups_folded: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn min_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

impl Group {
    fn new(key: String, m: &DlqMessage) -> Self {
        Self {
            key,
            count: 1,
            share: 0.0,
            first_enqueued_at: m.enqueued_at,
            last_enqueued_at: m.enqueued_at,
            min_delivery_count: m.delivery_count,
            max_delivery_count: m.delivery_count,
            sample_id: m.id.clone(),
            groups_folded: 0,
        }
    }

    fn add(&mut self, m: &DlqMessage) {
        self.count += 1;
        self.first_enqueued_at = min_opt(self.first_enqueued_at, m.enqueued_at);
        self.last_enqueued_at = max_opt(self.last_enqueued_at, m.enqueued_at);
        self.min_delivery_count = min_opt(self.min_delivery_count, m.delivery_count);
        self.max_delivery_count = max_opt(self.max_delivery_count, m.delivery_count);
    }

    fn merge(&mut self, g: &Group) {
        self.count += g.count;
        self.first_enqueued_at = min_opt(self.first_enqueued_at, g.first_enqueued_at);
        self.last_enqueued_at = max_opt(self.last_enqueued_at, g.last_enqueued_at);
        self.min_delivery_count = min_opt(self.min_delivery_count, g.min_delivery_count);
        self.max_delivery_count = max_opt(self.max_delivery_count, g.max_delivery_count);
        self.groups_folded += g.groups_folded.max(1);
    }
}

/// Accumulates groups message by message, in bounded memory.
pub struct Grouper {
    by: GroupBy,
    groups: HashMap<String, Group>,
    /// Messages whose key arrived after MAX_TRACKED_GROUPS distinct keys.
    overflow: Option<Group>,
    total: u64,
}

impl Grouper {
    pub fn new(by: GroupBy) -> Self {
        Self {
            by,
            groups: HashMap::new(),
            overflow: None,
            total: 0,
        }
    }

    pub fn add(&mut self, m: &DlqMessage) {
        self.total += 1;
        let key = self.by.key(m);
        if let Some(g) = self.groups.get_mut(&key) {
            g.add(m);
        } else if self.groups.len() < MAX_TRACKED_GROUPS {
            self.groups.insert(key.clone(), Group::new(key, m));
        } else {
            match &mut self.overflow {
                Some(o) => o.add(m),
                None => {
                    let mut o = Group::new("other".into(), m);
                    o.groups_folded = 1;
                    self.overflow = Some(o);
                }
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// The `top` largest groups (count, then key), and the rest folded into
    /// one `other` group.
    pub fn finish(self, top: usize) -> (Vec<Group>, Option<Group>) {
        let mut all: Vec<Group> = self.groups.into_values().collect();
        all.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
        let rest = if all.len() > top {
            all.split_off(top)
        } else {
            Vec::new()
        };
        let mut other = self.overflow;
        for g in &rest {
            match &mut other {
                Some(o) => o.merge(g),
                None => {
                    let mut o = g.clone();
                    o.key = "other".into();
                    o.groups_folded = 1;
                    other = Some(o);
                }
            }
        }
        let total = self.total.max(1) as f64;
        for g in all.iter_mut().chain(other.iter_mut()) {
            g.share = g.count as f64 / total;
        }
        (all, other)
    }
}

/// Group messages already read (the poller's sample): `(key, count)`, most
/// frequent first, the rest summed as `other`.
pub fn top_counts<'a>(msgs: impl IntoIterator<Item = &'a DlqMessage>, by: &GroupBy, top: usize) -> Vec<(String, u64)> {
    let mut g = Grouper::new(by.clone());
    for m in msgs {
        g.add(m);
    }
    let (groups, other) = g.finish(top);
    groups.into_iter().chain(other).map(|g| (g.key, g.count)).collect()
}
