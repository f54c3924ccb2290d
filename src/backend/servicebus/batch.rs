//! A send's copies packed into batch envelopes (message format
//! `0x80013700`, what the SDKs send): each copy's encoding, and consecutive
//! copies grouped to fit the link's maximum message size, Service Bus's 1 MB
//! limit on a batch and the batch count. Apart from the adapter because the
//! sizing is arithmetic on encodings, checked against a real envelope's
//! encoding without a broker.

use fe2o3_amqp::link::SendError;
use fe2o3_amqp::link::delivery::{DeliveryFut, Sendable};
use fe2o3_amqp_types::messaging::message::__private::Serializable;
use fe2o3_amqp_types::messaging::{Batch, Body, Data, Message, MessageId, Outcome};
use fe2o3_amqp_types::primitives::{Binary, Value};

use super::BATCH;

/// One send's AMQP message: a lone message as it is, several in the batch
/// envelope Service Bus unpacks (what azservicebus and the other SDKs send).
pub(super) enum Envelope {
    Single(Sendable<Body<Value>>),
    Batch(Sendable<Batch<Data>>),
}

impl Envelope {
    /// Queue the transfer; the returned future is its outcome.
    pub(super) async fn queue_on(
        &self,
        link: &mut fe2o3_amqp::Sender,
    ) -> std::result::Result<DeliveryFut<std::result::Result<Outcome, SendError>>, SendError> {
        match self {
            Envelope::Single(m) => link.send_batchable_ref(m).await,
            Envelope::Batch(b) => link.send_batchable_ref(b).await,
        }
    }
}

/// Service Bus's message format of a batch envelope.
const BATCH_MESSAGE_FORMAT: u32 = 0x8001_3700;
/// What each message adds to a batch envelope besides its encoding: a data
/// section's descriptor and binary length.
const BATCH_ITEM_OVERHEAD: usize = 8;
/// Room for a copy's sections around its body: properties, annotations and
/// a few attributes fit; more grow the buffer once.
const ENCODED_HEADROOM: usize = 512;
/// The largest batch envelope Service Bus takes, whatever the link's
/// maximum message size: a premium entity with large messages advertises up
/// to 100 MB on its links but refuses any batch over 1 MB (the SDKs cap
/// their batches so, azure-sdk-for-net#44914).
const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// A copy's AMQP encoding, in a buffer sized for its body up front (growing
/// it by doubling copied each body several times).
pub(super) fn encode(m: &Message<Body<Value>>) -> std::result::Result<Vec<u8>, serde_amqp::Error> {
    use serde::Serialize;
    let body = match &m.body {
        Body::Data(sections) => sections.iter().map(|d| d.0.len()).sum(),
        _ => 0,
    };
    let mut buf = Vec::with_capacity(body + ENCODED_HEADROOM);
    Serializable(m).serialize(&mut serde_amqp::ser::Serializer::new(&mut buf))?;
    Ok(buf)
}

/// The size of a batch envelope around `first` and no message yet: the
/// envelope carries the first message's properties and annotations.
pub(super) fn envelope_base(first: &Message<Body<Value>>) -> usize {
    let empty = Message::builder()
        .properties(first.properties.clone())
        .message_annotations(first.message_annotations.clone())
        .data(Binary::new())
        .build();
    // A failed encoding fails the message's own encoding too, before this counts.
    serde_amqp::to_vec(&Serializable(empty)).map_or(0, |v| v.len()) + BATCH_ITEM_OVERHEAD
}

/// Consecutive batches of messages of encoded `sizes` that fit the link's
/// `max` bytes and [`MAX_BATCH_BYTES`], at most [`BATCH`] messages each;
/// `base(i)` is the size of an envelope that message `i` starts, asked only
/// of the messages that start one. A message too large for a batch goes in
/// one of its own, sent as a lone message (`send` fails those larger than
/// the link's maximum before they get here).
pub(super) fn pack(sizes: &[usize], base: impl Fn(usize) -> usize, max: usize) -> Vec<std::ops::Range<usize>> {
    let max = max.min(MAX_BATCH_BYTES);
    let mut ranges = Vec::new();
    let mut start = 0;
    while start < sizes.len() {
        let mut total = base(start) + sizes[start] + BATCH_ITEM_OVERHEAD;
        let mut end = start + 1;
        while end < sizes.len() && end - start < BATCH && total + sizes[end] + BATCH_ITEM_OVERHEAD <= max {
            total += sizes[end] + BATCH_ITEM_OVERHEAD;
            end += 1;
        }
        ranges.push(start..end);
        start = end;
    }
    ranges
}

