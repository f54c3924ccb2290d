//! AMQP 1.0 framing (section 2.3 of the spec): an 8-byte header, then a
//! performative, then for transfers the message payload.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fe2o3_amqp_types::performatives::{Performative, Transfer};
use serde::{Deserialize, Serialize};
use serde_amqp::{de::Deserializer, read::IoReader};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
const FRAME_TYPE_AMQP: u8 = 0x00;
const FRAME_TYPE_SASL: u8 = 0x01;
const HEADER_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {size} bytes is outside 8..={max}")]
    BadSize { size: usize, max: usize },
    #[error("malformed frame: {0}")]
    Decode(#[from] serde_amqp::Error),
}

/// A decoded frame. `performative` is `None` for an empty (heartbeat) frame.
#[derive(Debug)]
pub struct Frame {
    pub channel: u16,
    pub performative: Option<Performative>,
    pub payload: Bytes,
}

/// Reads one raw frame body, whatever its type.
async fn read_raw<R: AsyncRead + Unpin>(reader: &mut R, max_size: usize) -> Result<(u16, Bytes), FrameError> {
    let size = reader.read_u32().await? as usize;
    if !(HEADER_LEN..=max_size).contains(&size) {
        return Err(FrameError::BadSize { size, max: max_size });
    }
    let mut rest = vec![0u8; size - 4];
    reader.read_exact(&mut rest).await?;
    let doff = usize::from(rest[0]) * 4;
    let channel = u16::from_be_bytes([rest[2], rest[3]]);
    if doff < HEADER_LEN || doff > size {
        return Err(FrameError::BadSize { size: doff, max: size });
    }
    let mut body = Bytes::from(rest);
    body.advance(doff - 4);
    Ok((channel, body))
}

pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, max_size: usize) -> Result<Frame, FrameError> {
    let (channel, mut body) = read_raw(reader, max_size).await?;
    if body.is_empty() {
        return Ok(Frame {
            channel,
            performative: None,
            payload: body,
        });
    }
    // The deserializer stops after the performative; what is left is the payload.
    let performative = {
        let mut deserializer = Deserializer::new(IoReader::new((&mut body).reader()));
        Performative::deserialize(&mut deserializer)?
    };
    Ok(Frame {
        channel,
        performative: Some(performative),
        payload: body,
    })
}

/// Reads a SASL frame body of type `T` (the emulator only ever expects `sasl-init`).
pub async fn read_sasl<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(reader: &mut R) -> Result<T, FrameError> {
    let (_, body) = read_raw(reader, 64 * 1024).await?;
    Ok(serde_amqp::from_slice(&body)?)
}

fn put_frame(out: &mut BytesMut, frame_type: u8, channel: u16, body: &[u8], payload: &[u8]) {
    out.put_u32((HEADER_LEN + body.len() + payload.len()) as u32);
    out.put_u8(2);
    out.put_u8(frame_type);
    out.put_u16(channel);
    out.put_slice(body);
    out.put_slice(payload);
}

pub fn put_sasl<T: Serialize>(out: &mut BytesMut, body: &T) -> Result<(), FrameError> {
    put_frame(out, FRAME_TYPE_SASL, 0, &serde_amqp::to_vec(body)?, &[]);
    Ok(())
}

pub fn put_performative(out: &mut BytesMut, channel: u16, performative: &Performative) -> Result<(), FrameError> {
    put_frame(out, FRAME_TYPE_AMQP, channel, &serde_amqp::to_vec(performative)?, &[]);
    Ok(())
}

pub fn put_empty(out: &mut BytesMut) {
    put_frame(out, FRAME_TYPE_AMQP, 0, &[], &[]);
}

/// Writes a transfer, split over several frames when the payload exceeds the
/// peer's max-frame-size.
pub fn put_transfer(
    out: &mut BytesMut,
    channel: u16,
    transfer: Transfer,
    payload: &[u8],
    max_frame_size: usize,
) -> Result<(), FrameError> {
    let handle = transfer.handle.clone();
    let first = serde_amqp::to_vec(&Performative::Transfer(transfer.clone()))?;
    if HEADER_LEN + first.len() + payload.len() <= max_frame_size {
        put_frame(out, FRAME_TYPE_AMQP, channel, &first, payload);
        return Ok(());
    }
    // The first frame carries every field; continuations only name the link.
    let head_len = serde_amqp::to_vec(&Performative::Transfer(Transfer {
        more: true,
        ..transfer.clone()
    }))?
    .len();
    let room = max_frame_size.saturating_sub(HEADER_LEN + head_len).max(1);
    let chunks: Vec<&[u8]> = payload.chunks(room).collect();
    for (index, chunk) in chunks.iter().enumerate() {
        let more = index + 1 < chunks.len();
        let performative = if index == 0 {
            Transfer {
                more,
                ..transfer.clone()
            }
        } else {
            Transfer {
                handle: handle.clone(),
                delivery_id: None,
                delivery_tag: None,
                message_format: None,
                settled: None,
                more,
                rcv_settle_mode: None,
                state: None,
                resume: false,
                aborted: false,
                batchable: false,
            }
        };
        let body = serde_amqp::to_vec(&Performative::Transfer(performative))?;
        put_frame(out, FRAME_TYPE_AMQP, channel, &body, chunk);
    }
    Ok(())
}
