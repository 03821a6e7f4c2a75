//! Framing: length-delimited frames tagged by their first byte (see the crate docs).

use bytes::{BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::MAX_FRAME_LEN;

const TAG_CONTROL: u8 = 0;
const TAG_STDOUT: u8 = 1;
const TAG_STDERR: u8 = 2;

/// One frame on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A JSON-encoded [`crate::Request`] or [`crate::Response`].
    Control(Bytes),
    Stdout(Bytes),
    Stderr(Bytes),
}

impl Frame {
    /// A control frame holding `msg` as JSON.
    pub fn control<T: Serialize>(msg: &T) -> Frame {
        Frame::Control(
            serde_json::to_vec(msg)
                .expect("protocol types always serialize")
                .into(),
        )
    }

    /// Decodes a control frame as `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ProtoError> {
        match self {
            Frame::Control(b) => serde_json::from_slice(b).map_err(ProtoError::Json),
            _ => Err(ProtoError::UnexpectedData),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Json(serde_json::Error),
    #[error("unknown frame type {0}")]
    UnknownTag(u8),
    #[error("empty frame")]
    Empty,
    #[error("expected a control message, got output data")]
    UnexpectedData,
}

/// Encoder/decoder of [`Frame`]s, enforcing [`MAX_FRAME_LEN`].
#[derive(Debug)]
pub struct FrameCodec {
    inner: LengthDelimitedCodec,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::with_max_len(MAX_FRAME_LEN)
    }
}

impl FrameCodec {
    /// A codec refusing frames over `max` bytes.
    pub fn with_max_len(max: usize) -> Self {
        FrameCodec {
            inner: LengthDelimitedCodec::builder()
                .max_frame_length(max)
                .new_codec(),
        }
    }

    /// Changes the limit (e.g. small until a peer has said hello).
    pub fn set_max_len(&mut self, max: usize) {
        self.inner.set_max_frame_length(max);
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        let Some(mut buf) = self.inner.decode(src)? else {
            return Ok(None);
        };
        if buf.is_empty() {
            return Err(ProtoError::Empty);
        }
        let tag = buf[0];
        let body = buf.split_off(1).freeze();
        match tag {
            TAG_CONTROL => Ok(Some(Frame::Control(body))),
            TAG_STDOUT => Ok(Some(Frame::Stdout(body))),
            TAG_STDERR => Ok(Some(Frame::Stderr(body))),
            other => Err(ProtoError::UnknownTag(other)),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = ProtoError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let (tag, body) = match frame {
            Frame::Control(b) => (TAG_CONTROL, b),
            Frame::Stdout(b) => (TAG_STDOUT, b),
            Frame::Stderr(b) => (TAG_STDERR, b),
        };
        let mut buf = BytesMut::with_capacity(body.len() + 1);
        buf.put_u8(tag);
        buf.extend_from_slice(&body);
        Ok(self.inner.encode(buf.freeze(), dst)?)
    }
}

/// Writes one frame to a blocking writer (same wire format as [`FrameCodec`]).
pub fn write_frame(w: &mut impl std::io::Write, frame: &Frame) -> std::io::Result<()> {
    let (tag, body) = match frame {
        Frame::Control(b) => (TAG_CONTROL, b),
        Frame::Stdout(b) => (TAG_STDOUT, b),
        Frame::Stderr(b) => (TAG_STDERR, b),
    };
    let mut buf = Vec::with_capacity(body.len() + 5);
    buf.extend_from_slice(&((body.len() + 1) as u32).to_be_bytes());
    buf.push(tag);
    buf.extend_from_slice(body);
    w.write_all(&buf)
}

/// Reads one frame from a blocking reader; `None` at a clean end of stream.
pub fn read_frame(r: &mut impl std::io::Read) -> std::io::Result<Option<Frame>> {
    use std::io::{Error, ErrorKind};
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME_LEN {
        return Err(Error::new(ErrorKind::InvalidData, "bad frame length"));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    let tag = buf[0];
    let body = Bytes::from(buf).slice(1..);
    Ok(Some(match tag {
        TAG_CONTROL => Frame::Control(body),
        TAG_STDOUT => Frame::Stdout(body),
        TAG_STDERR => Frame::Stderr(body),
        other => {
            return Err(Error::new(
                ErrorKind::InvalidData,
                format!("unknown frame type {other}"),
            ))
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, Response};

    fn roundtrip(frame: Frame) -> Frame {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        codec.encode(frame, &mut buf).unwrap();
        codec.decode(&mut buf).unwrap().unwrap()
    }

    #[test]
    fn control_and_data_frames_roundtrip() {
        let req = Request::Hello {
            protocol: 1,
            client: "t".into(),
        };
        assert_eq!(
            roundtrip(Frame::control(&req)).parse::<Request>().unwrap(),
            req
        );
        let data = Frame::Stderr(Bytes::from_static(b"\xff\x00raw"));
        assert_eq!(roundtrip(data.clone()), data);
        let resp = Response::Error {
            message: "x".into(),
        };
        assert_eq!(
            roundtrip(Frame::control(&resp))
                .parse::<Response>()
                .unwrap(),
            resp
        );
    }

    #[test]
    fn blocking_and_async_framing_agree() {
        let frames = [
            Frame::control(&Response::Notice {
                message: "n".into(),
            }),
            Frame::Stdout(Bytes::from_static(b"out")),
            Frame::Stderr(Bytes::from_static(b"")),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            write_frame(&mut wire, f).unwrap();
        }
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&wire[..]);
        for f in &frames {
            assert_eq!(&codec.decode(&mut buf).unwrap().unwrap(), f);
        }
        let mut r = &wire[..];
        for f in &frames {
            assert_eq!(&read_frame(&mut r).unwrap().unwrap(), f);
        }
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn oversized_frame_is_refused() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        buf.put_u32((MAX_FRAME_LEN + 1) as u32);
        buf.extend_from_slice(&[0u8; 16]);
        assert!(codec.decode(&mut buf).is_err());
    }

    #[test]
    fn unknown_tag_is_refused() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        buf.put_u32(2);
        buf.extend_from_slice(&[9, 1]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(ProtoError::UnknownTag(9))
        ));
    }
}
