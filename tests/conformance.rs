//! The conformance suite: every redrive guarantee, written once, run against
//! every backend's emulator (DESIGN §2: "tested once against all three
//! emulators with the same test body").
//!
//! A backend joins by implementing `common::Fixture` and adding a line to the
//! `conformance!` invocations at the bottom.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{Fixture, Received, TestMessage, attrs, redrive};
use dlq_bridge::backend::{Capabilities, QueueBackend};
use dlq_bridge::config::{RetentionAction, RetentionConfig};
use dlq_bridge::engine::journal::{Journal, Record, read_records};
use dlq_bridge::engine::redrive::Trigger;
use dlq_bridge::engine::redrive::{MARK_COUNT, MARK_ID, StopReason};
use dlq_bridge::engine::registry::{RedriveRequest, Registry};
use dlq_bridge::engine::triage::{self, ExportedMessage, ImportRequest, PurgeRequest, ReportRequest};
use dlq_bridge::model::AttrValue;

fn order(i: usize, tenant: &str, error: &str) -> TestMessage {
    TestMessage {
        body: format!(r#"{{"order":{i},"tenant":"{tenant}"}}"#).into_bytes(),
        attributes: attrs(&[("tenant", tenant), ("error", error)]),
        ordering_key: None,
    }
}

fn orders(n: usize) -> Vec<TestMessage> {
    (0..n)
        .map(|i| {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            let error = if i % 3 == 0 { "Timeout" } else { "ValidationError" };
            order(i, tenant, error)
        })
        .collect()
}

/// The bodies, sorted: a multiset, so that a message that arrived twice is
/// seen as such (a set would hide a duplicated send).
fn bodies(msgs: &[Received]) -> Vec<String> {
    sorted(msgs.iter().map(|m| String::from_utf8_lossy(&m.body).into_owned()))
}

fn expected_bodies<'a>(msgs: impl IntoIterator<Item = &'a TestMessage>) -> Vec<String> {
    sorted(msgs.into_iter().map(|m| String::from_utf8_lossy(&m.body).into_owned()))
}

fn sorted(texts: impl Iterator<Item = String>) -> Vec<String> {
    let mut texts: Vec<String> = texts.collect();
    texts.sort();
    texts
}

/// Messages that test byte-for-byte fidelity: typed attributes on a unicode
/// body, `extra` (tagged `kind=extra_kind`), and a binary body where the
/// backend carries one.
fn payload_cases<F: Fixture>(caps: &Capabilities, extra: Vec<u8>, extra_kind: &str) -> Vec<TestMessage> {
    let mut typed = attrs(&[("error", "Payload"), ("kind", "typed")]);
    typed.extend(F::typed_attributes());
    let mut cases = vec![
        TestMessage {
            body: "unicode ✓ — \t tabs\nand newlines \u{10348}".as_bytes().to_vec(),
            attributes: typed,
            ordering_key: None,
        },
        TestMessage {
            body: extra,
            attributes: attrs(&[("error", "Payload"), ("kind", extra_kind)]),
            ordering_key: None,
        },
    ];
    if caps.binary_body {
        cases.push(TestMessage {
            body: (0..=255u8).cycle().take(4096).collect(),
            attributes: attrs(&[("error", "Payload"), ("kind", "binary")]),
            ordering_key: None,
        });
    }
    cases
}

/// Every case arrived once, matched by its `kind`, with body and attributes
/// intact (as text only, where the backend's attributes are untyped).
fn assert_arrived_intact(cases: &[TestMessage], arrived: &[Received], typed_attributes: bool) {
    assert_eq!(arrived.len(), cases.len());
    for want in cases {
        let kind = want.attributes["kind"].as_text();
        let got = arrived
            .iter()
            .find(|r| r.attributes.get("kind").map(|a| a.as_text()) == Some(kind.clone()))
            .unwrap_or_else(|| panic!("{kind} message arrived"));
        assert_eq!(got.body, want.body, "{kind} body");
        for (k, a) in &want.attributes {
            let have = got
                .attributes
                .get(k)
                .unwrap_or_else(|| panic!("{kind}: attribute {k} missing"));
            if !typed_attributes {
                // String-only attributes (Pub/Sub): the text survives.
                assert_eq!(have.as_text(), a.as_text(), "{kind} attribute {k}");
                continue;
            }
            assert_eq!(have.value, a.value, "{kind} attribute {k}");
            if a.data_type.is_some() {
                assert_eq!(have.data_type, a.data_type, "{kind} attribute {k} type");
            }
        }
    }
}

fn req(filter: &str) -> RedriveRequest {
    RedriveRequest {
        filter: Some(filter.into()),
        ..Default::default()
    }
}

