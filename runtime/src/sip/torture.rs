//! SIP torture tests: every message of RFC 4475 (SIP Torture Test Messages) and RFC 5118 (IPv6
//! torture messages), byte for byte in `torture/*.dat`, through the path a received datagram
//! takes ([`Endpoint::handle_datagram`]). What each must get back is the RFC's answer for a UAS
//! that is not a registrar nor a proxy.

use std::net::SocketAddr;
use std::time::Instant;

use super::endpoint::{Endpoint, Event, LocalAddresses};
use super::message;

/// What the endpoint did with one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// One response was sent, with this status code.
    Code(u16),
    /// A new call was offered to the transport (after `100 Trying`).
    Incoming,
    /// Nothing was sent: a response without a transaction, or a datagram with nothing to route
    /// an answer along.
    Silent,
}

fn run(datagram: &[u8]) -> (Outcome, Vec<String>) {
    let local = LocalAddresses {
        sip: "127.0.0.1:5060".parse().expect("literal"),
        media_ip: "127.0.0.1".parse().expect("literal"),
    };
    let peer: SocketAddr = "192.0.2.1:5060".parse().expect("literal");
    let mut endpoint = Endpoint::new(local, 1);
    endpoint.handle_datagram(Instant::now(), peer, datagram);
    let mut codes = Vec::new();
    let mut sent = Vec::new();
    let mut incoming = false;
    while let Some(event) = endpoint.poll_event() {
        match event {
            Event::Send { data, .. } => {
                let text = String::from_utf8_lossy(&data).into_owned();
                // Answers copy the request's headers as they came (RFC 3261 section 8.2.6.2),
                // so only their status line is ours to check.
                let code = text
                    .strip_prefix("SIP/2.0 ")
                    .and_then(|t| t.get(..3))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or_else(|| panic!("not a response:\n{text}"));
                codes.push(code);
                sent.push(text);
            }
            Event::Incoming { .. } => incoming = true,
            other => panic!("unexpected event {other:?}"),
        }
    }
    let outcome = match (incoming, codes.as_slice()) {
        (true, [100]) => Outcome::Incoming,
        (true, _) => panic!("an incoming call answered {codes:?}"),
        (false, []) => Outcome::Silent,
        (false, [code]) => Outcome::Code(*code),
        (false, _) => panic!("one datagram answered {codes:?}"),
    };
    (outcome, sent)
}

use Outcome::{Code, Incoming, Silent};

macro_rules! dat {
    ($name:literal, $outcome:expr) => {
        (
            $name,
            include_bytes!(concat!("torture/", $name, ".dat")) as &[u8],
            $outcome,
        )
    };
}

