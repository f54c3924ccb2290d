//! What the ATOM management endpoint answers: an entity's message counts,
//! read from its description in Service Bus's XML namespace, and the
//! refusal that means the credentials lack the Manage right (after which
//! `stats` counts by browsing). Apart from the adapter because the XML is
//! parsed on its own: the `servicebus_atom` fuzz target drives it.

pub(super) const API_VERSION: &str = "2021-05";
const SB_XML_NS: &[u8] = b"http://schemas.microsoft.com/netservices/2011/06/servicebus";
/// The namespace of an entity's description and its settings.
const CONNECT_XML_NS: &[u8] = b"http://schemas.microsoft.com/netservices/2010/10/servicebus/connect";

/// `(ActiveMessageCount, DeadLetterMessageCount)` from an ATOM entry; None
/// for an empty feed (Azure's answer for a missing entity).
pub fn parse_counts(xml: &str) -> Option<(u64, u64)> {
    let [active, dead, _] = count_details(xml);
    Some((active.unwrap_or(0), dead?))
}

/// `TransferDeadLetterMessageCount` from an ATOM entry, when it has one.
pub fn parse_transfer_dead_letter_count(xml: &str) -> Option<u64> {
    count_details(xml)[2]
}

/// The active, dead-letter and transfer dead-letter counts of an ATOM
/// entry, in Service Bus's namespace (anything else of those names is not
/// the count).
fn count_details(xml: &str) -> [Option<u64>; 3] {
    use quick_xml::events::Event;
    use quick_xml::name::ResolveResult;
    let mut reader = quick_xml::NsReader::from_str(xml);
    let mut current: Option<usize> = None;
    let mut counts = [None; 3];
    loop {
        match reader.read_resolved_event() {
            Ok((ResolveResult::Bound(ns), Event::Start(e))) if ns.as_ref() == SB_XML_NS => {
                current = match e.local_name().as_ref() {
                    b"ActiveMessageCount" => Some(0),
                    b"DeadLetterMessageCount" => Some(1),
                    b"TransferDeadLetterMessageCount" => Some(2),
                    _ => None,
                };
            }
            Ok((_, Event::Text(t))) => {
                if let Some(which) = current {
                    counts[which] = t.decode().ok().and_then(|s| s.trim().parse::<u64>().ok());
                }
            }
            Ok((_, Event::End(_))) => current = None,
            Ok((_, Event::Eof)) | Err(_) => break,
            _ => {}
        }
    }
    counts
}

/// The entity's `LockDuration` from an ATOM entry (an ISO 8601 duration:
/// `PT1M`, `PT30S`, `PT4M30.5S`), when it has one that reads.
pub fn parse_lock_duration(xml: &str) -> Option<std::time::Duration> {
    use quick_xml::events::Event;
    use quick_xml::name::ResolveResult;
    let mut reader = quick_xml::NsReader::from_str(xml);
    let mut inside = false;
    loop {
        match reader.read_resolved_event() {
            Ok((ResolveResult::Bound(ns), Event::Start(e))) if ns.as_ref() == CONNECT_XML_NS => {
                inside = e.local_name().as_ref() == b"LockDuration";
            }
            Ok((_, Event::Text(t))) if inside => return iso_duration(t.decode().ok()?.trim()),
            Ok((_, Event::End(_))) => inside = false,
            Ok((_, Event::Eof)) | Err(_) => return None,
            _ => {}
        }
    }
}

/// An ISO 8601 duration of days, hours, minutes and seconds (what Service
/// Bus writes: `PT1M`, `P1DT2H`, `PT0.5S`); None for anything else,
/// including years, months and weeks, which have no fixed length.
fn iso_duration(text: &str) -> Option<std::time::Duration> {
    let rest = text.strip_prefix('P')?;
    let (date, time) = rest.split_once('T').unwrap_or((rest, ""));
    if (date.is_empty() && time.is_empty()) || rest.ends_with('T') {
        return None;
    }
    let mut seconds = 0.0;
    for (part, units) in [
        (date, &[('D', 86_400.0)][..]),
        (time, &[('H', 3_600.0), ('M', 60.0), ('S', 1.0)][..]),
    ] {
        let mut part = part;
        let mut next = 0;
        while !part.is_empty() {
            let end = part.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
            let unit = part[end..].chars().next()?;
            let at = units[next..].iter().position(|&(u, _)| u == unit)? + next;
            let n: f64 = part[..end].parse().ok()?;
            seconds += n * units[at].1;
            next = at + 1;
            part = &part[end + 1..];
        }
    }
    std::time::Duration::try_from_secs_f64(seconds).ok()
}

