//! A hand-built SIP caller over UDP for the tests that need to see every byte: INVITE with any
//! offer and headers, ACK, BYE, and the answers as text.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

pub use crate::sip::free_udp_port;

pub const OFFER: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
    m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n";

/// A caller's signalling socket.
pub struct Caller {
    pub socket: UdpSocket,
    pub server: String,
}

impl Caller {
    pub fn new(server: &str) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("a client socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout set");
        Self {
            socket,
            server: server.to_string(),
        }
    }

    pub fn local(&self) -> String {
        self.socket.local_addr().expect("bound").to_string()
    }

    pub fn send(&self, text: &str) {
        self.socket
            .send_to(text.as_bytes(), &self.server)
            .expect("sent");
    }

    /// The next final response (>= 200) within `timeout`, skipping provisional ones.
    pub fn final_response(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 8192];
        while Instant::now() < deadline {
            let Ok((n, _)) = self.socket.recv_from(&mut buf) else {
                continue;
            };
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let code: u16 = text
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            if text.starts_with("SIP/2.0") && code >= 200 {
                return Some(text);
            }
        }
        None
    }

    /// The next request the server sends us (a BYE at the media timeout), answered 200.
    pub fn answer_next_request(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 8192];
        while Instant::now() < deadline {
            let Ok((n, from)) = self.socket.recv_from(&mut buf) else {
                continue;
            };
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if text.starts_with("SIP/2.0") {
                continue;
            }
            let mut ok = String::from("SIP/2.0 200 OK\r\n");
            for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
                for value in headers(&text, name) {
                    ok += &format!("{name}: {value}\r\n");
                }
            }
            ok += "Content-Length: 0\r\n\r\n";
            let _ = self.socket.send_to(ok.as_bytes(), from);
            return Some(text);
        }
        None
    }

    pub fn invite(&self, uri: &str, call_id: &str, cseq: u32, authorization: Option<&str>) {
        let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        let local = self.local();
        self.send(&format!(
            "INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-{call_id}-{cseq}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:patient@127.0.0.1>;tag=p1\r\nTo: <{uri}>\r\n\
             Call-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\nContact: <sip:patient@{local}>\r\n\
             {auth}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{OFFER}",
            OFFER.len()
        ));
    }

    /// ACK for a final response `answer` to the INVITE `cseq` (its To, with the tag).
    pub fn ack(&self, uri: &str, call_id: &str, cseq: u32, answer: &str, branch_of_invite: bool) {
        let to = header(answer, "To").unwrap_or_default();
        let local = self.local();
        // A non-2xx ACK reuses the INVITE's branch; a 2xx ACK is a new transaction.
        let branch = if branch_of_invite {
            format!("z9hG4bK-{call_id}-{cseq}")
        } else {
            format!("z9hG4bK-{call_id}-ack{cseq}")
        };
        self.send(&format!(
            "ACK {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={branch}\r\nMax-Forwards: 70\r\n\
             From: <sip:patient@127.0.0.1>;tag=p1\r\nTo: {to}\r\nCall-ID: {call_id}\r\n\
             CSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n"
        ));
    }

    pub fn bye(&self, uri: &str, call_id: &str, cseq: u32, to: &str) {
        let local = self.local();
        self.send(&format!(
            "BYE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-{call_id}-bye\r\n\
             Max-Forwards: 70\r\nFrom: <sip:patient@127.0.0.1>;tag=p1\r\nTo: {to}\r\n\
             Call-ID: {call_id}\r\nCSeq: {cseq} BYE\r\nContent-Length: 0\r\n\r\n"
        ));
    }
}

pub fn status(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

pub fn header<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

pub fn headers<'a>(message: &'a str, name: &str) -> Vec<&'a str> {
    message
        .lines()
        .filter_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .collect()
}

pub fn param(value: &str, name: &str) -> Option<String> {
    value.split(',').find_map(|part| {
        let (n, v) = part.split_once('=')?;
        let n = n.trim().trim_start_matches("Digest").trim();
        n.eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"').to_string())
    })
}
