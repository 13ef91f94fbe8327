//! Sequences of SIP datagrams into the sans-I/O endpoint, the path a received UDP datagram takes
//! (parse, transactions, dialogs, SDP offer/answer, digest challenges), interleaved with what
//! the transport does: accepting or rejecting calls, hanging up, transfers and time passing.
//!
//! Input: chunks separated by `\0@@\0`; a chunk's first byte picks the action, the rest is the
//! datagram (action 0-127) or ignored.
#![no_main]
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use talkline_runtime::sip::endpoint::{Endpoint, Event, LocalAddresses, RegisterConfig};

const SEPARATOR: &[u8] = b"\0@@\0";

fn chunks(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some(at) = data.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        out.push(&data[..at]);
        data = &data[at + SEPARATOR.len()..];
    }
    out.push(data);
    out
}

fuzz_target!(|data: &[u8]| {
    let local = LocalAddresses {
        sip: "127.0.0.1:5060".parse().expect("literal"),
        media_ip: "127.0.0.1".parse().expect("literal"),
    };
    let peer: SocketAddr = "127.0.0.1:5070".parse().expect("literal");
    let mut endpoint = Endpoint::new(local, 7);
    let mut now = Instant::now();
    let mut calls: Vec<String> = Vec::new();
    for chunk in chunks(data).into_iter().take(64) {
        let Some((&action, datagram)) = chunk.split_first() else {
            continue;
        };
        match action {
            0..=127 => endpoint.handle_datagram(now, peer, datagram),
            128..=143 => now += Duration::from_millis(250 << (action - 128).min(8)),
            144..=151 => {
                if let Some(id) = calls.first() {
                    endpoint.accept(now, id, 40_000)
                }
            }
            152..=159 => {
                if let Some(id) = calls.first() {
                    endpoint.reject(now, id, action & 1 == 0)
                }
            }
            160..=167 => {
                if let Some(id) = calls.first() {
                    endpoint.hang_up(now, id)
                }
            }
            168..=175 => {
                if let Some(id) = calls.first() {
                    endpoint.refer(now, id, "sip:nurse@127.0.0.1");
                }
            }
            176..=183 => {
                let id = endpoint.call(now, "sip:patient@127.0.0.1:5070", peer, 40_002);
                calls.push(id);
            }
            184..=191 => endpoint.register(
                now,
                RegisterConfig {
                    aor: "sip:agent@127.0.0.1:5070".into(),
                    registrar: peer,
                    username: "agent".into(),
                    password: "secret".into(),
                    expires: 300,
                },
            ),
            _ => {
                if let Some(deadline) = endpoint.poll_timeout() {
                    now = now.max(deadline);
                }
            }
        }
        endpoint.handle_timeout(now);
        while let Some(event) = endpoint.poll_event() {
            match event {
                Event::Incoming { call, .. } => calls.insert(0, call),
                Event::Ended { call, .. } => calls.retain(|c| *c != call),
                Event::Send { data, .. } => assert!(!data.is_empty()),
                Event::Answered { .. } | Event::MediaChanged { .. } => {}
            }
        }
    }
});