/// Whether a refusal of the management endpoint is for want of the Manage
/// right (Azure: "Manage,EntityRead claims required for this operation.",
/// which the emulator says too), not a bad token.
pub(super) fn lacks_manage(refusal: &str) -> bool {
    let lower = refusal.to_ascii_lowercase();
    lower.contains("manage") && lower.contains("claim")
}

/// The start of an answer's body, for an error: an error page can be long.
pub(super) fn snippet(text: &str) -> String {
    text.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_durations_read_as_service_bus_writes_them() {
        use std::time::Duration;
        let entry = |d: &str| {
            format!(
                r#"<entry xmlns="http://www.w3.org/2005/Atom"><content type="application/xml"><QueueDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect" xmlns:i="http://www.w3.org/2001/XMLSchema-instance"><LockDuration>{d}</LockDuration></QueueDescription></content></entry>"#
            )
        };
        for (text, secs) in [
            ("PT1M", 60.0),
            ("PT30S", 30.0),
            ("PT4M30.5S", 270.5),
            ("PT0.25S", 0.25),
            ("P1DT2H", 93_600.0),
            ("PT5M", 300.0),
        ] {
            assert_eq!(
                parse_lock_duration(&entry(text)),
                Some(Duration::from_secs_f64(secs)),
                "{text}"
            );
        }
        for text in ["", "P", "PT", "1M", "PT1Y", "P1M", "PTM", "PT1S1M", "PT-1S", "PT1M1M"] {
            assert_eq!(parse_lock_duration(&entry(text)), None, "{text}");
        }
        // Outside the description's namespace it is not the entity's.
        assert_eq!(
            parse_lock_duration("<entry><LockDuration>PT1M</LockDuration></entry>"),
            None
        );
    }
    use crate::backend::servicebus::sub_queue_suffix;
    use crate::config::ServiceBusSubQueue;

    #[test]
    fn counts_come_from_the_servicebus_namespace_and_empty_feeds_are_none() {
        let xml = r#"<entry xmlns="http://www.w3.org/2005/Atom"><content type="application/xml">
            <QueueDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect">
            <CountDetails xmlns:d2p1="http://schemas.microsoft.com/netservices/2011/06/servicebus">
            <d2p1:ActiveMessageCount>3</d2p1:ActiveMessageCount>
            <d2p1:DeadLetterMessageCount>7</d2p1:DeadLetterMessageCount>
            </CountDetails></QueueDescription></content></entry>"#;
        assert_eq!(parse_counts(xml), Some((3, 7)));
        assert_eq!(parse_transfer_dead_letter_count(xml), None, "not reported, not zero");
        let empty =
            r#"<feed xmlns="http://www.w3.org/2005/Atom"><title type="text">Publicly Listed Services</title></feed>"#;
        assert_eq!(parse_counts(empty), None);
    }

    #[test]
    fn the_transfer_dead_letter_count_is_its_own_element() {
        let xml = r#"<entry xmlns="http://www.w3.org/2005/Atom"><content type="application/xml">
            <SubscriptionDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect">
            <CountDetails xmlns:d2p1="http://schemas.microsoft.com/netservices/2011/06/servicebus">
            <d2p1:ActiveMessageCount>3</d2p1:ActiveMessageCount>
            <d2p1:DeadLetterMessageCount>7</d2p1:DeadLetterMessageCount>
            <d2p1:TransferMessageCount>1</d2p1:TransferMessageCount>
            <d2p1:TransferDeadLetterMessageCount>5</d2p1:TransferDeadLetterMessageCount>
            </CountDetails><TransferDeadLetterMessageCount>9</TransferDeadLetterMessageCount>
            </SubscriptionDescription></content></entry>"#;
        assert_eq!(parse_counts(xml), Some((3, 7)));
        assert_eq!(parse_transfer_dead_letter_count(xml), Some(5));
        assert_eq!(sub_queue_suffix(ServiceBusSubQueue::DeadLetter), "$DeadLetterQueue");
        assert_eq!(
            sub_queue_suffix(ServiceBusSubQueue::TransferDeadLetter),
            "$Transfer/$DeadLetterQueue"
        );
    }

    #[test]
    fn a_refusal_for_want_of_manage_is_told_from_a_bad_token() {
        // Azure's answer to a Listen or Send key, and to a token it refuses.
        assert!(lacks_manage(
            "<Error><Code>401</Code><Detail>Manage,EntityRead claims required for this operation. TrackingId:6399943f_G4S2</Detail></Error>"
        ));
        assert!(!lacks_manage(
            "<Error><Code>401</Code><Detail>InvalidSignature: The token has an invalid signature.</Detail></Error>"
        ));
        assert!(!lacks_manage("claim is empty or token is invalid."));
    }
}
