//! SIP datagrams into the message parser (rsip plus the lenient fallback). Round trip: a message
//! that parses is answered with `message::response`, and that answer must parse back with the
//! same transaction headers and route set; a peer could not match our answer to its request, or
//! route its ACK and BYE, otherwise.
#![no_main]
use libfuzzer_sys::fuzz_target;
use talkline_runtime::sip::{digest, message};

fuzz_target!(|data: &[u8]| {
    match message::parse(data) {
        Ok(m) => {
            let _ = (m.branch(), m.from_tag(), m.to_tag(), m.contact_uri());
            if let Some((_, challenge)) = &m.challenge {
                let _ = digest::parse_challenge(challenge);
            }
            if m.method().is_none() {
                return;
            }
            let answer = message::response(&m, 200, Some("fuzz"), &[], None);
            let back = message::parse(&answer).unwrap_or_else(|e| {
                panic!(
                    "our answer does not parse ({e:?}):\n{}",
                    String::from_utf8_lossy(&answer)
                )
            });
            assert_eq!(back.code(), Some(200));
            // One Via line may carry several values; ours writes each as it was received.
            let vias = |m: &message::Message| m.vias.join(",").replace(char::is_whitespace, "");
            assert_eq!(vias(&back), vias(&m));
            assert_eq!(back.branch(), m.branch());
            // A 2xx carries the request's Record-Route back: the caller's route set, which must
            // come back route for route or its ACK and BYE miss the proxies.
            assert_eq!(back.record_route, m.record_route);
            assert_eq!(back.from, m.from);
            assert_eq!(back.call_id, m.call_id);
            assert_eq!((back.cseq, &back.cseq_method), (m.cseq, &m.cseq_method));
        }
        Err(message::Malformed::Answer { code, partial }) => {
            assert!(
                [400, 406, 415, 416, 420, 501, 505].contains(&code),
                "unexpected answer code {code}"
            );
            let _ = message::response(&partial, code, None, &[], None);
        }
        Err(message::Malformed::Drop) => {}
    }
});
