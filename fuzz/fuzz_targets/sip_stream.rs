//! Bytes from a SIP TCP/TLS connection into the stream framer, the path every read takes
//! (Content-Length framing, CRLF keep-alives, the size limit, the 400 for broken framing).
//!
//! Consistency: TCP may split a stream into reads anywhere, so the stream fed in one piece and
//! fed in the pieces the input chooses must give the same messages and the same end (broken
//! framing, too large, or bytes still waiting). Pongs are not compared: a run of CRLFs that
//! holds two pings gets one pong when it arrives in one read and two when split, which RFC 5626
//! clients (one ping, then wait for its pong) never notice.
//!
//! Input: the first byte is how many cuts (0-15), then two bytes per cut (little-endian, taken
//! modulo the stream's length + 1), then the stream. Seeds over 64 KiB (the limit) make
//! libFuzzer allow inputs that long.
#![no_main]
use libfuzzer_sys::fuzz_target;
use talkline_runtime::sip::endpoint::{Peer, Transport};
use talkline_runtime::sip::stream::{self, Framed, Framer, MAX_MESSAGE};

/// What a connection does with a stream: the messages, and how it ended.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    messages: Vec<Vec<u8>>,
    /// `BadLength` or `TooLarge`, with everything after it unread.
    end: Option<Framed>,
    /// Not yet framed when the stream ended, leading CRLFs aside (a keep-alive run split
    /// after its ping leaves its tail here).
    pending: Vec<u8>,
}

fn run(parts: &[&[u8]]) -> Outcome {
    let peer = Peer::new("127.0.0.1:5070".parse().expect("literal"), Transport::Tcp);
    let mut framer = Framer::new();
    let mut messages = Vec::new();
    for part in parts {
        framer.push(part);
        while let Some(framed) = framer.next() {
            match framed {
                Framed::Message(data) => {
                    assert!(
                        !data.is_empty() && data.len() <= MAX_MESSAGE,
                        "{}",
                        data.len()
                    );
                    assert!(
                        !matches!(data[0], b'\r' | b'\n'),
                        "a message starts with CRLF"
                    );
                    let _ = stream::reopen_target(&data, peer);
                    messages.push(data);
                }
                Framed::Ping => {}
                end @ (Framed::BadLength { .. } | Framed::TooLarge) => {
                    if let Framed::BadLength {
                        answer: Some(answer),
                    } = &end
                    {
                        assert!(answer.starts_with(b"SIP/2.0 400 "), "{answer:?}");
                    }
                    // As the connection does: nothing more is read.
                    assert_eq!(framer.next().as_ref(), Some(&end), "the end is sticky");
                    return Outcome {
                        messages,
                        end: Some(end),
                        pending: Vec::new(),
                    };
                }
            }
        }
    }
    let pending = framer.pending();
    let start = pending
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    // A connection never holds more than one message's worth of unframed bytes.
    assert!(pending.len() <= MAX_MESSAGE, "{} pending", pending.len());
    Outcome {
        messages,
        end: None,
        pending: pending[start..].to_vec(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 16);
    if rest.len() < 2 * count {
        return;
    }
    let (cuts, stream) = rest.split_at(2 * count);
    let mut at: Vec<usize> = cuts
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1))
        .collect();
    at.sort_unstable();
    let mut parts = Vec::new();
    let mut from = 0;
    for cut in at {
        parts.push(&stream[from..cut]);
        from = cut;
    }
    parts.push(&stream[from..]);

    let whole = run(&[stream]);
    let split = run(&parts);
    assert_eq!(split, whole, "cuts {parts:?}");
    // Byte-at-a-time is the worst split a peer can force; small inputs only, for speed.
    if stream.len() <= 256 {
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run(&bytes), whole, "one byte at a time");
    }
});
