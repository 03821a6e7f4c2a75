//! Fuzzing of the frame decoder and of control-message parsing, on stable Rust with proptest.
//!
//! CI runs the default number of cases (a few seconds). A longer run:
//! `PROPTEST_CASES=200000 cargo test --release -p mgpu-proto --test fuzz_frames`.
//! Whatever bytes a peer sends, in whatever pieces they arrive: the decoder never panics, never
//! yields a frame over its bound, and decodes the same frames however the stream is split;
//! the blocking reader agrees with it; and parsing a control message as a request or a
//! supervisor-style message never panics.

use bytes::{BufMut, Bytes, BytesMut};
use mgpu_proto::{read_frame, Frame, FrameCodec, Request, Response};
use proptest::prelude::*;
use serde_json::{json, Value};
use tokio_util::codec::{Decoder, Encoder};

/// Feeds `bytes` to a decoder in pieces of the given sizes (cycled); returns the frames
/// decoded before the first error, and whether an error ended the stream.
fn decode_in_pieces(max: usize, bytes: &[u8], pieces: &[usize]) -> (Vec<Frame>, bool) {
    let mut codec = FrameCodec::with_max_len(max);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < bytes.len() {
        let n = pieces[i % pieces.len()].max(1).min(bytes.len() - at);
        i += 1;
        buf.extend_from_slice(&bytes[at..at + n]);
        at += n;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => {
                    let len = match &f {
                        Frame::Control(b) | Frame::Stdout(b) | Frame::Stderr(b) => b.len(),
                    };
                    assert!(len < max, "a frame of {len} bytes passed a bound of {max}");
                    frames.push(f);
                }
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
    }
    (frames, false)
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    (0u8..3, proptest::collection::vec(any::<u8>(), 0..600)).prop_map(|(tag, body)| {
        let body = Bytes::from(body);
        match tag {
            0 => Frame::Control(body),
            1 => Frame::Stdout(body),
            _ => Frame::Stderr(body),
        }
    })
}

/// Arbitrary JSON, nested a few levels.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    ".{0,12}",
                    Just("type".to_string()),
                    Just("job".to_string()),
                    Just("command".to_string()),
                    Just("gpus".to_string()),
                    Just("array".to_string()),
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Valid requests of every kind, as JSON: mutations of these reach deep into the parser.
fn request_templates() -> Vec<Value> {
    vec![
        json!({"type": "hello", "protocol": mgpu_proto::PROTOCOL_VERSION, "client": "fuzz"}),
        json!({"type": "submit", "name": "j", "gpus": 1, "mem_mib": 1024, "time_limit_s": 60,
               "command": ["true"], "cwd": "/", "env": [["A", "b"]], "venv": "auto",
               "attach": false, "umask": 18, "no_requeue": false, "max_restarts": 3,
               "nice": 0, "array": [0, 1, 2], "array_limit": 2}),
        json!({"type": "queue", "user": null, "me": false, "job": null}),
        json!({"type": "cancel", "jobs": [1, 2]}),
        json!({"type": "cancel", "array": 5}),
        json!({"type": "cancel", "user": "alice"}),
        json!({"type": "cancel", "all": null}),
        json!({"type": "log", "job": 1, "follow": true}),
        json!({"type": "attach", "job": 1, "log_offset": 0}),
        json!({"type": "acct", "user": null, "me": true, "job": null, "since": 0, "state": "COMPLETED"}),
        json!({"type": "cancel_attached"}),
    ]
}

/// Replaces one value somewhere in `v` (chosen by `path`) with `with`.
fn mutate(v: &mut Value, path: &[usize], with: Value) {
    let Some((&step, rest)) = path.split_first() else {
        *v = with;
        return;
    };
    match v {
        Value::Object(m) if !m.is_empty() => {
            let key = m.keys().nth(step % m.len()).cloned().unwrap();
            mutate(m.get_mut(&key).unwrap(), rest, with);
        }
        Value::Array(a) if !a.is_empty() => {
            let n = a.len();
            mutate(&mut a[step % n], rest, with);
        }
        _ => *v = with,
    }
}

proptest! {
    /// Arbitrary bytes in arbitrary pieces: no panic, no frame over the bound.
    #[test]
    fn decoder_survives_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        pieces in proptest::collection::vec(1usize..300, 1..8),
        max in prop_oneof![Just(16usize), Just(1024), Just(64 * 1024)],
    ) {
        decode_in_pieces(max, &bytes, &pieces);
    }

    /// Length headers that announce huge or tiny frames, followed by garbage.
    #[test]
    fn decoder_survives_hostile_headers(
        len in prop_oneof![Just(0u32), Just(1), Just(u32::MAX), Just(8 << 20), any::<u32>()],
        tag in any::<u8>(),
        rest in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = BytesMut::new();
        bytes.put_u32(len);
        bytes.put_u8(tag);
        bytes.extend_from_slice(&rest);
        let (frames, _) = decode_in_pieces(64 * 1024, &bytes, &[7]);
        prop_assert!(frames.len() <= 1 + rest.len() / 5);
    }

    /// Valid frames decode to themselves however the stream is cut, and the blocking reader
    /// reads the same frames.
    #[test]
    fn chunking_does_not_change_frames(
        frames in proptest::collection::vec(arb_frame(), 0..12),
        pieces in proptest::collection::vec(1usize..200, 1..6),
    ) {
        let mut codec = FrameCodec::default();
        let mut wire = BytesMut::new();
        for f in &frames {
            codec.encode(f.clone(), &mut wire).unwrap();
        }
        let (got, failed) = decode_in_pieces(mgpu_proto::MAX_FRAME_LEN, &wire, &pieces);
        prop_assert!(!failed);
        prop_assert_eq!(&got, &frames);
        let mut reader = &wire[..];
        let mut blocking = Vec::new();
        while let Some(f) = read_frame(&mut reader).unwrap() {
            blocking.push(f);
        }
        prop_assert_eq!(&blocking, &frames);
    }

    /// Arbitrary JSON and mutated valid requests parse to a request or to an error, never a
    /// panic; what parses survives a round trip.
    #[test]
    fn control_messages_parse_or_fail_cleanly(
        which in 0usize..11,
        path in proptest::collection::vec(any::<usize>(), 0..4),
        with in arb_json(),
        raw in arb_json(),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut v = request_templates()[which].clone();
        mutate(&mut v, &path, with);
        for body in [
            serde_json::to_vec(&v).unwrap(),
            serde_json::to_vec(&raw).unwrap(),
            garbage.clone(),
        ] {
            let frame = Frame::Control(Bytes::from(body));
            if let Ok(req) = frame.parse::<Request>() {
                let again: Request = Frame::control(&req).parse().unwrap();
                prop_assert_eq!(again, req);
            }
            let _ = frame.parse::<Response>();
        }
    }
}

/// Every template is a valid request as written (so mutations start from real messages).
#[test]
fn templates_are_valid_requests() {
    for t in request_templates() {
        let frame = Frame::control(&t);
        frame
            .parse::<Request>()
            .unwrap_or_else(|e| panic!("{t}: {e}"));
    }
}