/// The RFC's expected handling, for a UAS that is neither registrar nor proxy: valid requests
/// get their ordinary answer (REGISTER 405, an unknown dialog 481, an unknown method 501, an
/// offer without G.711 488), invalid ones the error the RFC names.
const CASES: &[(&str, &[u8], Outcome)] = &[
    // RFC 4475 3.1.1: valid messages. wsinv's To has a tag: a dialog we do not have.
    dat!("wsinv", Code(481)),
    dat!("intmeth", Code(501)),
    dat!("esc01", Incoming),
    dat!("escnull", Code(405)),
    dat!("esc02", Code(501)),
    dat!("lwsdisp", Code(200)),
    dat!("longreq", Incoming),
    // Octets after Content-Length are ignored: the REGISTER is answered, not the INVITE.
    dat!("dblreq", Code(405)),
    dat!("semiuri", Code(200)),
    dat!("transports", Code(200)),
    dat!("mpart01", Code(405)),
    dat!("unreason", Silent),
    dat!("noreason", Silent),
    // 3.1.2: invalid messages.
    dat!("badinv01", Code(400)),
    dat!("clerr", Code(400)),
    dat!("ncl", Code(400)),
    dat!("scalar02", Code(400)),
    dat!("scalarlg", Silent),
    dat!("quotbal", Code(400)),
    dat!("ltgtruri", Code(400)),
    dat!("lwsruri", Code(400)),
    dat!("lwsstart", Code(400)),
    dat!("trws", Code(400)),
    dat!("escruri", Code(400)),
    // The Date header is informational and we do not read it: the call is offered.
    dat!("baddate", Incoming),
    dat!("regbadct", Code(400)),
    dat!("badaspec", Code(400)),
    dat!("baddn", Code(400)),
    dat!("badvers", Code(505)),
    dat!("mismatch01", Code(400)),
    dat!("mismatch02", Code(400)),
    dat!("bigcode", Silent),
    // 3.2: transaction layer.
    dat!("badbranch", Code(200)),
    // 3.3: application layer.
    dat!("insuf", Code(400)),
    dat!("unkscm", Code(416)),
    dat!("novelsc", Code(416)),
    dat!("unksm2", Code(405)),
    dat!("bext01", Code(420)),
    dat!("invut", Code(415)),
    dat!("regaut01", Code(405)),
    dat!("multi01", Code(400)),
    dat!("mcl01", Code(400)),
    dat!("bcast", Silent),
    // Max-Forwards 0 stops proxies; an endpoint answers.
    dat!("zeromf", Code(200)),
    dat!("cparam01", Code(405)),
    dat!("cparam02", Code(405)),
    dat!("regescrt", Code(405)),
    dat!("sdp01", Code(406)),
    // 3.4: an RFC 2543 INVITE (no branch, no From tag, no Content-Length) is still served.
    dat!("inv2543", Incoming),
    // RFC 5118: IPv6.
    dat!("rfc5118-ipv6-good", Code(405)),
    dat!("rfc5118-ipv6-bad", Code(400)),
    dat!("rfc5118-port-ambiguous", Code(405)),
    dat!("rfc5118-port-unambiguous", Code(405)),
    dat!("rfc5118-via-received-param-with-delim", Code(200)),
    dat!("rfc5118-via-received-param-no-delim", Code(200)),
    // Its only audio codec is G.726.
    dat!("rfc5118-ipv6-in-sdp", Code(488)),
    dat!("rfc5118-mult-ip-in-header", Code(481)),
    dat!("rfc5118-mult-ip-in-sdp", Incoming),
    dat!("rfc5118-ipv4-mapped-ipv6", Code(488)),
    dat!("rfc5118-ipv6-reference-bug", Code(200)),
];

#[test]
fn torture_messages_get_the_rfc_answers() {
    let mut wrong = Vec::new();
    for (name, datagram, expected) in CASES {
        let (outcome, sent) = run(datagram);
        if outcome != *expected {
            wrong.push(format!(
                "{name}: expected {expected:?}, got {outcome:?}\n{sent:#?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn answers_carry_what_their_code_requires() {
    let find = |name: &str| CASES.iter().find(|c| c.0 == name).expect("a case").1;
    let (_, sent) = run(find("bext01"));
    assert!(sent[0].contains("\r\nUnsupported: nothingSupportsThis, nothingSupportsThisEither\r\n"));
    let (_, sent) = run(find("invut"));
    assert!(sent[0].contains("\r\nAccept: application/sdp\r\n"));
    // Valid messages are read as sent: folded, compact, escaped.
    let m = message::parse(find("wsinv")).expect("wsinv is valid");
    assert_eq!((m.cseq, m.cseq_method.as_str()), (9, "INVITE"));
    assert_eq!(m.vias.len(), 3);
    assert_eq!(m.branch(), Some("390skdjuw"));
    assert_eq!(m.to_tag(), Some("1918181833n"));
    assert_eq!(m.body.len(), 150);
    let m = message::parse(find("dblreq")).expect("dblreq's REGISTER is valid");
    assert!(m.body.is_empty());
}

#[test]
fn every_prefix_and_corruption_of_the_torture_messages_is_survived() {
    // Truncated at every length and with each byte flipped: answered or dropped, never a
    // panic, and never an answer to an ACK.
    for (_, datagram, _) in CASES {
        for end in 0..datagram.len() {
            let _ = run(&datagram[..end]);
        }
        let mut copy = datagram.to_vec();
        for i in (0..copy.len()).step_by(7) {
            copy[i] ^= 0x20;
            let _ = run(&copy);
            copy[i] ^= 0x20;
        }
    }
}
