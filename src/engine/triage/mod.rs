//! Triage: group a DLQ's failures by pattern (`report`), copy messages to a
//! file and back (`export`, `import`), discard them with a backup and an
//! audit record (`purge`), and the per-queue retention policy.
//!
//! Reading for reports and exports disturbs the DLQ as little as the provider
//! allows (DESIGN §3, guarantee 8): Service Bus browses with a true peek; SQS
//! and Pub/Sub have none, so messages are leased batch by batch, examined, and
//! released together at the end, which raises their delivery counts. A purge is
//! a run of the redrive engine with [`Action::Discard`]: the same leases,
//! seen-set, limits and release discipline as a redrive, but each matching
//! message is written to the backup file (fsynced) before it is settled.

mod error;
mod export;
mod import;
mod patterns;
mod purge;
mod read;
mod report;
mod retention;

pub use error::TriageError;
pub use export::{
    DEFAULT_PEEK_CAP, ExportSummary, ExportWriter, ExportedMessage, dated_path, export, read_export, to_stdout,
};
pub use import::{
    CheckedImport, ImportRequest, ImportStop, ImportSummary, check_import, import, import_checked, not_carried,
};
pub use patterns::{Group, GroupBy, Grouper, MAX_KEY_CHARS, normalize, pattern_of, reason_pattern, top_counts};
pub use purge::{FileBackup, PurgeRequest, purge, purge_filter};
pub(crate) use read::compile;
pub use read::{DISPLAY_HOLD, ReadStats, Shown, browse, first_matches, read_note};
pub use report::{DEFAULT_SCAN, DEFAULT_TOP, Report, ReportRequest, report};
pub use retention::{ExpiredMessage, RetentionOutcome, apply_retention};

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use base64::Engine as _;
    use bytes::Bytes;
    use chrono::{DateTime, Utc};

    use super::*;
    use crate::filter::Filter;
    use crate::model::{AttrValue, Attribute, DlqMessage, Properties};

    #[test]
    fn numbers_in_the_issue_example_fall_in_one_pattern() {
        let a = normalize("timeout after 3012 ms on order 8812");
        assert_eq!(a, "timeout after <n> ms on order <n>");
        assert_eq!(normalize("timeout after 15 ms on order 7"), a);
    }

    #[test]
    fn placeholders_for_uuids_hex_quotes_and_decimals() {
        assert_eq!(
            normalize("trace 3f2b8c1e-9a4d-4e2b-8c7f-0123456789ab failed"),
            "trace <uuid> failed"
        );
        assert_eq!(normalize("commit deadbeef12 at 0x7ffd"), "commit <hex> at <hex>");
        assert_eq!(
            normalize(r#"field `sku` missing in "A-17""#),
            "field <str> missing in <str>"
        );
        assert_eq!(
            normalize("user 'bob' can't pay 12.50 EUR"),
            "user <str> can't pay <n> EUR"
        );
        assert_eq!(
            normalize("took 3000ms, ord-1017, http2 s3"),
            "took <n>ms, ord-<n>, http2 s3"
        );
        assert_eq!(normalize("HTTP 503 from shipping"), "HTTP <n> from shipping");
        assert_eq!(normalize("unterminated \"quote"), "unterminated \"quote");
        assert_eq!(normalize("façade 42"), "façade <n>");
    }

    #[test]
    fn timestamps_fall_in_one_pattern_whatever_the_hour() {
        let a = normalize("deadline exceeded at 2024-01-02T10:20:30.123Z");
        assert_eq!(a, "deadline exceeded at <n>-<n>-<n>T<n>:<n>:<n>Z");
        assert_eq!(normalize("deadline exceeded at 2025-11-30T23:59:01.9Z"), a);
        assert_eq!(normalize("retry in 5m30s"), "retry in <n>m<n>s");
        // Generated IDs and addresses: each was a pattern of its own.
        assert_eq!(
            normalize("No such customer: cus_NffrFeUfNV2Hib"),
            "No such customer: cus_<id>"
        );
        assert_eq!(normalize("job 01HZX3K4Q8V6T2M9N0P1R5S7W3 lost"), "job <id> lost");
        assert_eq!(
            normalize("mail to ann.lee+x@mail.example.com. bounced"),
            "mail to <email>. bounced"
        );
        assert_eq!(
            normalize("Float64Array some_field_v2 waited 1500000000ns, a@b"),
            "Float64Array some_field_v2 waited <n>ns, a@b"
        );
        // An address's local part is 64 characters at most: past that the
        // scan stops (it is tried at every word start).
        let local = |n: usize| format!("to {}@mail.example.com", "x".repeat(n));
        assert_eq!(normalize(&local(64)), "to <email>");
        assert_ne!(normalize(&local(65)), "to <email>");
    }

    fn msg(id: &str, reason: &str, desc: &str, count: u32, secs: i64) -> DlqMessage {
        DlqMessage {
            id: id.into(),
            body: Bytes::from_static(b"{}"),
            attributes: [("tenant".to_string(), Attribute::string(id))].into(),
            properties: Properties::new(),
            reason: Some(reason.into()),
            description: Some(desc.into()),
            delivery_count: Some(count),
            enqueued_at: Some(DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()),
            source: None,
            ordering_key: None,
        }
    }

    /// Grouped by reason, distinct values stay distinct and keys are the
    /// values themselves (a script filters on them); only length is cut.
    /// The display form (control characters blanked) merged `bad\tinput`,
    /// `bad input` and `bad\ninput`.
    #[test]
    fn reason_groups_keep_the_values_as_they_are() {
        let long = "L".repeat(MAX_KEY_CHARS + 50);
        let msgs = [
            msg("a", "bad\tinput", "", 1, 0),
            msg("b", "bad input", "", 1, 0),
            msg("c", "bad\ninput", "", 1, 0),
            msg("d", "Bidi\u{202e}reason", "", 1, 0),
            msg("e", &long, "", 1, 0),
        ];
        let mut keys: Vec<String> = top_counts(&msgs, &GroupBy::Reason, 10)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        keys.sort();
        let cut = format!("{}…", "L".repeat(MAX_KEY_CHARS - 1));
        let mut want = ["Bidi\u{202e}reason", &cut, "bad\tinput", "bad\ninput", "bad input"].map(String::from);
        want.sort();
        assert_eq!(keys, want);
    }

    #[test]
    fn groups_have_counts_times_ranges_and_fold_into_other() {
        let msgs = [
            msg("a", "Timeout", "after 3012 ms", 2, 30),
            msg("b", "Timeout", "after 15 ms", 5, 10),
            msg("c", "Timeout", "after 9 ms", 3, 20),
            msg("d", "Bad", "field `x`", 1, 0),
            msg("e", "Bad", "field `y`", 1, 5),
            msg("f", "Gone", "404", 1, 0),
        ];
        let mut g = Grouper::new(GroupBy::Pattern);
        for m in &msgs {
            g.add(m);
        }
        let (groups, other) = g.finish(2);
        assert_eq!(groups.len(), 2);
        let t = &groups[0];
        assert_eq!((t.key.as_str(), t.count), ("Timeout: after <n> ms", 3));
        assert_eq!((t.min_delivery_count, t.max_delivery_count), (Some(2), Some(5)));
        assert_eq!(t.first_enqueued_at, msgs[1].enqueued_at);
        assert_eq!(t.last_enqueued_at, msgs[0].enqueued_at);
        assert!((t.share - 0.5).abs() < 1e-9);
        assert_eq!((groups[1].key.as_str(), groups[1].count), ("Bad: field <str>", 2));
        let o = other.unwrap();
        assert_eq!((o.key.as_str(), o.count, o.groups_folded), ("other", 1, 1));
        assert_eq!(
            top_counts(&msgs, &GroupBy::Attribute("tenant".into()), 10).len(),
            6,
            "one group per attribute value"
        );
    }

    #[test]
    fn group_by_parses() {
        assert_eq!("pattern".parse::<GroupBy>().unwrap(), GroupBy::Pattern);
        assert_eq!(
            "attribute:tenant".parse::<GroupBy>().unwrap(),
            GroupBy::Attribute("tenant".into())
        );
        assert!("attribute:".parse::<GroupBy>().is_err());
        assert!("colour".parse::<GroupBy>().is_err());
    }

    #[test]
    fn export_line_round_trips_the_message() {
        let mut m = msg("a", "Timeout", "x", 1, 0);
        m.body = Bytes::from_static(&[0, 159, 146, 150, b'\n']);
        m.attributes.insert(
            "n".into(),
            Attribute {
                value: AttrValue::Number("1.50".into()),
                data_type: Some("Number.float".into()),
            },
        );
        let line = ExportedMessage {
            queue: "q".into(),
            backend: "sqs".into(),
            id: m.id.clone(),
            body_base64: base64::engine::general_purpose::STANDARD.encode(&m.body),
            body_preview: m.body_text(),
            body_bytes: m.body.len(),
            attributes: m.attributes.clone(),
            properties: Properties::new(),
            reason: m.reason.clone(),
            description: m.description.clone(),
            delivery_count: m.delivery_count,
            enqueued_at: m.enqueued_at,
            source: None,
            ordering_key: None,
            provider_attributes: vec![],
            exported_at: Utc::now(),
        };
        let text = serde_json::to_string(&line).unwrap();
        assert!(!text.contains('\n'));
        let back: ExportedMessage = serde_json::from_str(&text).unwrap();
        assert_eq!(back.to_message().unwrap(), m);
    }

    #[test]
    fn older_than_narrows_the_filter() {
        assert_eq!(
            purge_filter("reason == \"x\"", Some(Duration::from_secs(90))),
            "(reason == \"x\") && age > duration(\"90s\")"
        );
        Filter::compile(&purge_filter("true", Some(Duration::from_secs(5)))).unwrap();
        // A comment would swallow the `)` on the same line.
        let commented = purge_filter("reason == \"x\" // old", Some(Duration::from_secs(90)));
        assert_eq!(commented, "(reason == \"x\" // old\n) && age > duration(\"90s\")");
        Filter::compile(&commented).unwrap();
    }

    #[test]
    fn older_than_keeps_fractions_of_a_second() {
        // `--older-than 1500ms` (or a retention max_age of 1.5s) must not
        // purge a message 1.2s old.
        let f = Filter::compile(&purge_filter("true", Some(Duration::from_millis(1500)))).unwrap();
        let mut m = msg("a", "Timeout", "x", 1, 0);
        let now = Utc::now();
        m.enqueued_at = Some(now - chrono::Duration::milliseconds(1200));
        assert!(!f.matches(&m, now).unwrap(), "{}", f.source());
        m.enqueued_at = Some(now - chrono::Duration::milliseconds(1600));
        assert!(f.matches(&m, now).unwrap(), "{}", f.source());
    }
}
