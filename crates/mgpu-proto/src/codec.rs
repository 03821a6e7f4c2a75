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
        FrameCodec {
            inner: LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME_LEN)
                .new_codec(),
        }
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