/// The envelope of `batch` (with each message's encoding in `encoded`), and
/// which results it answers: each message's index and MessageId.
pub(super) fn envelope(
    mut batch: Vec<(usize, Message<Body<Value>>)>,
    encoded: Vec<Vec<u8>>,
) -> (Vec<(usize, String)>, Envelope) {
    let id = |m: &Message<Body<Value>>| match m.properties.as_ref().and_then(|p| p.message_id.as_ref()) {
        Some(MessageId::String(s)) => s.clone(),
        _ => String::new(),
    };
    let index = batch.iter().map(|(i, m)| (*i, id(m))).collect();
    if batch.len() == 1 {
        let (_, message) = batch.pop().expect("one message");
        return (index, Envelope::Single(Sendable::builder().message(message).build()));
    }
    let (_, first) = &batch[0];
    let message = Message::builder()
        .properties(first.properties.clone())
        .message_annotations(first.message_annotations.clone())
        .body(Batch::from(
            encoded.into_iter().map(|e| Data(Binary::from(e))).collect::<Vec<_>>(),
        ))
        .build();
    let sendable = Sendable::builder()
        .message(message)
        .message_format(BATCH_MESSAGE_FORMAT)
        .build();
    (index, Envelope::Batch(sendable))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::servicebus::codec::with_body;
    use azservicebus::prelude::ServiceBusMessage;

    #[test]
    fn batches_fit_the_link_and_the_count_and_oversized_messages_go_alone() {
        // Each message 1,000 bytes encoded, envelopes of 200 bytes.
        let even = vec![1000; 250];
        assert_eq!(pack(&even, |_| 200, usize::MAX), vec![0..100, 100..200, 200..250]);
        // 200 + k * 1,008 <= 10,000: nine per batch.
        let started = std::cell::RefCell::new(Vec::new());
        let ranges = pack(
            &even[..20],
            |i| {
                started.borrow_mut().push(i);
                200
            },
            10_000,
        );
        assert_eq!(ranges, vec![0..9, 9..18, 18..20]);
        assert_eq!(
            *started.borrow(),
            [0, 9, 18],
            "only a batch's first message sizes its envelope"
        );
        // A premium entity with large messages: 100 MB on the link, but
        // batches of 1 MB at most; a message over 1 MB still goes, alone.
        let premium = 100 << 20;
        let mut large = vec![60 * 1024; 40];
        large.insert(20, 5 << 20);
        let ranges = pack(&large, |_| 200, premium);
        assert!(ranges.contains(&(20..21)), "{ranges:?}");
        for r in &ranges {
            let total = 200 + large[r.clone()].iter().map(|s| s + BATCH_ITEM_OVERHEAD).sum::<usize>();
            assert!(r.len() == 1 || total <= MAX_BATCH_BYTES, "{r:?}: {total} bytes");
        }
        assert_eq!(ranges.len(), 5, "{ranges:?}");
        let odd = [500, 20_000, 500, 500];
        assert_eq!(pack(&odd, |_| 100, 10_000), vec![0..1, 1..2, 2..4]);
        assert!(pack(&[], |_| 100, 10_000).is_empty());
    }

    fn copy(id: &str, body: usize) -> Message<Body<Value>> {
        let mut m = ServiceBusMessage::new(vec![7u8; body]);
        m.set_message_id(id).unwrap();
        m.set_session_id(Some("s".to_string())).unwrap();
        let raw = m.raw_amqp_message().clone();
        let body = Body::Data(Batch::from(vec![raw.body.clone()]));
        with_body(raw, body)
    }

    #[test]
    fn a_batch_envelope_holds_every_message_and_is_no_larger_than_counted() {
        use fe2o3_amqp_types::messaging::message::__private::Deserializable;
        // A body of 70 KiB takes a 4-byte length: the largest item overhead.
        let batch = vec![(4, copy("a", 10)), (7, copy("b", 70 * 1024)), (9, copy("c", 0))];
        let encoded: Vec<Vec<u8>> = batch
            .iter()
            .map(|(_, m)| serde_amqp::to_vec(&Serializable(m)).unwrap())
            .collect();
        let counted = envelope_base(&batch[0].1) + encoded.iter().map(|e| e.len() + BATCH_ITEM_OVERHEAD).sum::<usize>();
        let (index, sent) = envelope(batch.clone(), encoded);
        assert_eq!(index, vec![(4, "a".into()), (7, "b".into()), (9, "c".into())]);
        let Envelope::Batch(sendable) = sent else {
            panic!("three messages go in an envelope")
        };
        assert_eq!(sendable.message_format, BATCH_MESSAGE_FORMAT);
        let bytes = serde_amqp::to_vec(&Serializable(&sendable.message)).unwrap();
        assert!(
            bytes.len() <= counted && bytes.len() + 64 > counted,
            "{} against {counted}",
            bytes.len()
        );
        // The envelope carries the first message's properties, and each item
        // decodes to the message it was made of.
        assert_eq!(sendable.message.properties, batch[0].1.properties);
        let items = &sendable.message.body;
        assert_eq!(items.len(), 3);
        for (item, (_, original)) in items.iter().zip(&batch) {
            let m: Deserializable<Message<Body<Value>>> = serde_amqp::from_slice(&item.0).unwrap();
            assert_eq!(m.0.properties, original.properties);
            assert_eq!(m.0.body, original.body);
        }
        // A lone message is sent as it is.
        let one = vec![(0, copy("d", 5))];
        let (_, sent) = envelope(one, vec![Vec::new()]);
        assert!(matches!(sent, Envelope::Single(s) if s.message_format == 0));
    }
}
