//! SDP offers into the offer/answer negotiation. Round trip: our answer to an offer that
//! negotiates must itself negotiate to the same codec, telephone-event payload type and the
//! answering direction, or the peer would read our answer differently from what we chose.
#![no_main]
use libfuzzer_sys::fuzz_target;
use talkline_runtime::sip::sdp::{self, LocalMedia};

fuzz_target!(|data: &[u8]| {
    let Ok(remote) = sdp::negotiate(data) else {
        return;
    };
    let _ = remote.peer_receives();
    let local = LocalMedia {
        ip: "192.0.2.10".parse().expect("literal"),
        port: 40_000,
        version: 2,
        session_id: 1,
    };
    let answer = sdp::answer(&local, &remote);
    let back = sdp::negotiate(answer.as_bytes())
        .unwrap_or_else(|e| panic!("our answer does not negotiate ({e}):\n{answer}"));
    assert_eq!(back.codec, remote.codec);
    assert_eq!(back.dtmf, remote.dtmf);
    assert_eq!(back.direction, remote.direction.answer());
    assert_eq!(back.rtp, "192.0.2.10:40000".parse().expect("literal"));
});