pub async fn dead_lettered_messages_show_in_stats_and_peek<F: Fixture>() {
    let f = F::create(false).await;
    let msgs = orders(6);
    f.dead_letter(&msgs).await;
    let reg = Registry::new(f.config());
    let b = reg.backend("dlq").await.unwrap();
    let stats = b.stats().await.unwrap();
    assert_eq!(stats.depth, 6, "{stats:?}");
    let peeked = b.peek(20).await.unwrap();
    assert_eq!(peeked.len(), 6);
    assert_eq!(sorted(peeked.iter().map(|m| m.body_text())), expected_bodies(&msgs));
    for m in &peeked {
        assert!(!m.id.is_empty());
        assert!(m.reason.as_deref() == Some("Timeout") || m.reason.as_deref() == Some("ValidationError"));
        assert!(m.delivery_count.is_some_and(|c| c >= 1), "{m:?}");
        assert!(m.enqueued_at.is_some(), "{m:?}");
        assert!(m.source.is_some(), "the source is discovered: {m:?}");
    }
    // Peeking leaves every message in the DLQ.
    assert_eq!(f.dlq_count().await, 6);
}

pub async fn filtered_redrive_moves_exactly_the_matches<F: Fixture>() {
    let f = F::create(false).await;
    let msgs = orders(8);
    f.dead_letter(&msgs).await;
    let s = redrive(f.config(), req(r#"attributes.tenant == "acme""#)).await;
    assert_eq!((s.examined, s.matched, s.sent, s.settled), (8, 4, 4, 4), "{s:?}");
    assert!(s.ok(), "{s:?}");
    let arrived = f.drain_source().await;
    let acme: Vec<&TestMessage> = msgs
        .iter()
        .filter(|m| m.attributes["tenant"].as_text() == "acme")
        .collect();
    assert_eq!(bodies(&arrived), expected_bodies(acme.iter().copied()));
    for m in &arrived {
        assert_eq!(m.attributes["tenant"].as_text(), "acme");
        assert!(m.attributes.contains_key("error"), "attributes are kept: {m:?}");
        assert_eq!(m.attributes[MARK_COUNT].as_text(), "1", "{m:?}");
        assert!(m.attributes[MARK_ID].as_text().starts_with(&s.run_id), "{m:?}");
    }
    assert_eq!(f.dlq_count().await, 4, "the non-matching messages stay in the DLQ");
}

/// One process (the sidecar) runs pass after pass on the same backend. A new
/// pass must start from the beginning of the DLQ again: what the last one
/// held and released, and what arrived since, are all seen.
pub async fn a_later_pass_on_the_same_backend_sees_what_the_earlier_released<F: Fixture>() {
    let f = F::create(false).await;
    let first = orders(8);
    f.dead_letter(&first).await;
    let reg = common::registry(f.config());
    let s = common::redrive_on(&reg, req(r#"attributes.tenant == "acme""#)).await;
    assert_eq!((s.examined, s.matched, s.settled), (8, 4, 4), "{s:?}");
    let later: Vec<TestMessage> = (100..102).map(|i| order(i, "initech", "Timeout")).collect();
    // Straight into the DLQ: dead-lettering through the source would take
    // the first pass's copies back there too.
    f.put_in_dlq(&later).await;
    let s = common::redrive_on(&reg, req("true")).await;
    assert_eq!(
        (s.examined, s.matched, s.settled),
        (6, 6, 6),
        "the 4 the first pass released and the 2 that arrived since: {s:?}"
    );
    assert!(s.ok(), "{s:?}");
    assert_eq!(
        bodies(&f.drain_source().await),
        expected_bodies(first.iter().chain(&later))
    );
    assert_eq!(f.dlq_count().await, 0);
}

pub async fn dry_run_changes_nothing<F: Fixture>() {
    let f = F::create(false).await;
    let msgs = orders(6);
    f.dead_letter(&msgs).await;
    let s = redrive(
        f.config(),
        RedriveRequest {
            dry_run: true,
            ..req(r#"reason == "Timeout""#)
        },
    )
    .await;
    assert_eq!((s.examined, s.matched, s.sent, s.settled), (6, 2, 0, 0), "{s:?}");
    assert_eq!(
        s.destinations.values().sum::<u64>(),
        2,
        "the plan names the destination"
    );
    assert!(f.drain_source().await.is_empty(), "a dry run sends nothing");
    assert_eq!(f.dlq_count().await, 6, "a dry run deletes nothing");
}

pub async fn max_caps_the_run<F: Fixture>() {
    let f = F::create(false).await;
    f.dead_letter(&orders(7)).await;
    let s = redrive(
        f.config(),
        RedriveRequest {
            max: Some(3),
            ..req("true")
        },
    )
    .await;
    assert_eq!(s.settled, 3, "{s:?}");
    assert_eq!(s.stopped, StopReason::MaxReached);
    assert_eq!(f.drain_source().await.len(), 3);
    assert_eq!(f.dlq_count().await, 4);
}

pub async fn run_ends_when_nothing_matches<F: Fixture>() {
    let f = F::create(false).await;
    f.dead_letter(&orders(5)).await;
    let run = redrive(f.config(), req(r#"attributes.tenant == "nobody""#));
    let s = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("a pass over a DLQ with no matches terminates");
    assert_eq!((s.examined, s.matched, s.sent), (5, 0, 0), "{s:?}");
    assert!(matches!(s.stopped, StopReason::Drained | StopReason::AllSeen), "{s:?}");
    assert_eq!(f.dlq_count().await, 5);
}

pub async fn evaluation_errors_are_no_match_and_reported<F: Fixture>() {
    let f = F::create(false).await;
    f.dead_letter(&orders(3)).await;
    let s = redrive(f.config(), req(r#"attributes.missing == "x""#)).await;
    assert_eq!((s.matched, s.filter_errors), (0, 3), "{s:?}");
    assert!(s.errors.iter().any(|e| e.contains("missing")), "{s:?}");
    assert_eq!(f.dlq_count().await, 3);
}

/// Attribute types and bodies survive a redrive byte for byte.
pub async fn payloads_survive_byte_for_byte<F: Fixture>() {
    let f = F::create(false).await;
    let reg = Registry::new(f.config());
    let caps = reg.backend("dlq").await.unwrap().capabilities();
    let mut cases = payload_cases::<F>(&caps, "x".repeat(256 * 1024).into_bytes(), "large");
    if caps.empty_body {
        cases.push(TestMessage {
            body: Vec::new(),
            attributes: attrs(&[("error", "Payload"), ("kind", "empty")]),
            ordering_key: None,
        });
    }
    f.put_in_dlq(&cases).await;
    let s = redrive(f.config(), req("true")).await;
    assert_eq!(s.settled as usize, cases.len(), "{s:?}");
    assert_arrived_intact(&cases, &f.drain_source().await, caps.typed_attributes);
    assert_eq!(f.dlq_count().await, 0);
}

/// Messages of one ordering group arrive in their original order.
pub async fn ordering_group_is_kept<F: Fixture>() {
    let f = F::create(true).await;
    let msgs: Vec<TestMessage> = (0..6)
        .map(|i| TestMessage {
            ordering_key: Some(if i < 3 { "g-a".into() } else { "g-b".into() }),
            ..order(i, "acme", "Timeout")
        })
        .collect();
    f.dead_letter(&msgs).await;
    let s = redrive(f.config(), req("true")).await;
    assert_eq!(s.settled, 6, "{s:?}");
    assert_groups_in_order(&msgs, &f.drain_source().await, &["g-a", "g-b"]);
}

/// With several leases in flight (300 messages are three leases or more on
/// every provider) and each send batch taking only groups with no batch in
/// flight, every group's copies still arrive in their original order. The
/// groups are interleaved in the DLQ, so each lease holds all three: a
/// scheduler that reordered within a group, or examined a later lease's
/// result first, shows here.
pub async fn ordering_holds_with_leases_in_flight<F: Fixture>() {
    let f = F::create(true).await;
    let groups = ["g-a", "g-b", "g-c"];
    let msgs: Vec<TestMessage> = (0..300)
        .map(|i| TestMessage {
            ordering_key: Some(groups[i % 3].into()),
            ..order(i, "acme", "Timeout")
        })
        .collect();
    f.fill_dlq_in_order(&msgs).await;
    let s = redrive(f.config(), req("true")).await;
    assert_eq!(s.settled, 300, "{s:?}");
    assert_groups_in_order(&msgs, &f.drain_source().await, &groups);
    assert_eq!(f.dlq_count().await, 0);
}

fn assert_groups_in_order(sent: &[TestMessage], arrived: &[Received], groups: &[&str]) {
    for group in groups {
        let got: Vec<String> = arrived
            .iter()
            .filter(|r| r.ordering_key.as_deref() == Some(group))
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect();
        let want: Vec<String> = sent
            .iter()
            .filter(|m| m.ordering_key.as_deref() == Some(group))
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect();
        assert_eq!(got, want, "group {group} keeps its order");
    }
}

// --- Triage (issue 10): report, export/import, purge, retention -----------

fn failing(i: usize, error: &str, description: String) -> TestMessage {
    TestMessage {
        body: format!(r#"{{"order":{i}}}"#).into_bytes(),
        attributes: attrs(&[
            ("tenant", if i.is_multiple_of(2) { "acme" } else { "globex" }),
            ("error", error),
            ("error_description", &description),
        ]),
        ordering_key: None,
    }
}

/// Nine failures in five patterns: numbers, quoted values and UUIDs vary
/// inside each pattern.
fn patterned() -> (Vec<TestMessage>, Vec<(&'static str, u64)>) {
    let msgs = vec![
        failing(0, "Timeout", "payment gateway timed out after 3012 ms".into()),
        failing(1, "Timeout", "payment gateway timed out after 15 ms".into()),
        failing(2, "Timeout", "payment gateway timed out after 7 ms".into()),
        failing(3, "Timeout", "inventory service timed out after 1500 ms".into()),
        failing(4, "Timeout", "inventory service timed out after 99 ms".into()),
        failing(5, "ValidationError", "field `sku` missing".into()),
        failing(6, "ValidationError", "field `qty` missing".into()),
        failing(7, "DownstreamUnavailable", "HTTP 503 from shipping".into()),
        failing(8, "Conflict", format!("order {} already exists", uuid::Uuid::new_v4())),
    ];
    let want = vec![
        ("Timeout: payment gateway timed out after <n> ms", 3),
        ("Timeout: inventory service timed out after <n> ms", 2),
        ("ValidationError: field <str> missing", 2),
        ("Conflict: order <uuid> already exists", 1),
        ("DownstreamUnavailable: HTTP <n> from shipping", 1),
    ];
    (msgs, want)
}

fn scratch_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(common::unique("dlqb-triage"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub async fn report_groups_patterns_exactly<F: Fixture>() {
    let f = F::create(false).await;
    let (msgs, want) = patterned();
    f.dead_letter(&msgs).await;
    let reg = Registry::new(f.config());
    let req = |by: &str, top: usize| ReportRequest {
        by: by.parse().unwrap(),
        filter: None,
        top,
        scan: 1000,
    };
    let r = triage::report(&reg, "dlq", &req("pattern", 10), &Default::default())
        .await
        .unwrap();
    assert_eq!((r.read, r.matched), (9, 9), "{r:?}");
    let got: Vec<(&str, u64)> = r.groups.iter().map(|g| (g.key.as_str(), g.count)).collect();
    assert_eq!(got, want, "{r:?}");
    assert!(r.other.is_none());
    let peeked: BTreeSet<String> = reg
        .backend("dlq")
        .await
        .unwrap()
        .peek(20)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    for g in &r.groups {
        assert!(peeked.contains(&g.sample_id), "{g:?}");
        assert!(
            g.first_enqueued_at.is_some() && g.first_enqueued_at <= g.last_enqueued_at,
            "{g:?}"
        );
        assert!(
            g.min_delivery_count.is_some_and(|c| c >= 1) && g.min_delivery_count <= g.max_delivery_count,
            "{g:?}"
        );
    }
    assert!((r.groups[0].share - 3.0 / 9.0).abs() < 1e-9);

    // Top 2 folds the other three patterns into `other`.
    let r = triage::report(&reg, "dlq", &req("pattern", 2), &Default::default())
        .await
        .unwrap();
    assert_eq!(r.groups.len(), 2);
    let other = r.other.expect("other");
    assert_eq!((other.count, other.groups_folded), (4, 3), "{other:?}");

    let r = triage::report(&reg, "dlq", &req("reason", 10), &Default::default())
        .await
        .unwrap();
    let got: Vec<(&str, u64)> = r.groups.iter().map(|g| (g.key.as_str(), g.count)).collect();
    assert_eq!(
        got,
        [
            ("Timeout", 5),
            ("ValidationError", 2),
            ("Conflict", 1),
            ("DownstreamUnavailable", 1)
        ]
    );
    let r = triage::report(
        &reg,
        "dlq",
        &ReportRequest {
            filter: Some(r#"reason == "Timeout""#),
            ..req("attribute:tenant", 10)
        },
        &Default::default(),
    )
    .await
    .unwrap();
    let got: Vec<(&str, u64)> = r.groups.iter().map(|g| (g.key.as_str(), g.count)).collect();
    assert_eq!(got, [("acme", 3), ("globex", 2)]);
    assert_eq!(f.dlq_count().await, 9, "reports remove nothing");
}

/// Export then import brings bodies and attributes back byte for byte.
pub async fn export_then_import_round_trips<F: Fixture>() {
    let f = F::create(false).await;
    let reg = Registry::new(f.config());
    let caps = reg.backend("dlq").await.unwrap().capabilities();
    let cases = payload_cases::<F>(&caps, br#"{"order":1}"#.to_vec(), "json");
    f.put_in_dlq(&cases).await;
    let dir = scratch_dir();
    let file = dir.join("export.jsonl");
    let s = triage::export(&reg, "dlq", &file, None, None, None, &Default::default())
        .await
        .unwrap();
    assert_eq!(s.written as usize, cases.len(), "{s:?}");
    assert_eq!(f.dlq_count().await, cases.len(), "export removes nothing");
    let lines: Vec<ExportedMessage> = triage::read_export(&file).unwrap().map(Result::unwrap).collect();
    assert_eq!(lines.len(), cases.len());
    for l in &lines {
        assert_eq!(l.body_bytes, l.to_message().unwrap().body.len());
        assert!(l.reason.as_deref() == Some("Payload"), "{l:?}");
    }

    let journal = Arc::new(Journal::open(&dir.join("journal.jsonl")).unwrap());
    let req = ImportRequest {
        rate: Some(100),
        ..ImportRequest::new(&file, "dlq")
    };
    let s = triage::import(&reg, &req, Some(journal), Default::default())
        .await
        .unwrap();
    assert_eq!(
        (s.matched, s.sent, s.failed),
        (cases.len() as u64, cases.len() as u64, 0),
        "{s:?}"
    );
    assert_arrived_intact(&cases, &f.drain_source().await, caps.typed_attributes);
    // What the destination cannot carry as it is gets named: here, only
    // typed values on a provider whose attributes are strings.
    let typed_names: BTreeSet<String> = lines
        .iter()
        .flat_map(|l| l.attributes.iter())
        .filter(|(_, a)| !matches!(a.value, AttrValue::String(_)) || a.data_type.is_some())
        .map(|(k, _)| k.clone())
        .collect();
    if caps.typed_attributes {
        assert!(s.not_carried.is_empty(), "{s:?}");
    } else {
        for name in &typed_names {
            let named = format!("attribute `{name}`");
            assert!(s.not_carried.keys().any(|k| k.contains(&named)), "{name} named: {s:?}");
        }
    }
    let imported = read_records(&dir.join("journal.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| matches!(r, Record::Imported { .. }))
        .count();
    assert_eq!(imported, cases.len());
}

/// Export then import of an ordered DLQ (FIFO groups, ordering keys,
/// sessions): each copy keeps its group, and each group arrives in the order
/// it was exported.
pub async fn export_then_import_keeps_groups_in_order<F: Fixture>() {
    let f = F::create(true).await;
    let msgs: Vec<TestMessage> = (0..30)
        .map(|i| TestMessage {
            ordering_key: Some(if i % 3 == 0 { "g-a".into() } else { "g-b".into() }),
            ..order(i, "acme", "Timeout")
        })
        .collect();
    f.fill_dlq_in_order(&msgs).await;
    let reg = Registry::new(f.config());
    let dir = scratch_dir();
    let file = dir.join("export.jsonl");
    let s = triage::export(&reg, "dlq", &file, None, None, None, &Default::default())
        .await
        .unwrap();
    // SQS FIFO: a group's later messages stay hidden while its earlier ones
    // are leased, and reading deletes nothing, so an export holds the first
    // messages of each group and says how many it could not reach. What it
    // holds of a group is that group's beginning, in order.
    assert_eq!(s.written + s.held_back, 30, "{s:?}");
    assert!(s.written > 0, "{s:?}");
    let exported: Vec<String> = triage::read_export(&file)
        .unwrap()
        .map(|l| String::from_utf8(l.unwrap().to_message().unwrap().body.to_vec()).unwrap())
        .collect();
    let written: Vec<TestMessage> = msgs
        .iter()
        .filter(|m| exported.contains(&String::from_utf8_lossy(&m.body).into_owned()))
        .cloned()
        .collect();
    assert_eq!(written.len() as u64, s.written, "each line once: {exported:?}");
    for group in ["g-a", "g-b"] {
        let of = |ms: &[TestMessage]| ms.iter().filter(|m| m.ordering_key.as_deref() == Some(group)).count();
        let head: Vec<&TestMessage> = msgs
            .iter()
            .filter(|m| m.ordering_key.as_deref() == Some(group))
            .take(of(&written))
            .collect();
        assert!(
            head.iter()
                .all(|m| exported.contains(&String::from_utf8_lossy(&m.body).into_owned())),
            "group {group}: the export holds the group's first messages"
        );
    }
    if s.held_back == 0 {
        assert_eq!(s.written, 30, "{s:?}");
    }
    let req = ImportRequest::new(&file, "dlq");
    let s = triage::import(&reg, &req, None, Default::default()).await.unwrap();
    assert_eq!((s.sent, s.failed), (written.len() as u64, 0), "{s:?}");
    assert!(s.not_carried.is_empty(), "{s:?}");
    assert_groups_in_order(&written, &f.drain_source().await, &["g-a", "g-b"]);
}

/// Purge removes exactly the matches, after backing each up, and journals each.
pub async fn purge_removes_exactly_the_matches_with_backup<F: Fixture>() {
    let f = F::create(false).await;
    let msgs = orders(8);
    f.dead_letter(&msgs).await;
    let reg = Registry::new(f.config());
    let dir = scratch_dir();
    let backup = dir.join("backup.jsonl");
    let journal = Arc::new(Journal::open(&dir.join("journal.jsonl")).unwrap());
    let filter = r#"attributes.tenant == "acme""#;

    let dry = triage::purge(
        &reg,
        "dlq",
        &PurgeRequest {
            filter,
            older_than: None,
            dry_run: true,
            backup: Some(&backup),
            max: None,
            rate: None,
            trigger: Trigger::Cli,
        },
        None,
        Default::default(),
        None,
    )
    .await
    .unwrap();
    assert_eq!((dry.matched, dry.settled), (4, 0), "{dry:?}");
    assert_eq!(f.dlq_count().await, 8, "a dry run deletes nothing");
    assert!(!backup.exists(), "a dry run writes no backup");

    let s = triage::purge(
        &reg,
        "dlq",
        &PurgeRequest {
            filter,
            older_than: None,
            dry_run: false,
            backup: Some(&backup),
            max: None,
            rate: None,
            trigger: Trigger::Cli,
        },
        Some(journal),
        Default::default(),
        None,
    )
    .await
    .unwrap();
    assert!(s.ok(), "{s:?}");
    assert_eq!((s.examined, s.matched, s.sent, s.settled), (8, 4, 4, 4), "{s:?}");
    assert_eq!(f.dlq_count().await, 4);
    assert!(f.drain_source().await.is_empty(), "a purge sends nothing");

    let acme: Vec<&TestMessage> = msgs
        .iter()
        .filter(|m| m.attributes["tenant"].as_text() == "acme")
        .collect();
    let lines: Vec<ExportedMessage> = triage::read_export(&backup).unwrap().map(Result::unwrap).collect();
    let backed_up = sorted(
        lines
            .iter()
            .map(|l| String::from_utf8(l.to_message().unwrap().body.to_vec()).unwrap()),
    );
    assert_eq!(backed_up, expected_bodies(acme.iter().copied()));
    for l in &lines {
        assert_eq!(l.attributes["tenant"].as_text(), "acme");
    }
    let purged: BTreeSet<String> = read_records(&dir.join("journal.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Purged { id, reason, .. } => {
                assert!(reason.is_some(), "the reason is journaled");
                Some(id)
            }
            _ => None,
        })
        .collect();
    let backed_up_ids: BTreeSet<String> = lines.iter().map(|l| l.id.clone()).collect();
    assert_eq!(purged, backed_up_ids, "every deletion is journaled, and only those");
    let left = reg.backend("dlq").await.unwrap().peek(20).await.unwrap();
    assert!(
        left.iter().all(|m| m.attributes["tenant"].as_text() == "globex"),
        "{left:?}"
    );
}

/// A retention dry run lists exactly the expired messages and touches nothing.
pub async fn retention_dry_run_lists_what_it_would_purge<F: Fixture>() {
    let f = F::create(false).await;
    f.dead_letter(&orders(5)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dir = scratch_dir();
    let with_policy = |max_age: Duration| {
        let mut c = f.config();
        c.queues[0].retention = Some(RetentionConfig {
            max_age,
            action: RetentionAction::ExportThenPurge,
            export_dir: Some(dir.clone()),
            dry_run: true,
            check_every: Duration::from_secs(3600),
        });
        Registry::new(c)
    };
    let reg = with_policy(Duration::from_secs(1));
    let o = triage::apply_retention(&reg, "dlq", false, None, None, Trigger::Cli, Default::default(), None)
        .await
        .unwrap();
    assert!(o.dry_run && o.purge.is_none(), "{o:?}");
    assert_eq!((o.read, o.expired, o.listed.len()), (5, 5, 5), "{o:?}");
    let ids: BTreeSet<String> = reg
        .backend("dlq")
        .await
        .unwrap()
        .peek(20)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(o.listed.iter().map(|m| m.id.clone()).collect::<BTreeSet<_>>(), ids);
    assert_eq!(f.dlq_count().await, 5, "a dry run purges nothing");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "and writes no backup");

    let reg = with_policy(Duration::from_secs(3600));
    let o = triage::apply_retention(&reg, "dlq", false, None, None, Trigger::Cli, Default::default(), None)
        .await
        .unwrap();
    assert_eq!((o.read, o.expired), (5, 0), "{o:?}");
}

/// A pass holds what it leased and did not move until it ends. At
/// `redrive.max_held` it stops leasing, moves what it examined, releases the
/// rest and says why it stopped; nothing is lost, and a later run goes on.
pub async fn a_pass_stops_leasing_at_max_held_and_loses_nothing<F: Fixture>() {
    let f = F::create(false).await;
    let msgs = orders(40);
    f.dead_letter(&msgs).await;
    let mut config = f.config();
    config.redrive.max_held = 5;
    // One lease at a time: with several in flight, one may return every
    // message while an earlier one comes back empty and ends the pass first.
    config.redrive.concurrency = 1;
    let s = redrive(config, req(r#"attributes.tenant == "acme""#)).await;
    assert_eq!(s.stopped, StopReason::HeldLimit, "{s:?}");
    assert!(s.ok(), "{s:?}");
    assert!(s.released >= 5, "{s:?}");
    assert_eq!(s.examined, s.matched + s.released, "{s:?}");
    assert_eq!((s.sent, s.settled), (s.matched, s.matched), "{s:?}");
    let first = f.drain_source().await;
    assert_eq!(first.len() as u64, s.settled);
    assert_eq!(f.dlq_count().await as u64, 40 - s.settled, "nothing lost");

    let s = redrive(f.config(), req(r#"attributes.tenant == "acme""#)).await;
    assert!(s.ok() && s.stopped != StopReason::HeldLimit, "{s:?}");
    let acme = msgs.iter().filter(|m| m.attributes["tenant"].as_text() == "acme");
    let second = f.drain_source().await;
    let both: Vec<Received> = first.into_iter().chain(second).collect();
    assert_eq!(bodies(&both), expected_bodies(acme), "each match moved once");
    assert_eq!(f.dlq_count().await, 20);
}

/// A pass that outlasts its hold extends what it holds. 36 messages, 12
/// matching, moved at 2 a second: about 6 s, against a hold of 3 s.
/// Unextended, the non-matching messages held from the first leases came
/// back mid-pass, were delivered again and held a second time (`released`
/// counted them twice), and a run of leases bringing only those could end
/// the pass before it had examined everything. On Service Bus the shared
/// emulator's LockDuration (60 s) holds whatever the pass asks, so there
/// this checks only that renewals do no harm; tests/servicebus.rs checks
/// them against a 2 s LockDuration.
pub async fn a_pass_longer_than_its_hold_keeps_what_it_holds<F: Fixture>() {
    let f = F::create(false).await;
    let msgs = orders(36);
    f.dead_letter(&msgs).await;
    let mut config = f.config();
    config.redrive.hold = Duration::from_secs(3);
    let req = RedriveRequest {
        rate: Some(2),
        ..req(r#"attributes.error == "Timeout""#)
    };
    let started = std::time::Instant::now();
    let s = redrive(config, req).await;
    assert!(s.ok(), "{s:?}");
    assert!(
        started.elapsed() > Duration::from_secs(4),
        "the pass outlasted its hold: {s:?}"
    );
    assert_eq!(s.stopped, StopReason::Drained, "{s:?}");
    assert_eq!((s.examined, s.matched, s.settled), (36, 12, 12), "{s:?}");
    assert_eq!(s.released, 24, "each held message was held once: {s:?}");
    let timeouts = msgs.iter().filter(|m| m.attributes["error"].as_text() == "Timeout");
    assert_eq!(bodies(&f.drain_source().await), expected_bodies(timeouts));
    assert_eq!(f.dlq_count().await, 24, "nothing lost");
}

/// A read by leases (export, report and retention on SQS and Pub/Sub) that
/// outlasts its hold extends what it holds, so each message is delivered to
/// it once. Unextended, the first leases lapsed after 3 s and came back:
/// skipped as seen, but each such message was received once more (SQS's
/// ApproximateReceiveCount rose by two instead of one). Service Bus reads
/// with a true peek, and Pub/Sub's DLQ delivery count is the source's:
/// there the counts stay as they were, and the read is checked whole.
pub async fn a_read_longer_than_its_hold_receives_each_message_once<F: Fixture>() {
    let f = F::create(false).await;
    f.dead_letter(&orders(30)).await;
    let reg = Registry::new(f.config());
    let backend = reg.backend("dlq").await.unwrap();
    let before = delivery_counts(&backend).await;
    assert_eq!(before.len(), 30);
    let cancel = tokio_util::sync::CancellationToken::new();
    let started = std::time::Instant::now();
    let stats = triage::browse(&backend, usize::MAX, Duration::from_secs(3), &cancel, |_| {
        // A slow reader (a pipe, a disk): 30 messages take about 6 s.
        std::thread::sleep(Duration::from_millis(200));
        Ok(true)
    })
    .await
    .unwrap();
    assert!(started.elapsed() > Duration::from_secs(5));
    assert_eq!(stats.read, 30, "{stats:?}");
    assert_received_once(&before, &delivery_counts(&backend).await, "the read");
}

/// Each message's delivery count, as a browse of the DLQ shows it.
async fn delivery_counts(backend: &Arc<dyn QueueBackend>) -> BTreeMap<String, u32> {
    let msgs = backend.peek(100).await.unwrap();
    msgs.into_iter()
        .map(|m| (m.id, m.delivery_count.unwrap_or_default()))
        .collect()
}

/// Every message's count rose alike, by two at most (SQS: once by `what`,
/// once by the browse that took `before`): a hold that lapsed mid-read had
/// messages delivered to it again, and their counts rose more.
fn assert_received_once(before: &BTreeMap<String, u32>, after: &BTreeMap<String, u32>, what: &str) {
    assert_eq!(after.len(), before.len(), "{what}: released every message");
    let rises: BTreeSet<u32> = before.iter().map(|(id, c)| after[id] - c).collect();
    assert!(
        rises.len() == 1 && rises.iter().all(|&r| r <= 2),
        "every message was received once by {what}: rises {rises:?}"
    );
}

/// `inspect --filter` and the API's `/messages` read through
/// `first_matches`: a scan slower than its hold (a slow filter, 30 messages
/// in about 6 s against a 3 s hold) keeps what it read leased, and shows each
/// message once.
pub async fn a_filtered_inspect_longer_than_its_hold_shows_each_message_once<F: Fixture>() {
    let f = F::create(false).await;
    f.dead_letter(&orders(30)).await;
    let reg = Registry::new(f.config());
    let backend = reg.backend("dlq").await.unwrap();
    let before = delivery_counts(&backend).await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let started = std::time::Instant::now();
    let shown = triage::first_matches(
        &backend,
        1000,
        1000,
        usize::MAX,
        Duration::from_secs(3),
        &cancel,
        |_| {
            std::thread::sleep(Duration::from_millis(200));
            Some(true)
        },
    )
    .await
    .unwrap();
    assert!(started.elapsed() > Duration::from_secs(5));
    assert_eq!(shown.read, 30, "{shown:?}");
    let ids: BTreeSet<&str> = shown.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len(), 30, "each message shown once");
    assert!(!shown.capped && !shown.interrupted && !shown.truncated, "{shown:?}");
    assert_received_once(&before, &delivery_counts(&backend).await, "the scan");
}

/// SQS fair queues: a standard queue's MessageGroupId (the tenant) stays on
/// the copy (a standard queue keeps no order, so only the tenants are
/// compared).
#[cfg(feature = "sqs")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_fair_queue_tenants_stay_on_the_copies() {
    let f = common::sqs::SqsFixture::create(false).await;
    let msgs: Vec<TestMessage> = (0..6)
        .map(|i| TestMessage {
            ordering_key: Some(if i % 2 == 0 {
                "tenant-a".into()
            } else {
                "tenant-b".into()
            }),
            ..order(i, "acme", "Timeout")
        })
        .collect();
    f.put_in_dlq(&msgs).await;
    let s = redrive(f.config(), req("true")).await;
    assert_eq!(s.settled, 6, "{s:?}");
    let tenants = |pairs: Vec<(String, Option<String>)>| pairs.into_iter().collect::<BTreeSet<_>>();
    let sent = msgs
        .iter()
        .map(|m| (String::from_utf8_lossy(&m.body).into_owned(), m.ordering_key.clone()));
    let arrived = f.drain_source().await;
    let got = arrived
        .iter()
        .map(|r| (String::from_utf8_lossy(&r.body).into_owned(), r.ordering_key.clone()));
    assert_eq!(tenants(got.collect()), tenants(sent.collect()));
}

/// A message whose DeadLetterQueueSourceArn names a queue that was deleted
/// is not sent to another queue that dead-letters here (the one
/// ListDeadLetterSourceQueues then lists): its send fails, naming the queue,
/// and it stays in the DLQ. (ministack: moto sets no DeadLetterQueueSourceArn.)
#[cfg(feature = "sqs")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_a_deleted_source_is_not_replaced_by_another() {
    let f = common::sqs::SqsFixture::create_on(common::sqs::ministack_endpoint(), false).await;
    let msgs: Vec<TestMessage> = (0..3).map(|i| order(i, "acme", "Timeout")).collect();
    f.dead_letter(&msgs).await;
    let source_name = f.source_url.rsplit('/').next().unwrap().to_string();
    let other = f
        .create_queue(&format!("{source_name}-other"), &[f.dead_lettering_here().await])
        .await;
    f.client.delete_queue().queue_url(&f.source_url).send().await.unwrap();
    let s = redrive(f.config(), req("true")).await;
    assert_eq!(s.settled, 0, "{s:?}");
    assert!(!s.ok(), "{s:?}");
    assert!(s.errors.iter().any(|e| e.contains(&source_name)), "{s:?}");
    assert_eq!(f.count(&other).await, 0, "nothing went to the other queue");
    assert_eq!(f.count(&f.dlq_url).await, 3);
}

/// Instantiate the suite for one backend.
// Every test runs on a multi-threaded runtime, as the CLI and `serve` do:
// there, spawned leases and sends run in parallel and may first run in any
// order (the last one spawned often first), which a single thread would hide.
macro_rules! conformance {
    ($module:ident, $fixture:ty) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dead_lettered_messages_show_in_stats_and_peek() {
                super::dead_lettered_messages_show_in_stats_and_peek::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn filtered_redrive_moves_exactly_the_matches() {
                super::filtered_redrive_moves_exactly_the_matches::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_later_pass_on_the_same_backend_sees_what_the_earlier_released() {
                super::a_later_pass_on_the_same_backend_sees_what_the_earlier_released::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dry_run_changes_nothing() {
                super::dry_run_changes_nothing::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn max_caps_the_run() {
                super::max_caps_the_run::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn run_ends_when_nothing_matches() {
                super::run_ends_when_nothing_matches::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn evaluation_errors_are_no_match_and_reported() {
                super::evaluation_errors_are_no_match_and_reported::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn payloads_survive_byte_for_byte() {
                super::payloads_survive_byte_for_byte::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ordering_group_is_kept() {
                super::ordering_group_is_kept::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ordering_holds_with_leases_in_flight() {
                super::ordering_holds_with_leases_in_flight::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_pass_stops_leasing_at_max_held_and_loses_nothing() {
                super::a_pass_stops_leasing_at_max_held_and_loses_nothing::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_pass_longer_than_its_hold_keeps_what_it_holds() {
                super::a_pass_longer_than_its_hold_keeps_what_it_holds::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_read_longer_than_its_hold_receives_each_message_once() {
                super::a_read_longer_than_its_hold_receives_each_message_once::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_filtered_inspect_longer_than_its_hold_shows_each_message_once() {
                super::a_filtered_inspect_longer_than_its_hold_shows_each_message_once::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn report_groups_patterns_exactly() {
                super::report_groups_patterns_exactly::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn export_then_import_round_trips() {
                super::export_then_import_round_trips::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn export_then_import_keeps_groups_in_order() {
                super::export_then_import_keeps_groups_in_order::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn purge_removes_exactly_the_matches_with_backup() {
                super::purge_removes_exactly_the_matches_with_backup::<$fixture>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn retention_dry_run_lists_what_it_would_purge() {
                super::retention_dry_run_lists_what_it_would_purge::<$fixture>().await;
            }
        }
    };
}

#[cfg(feature = "sqs")]
conformance!(sqs, common::sqs::SqsFixture);

#[cfg(feature = "pubsub")]
conformance!(pubsub, common::pubsub::PubSubFixture);

#[cfg(feature = "servicebus")]
conformance!(servicebus, common::servicebus::ServiceBusFixture);

#[cfg(feature = "servicebus")]
conformance!(servicebus_subscription, common::servicebus::ServiceBusTopicFixture);
