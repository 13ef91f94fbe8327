//! SIP over TCP and TLS (RFC 3261 section 18.3): one task per connection frames messages by
//! Content-Length and hands them to the signalling loop, and writes what the loop sends back on
//! the connection. The framing is pure ([`frame`], and [`Framer`] which the connection task
//! drives), so it is unit-tested here and fuzzed (fuzz/fuzz_targets/sip_stream.rs).
//!
//! Limits: a message is at most [`MAX_MESSAGE`] octets (what a UDP datagram may be), at most
//! [`MAX_CONNECTIONS`] connections are open (TLS handshakes included), and a connection that
//! carries no call is closed after [`IDLE_TIMEOUT`] without traffic.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::endpoint::{Peer, Transport};
use super::message::{self, Malformed};

/// The largest message read from a stream: the reader's datagram limit. A stream that sends a
/// longer one is closed.
pub const MAX_MESSAGE: usize = message::MAX_DATAGRAM;
/// Connections open at once, inbound and outbound. Policy when full: a new inbound connection
/// is closed at once, and a request that needs a new outbound one is dropped (its transaction
/// times out).
pub const MAX_CONNECTIONS: usize = 256;
/// How long a connection may go without traffic before it is closed, unless a call in progress
/// uses it (its BYE must find it). Phones that keep a connection up ping with CRLF (RFC 5626).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a new outbound TCP connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages waiting to be written on one connection. Policy when full: the connection is
/// closed (a peer that does not read is broken or hostile); what was queued is lost, and
/// the transactions concerned time out.
pub const WRITE_QUEUE: usize = 32;
/// Messages and notices from every connection waiting for the signalling loop. Policy when
/// full: connection tasks wait, which stops their reading and so pushes back on the senders
/// through TCP flow control.
pub const INBOUND_QUEUE: usize = 256;

/// What a connection task tells the signalling loop. `id` tells a connection from a later
/// one from the same address.
#[derive(Debug)]
pub enum Inbound {
    Message {
        from: Peer,
        data: Vec<u8>,
    },
    /// No traffic for [`IDLE_TIMEOUT`]: the loop closes the connection unless a call uses it.
    Idle {
        from: Peer,
        id: u64,
    },
    Closed {
        from: Peer,
        id: u64,
    },
}

/// The signalling loop's end of one connection.
pub struct Connection {
    pub id: u64,
    pub writes: mpsc::Sender<Vec<u8>>,
}

/// What the start of a stream's buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// Not a whole message yet.
    Incomplete,
    /// `len` octets of CRLFs between messages; `ping` when they held a CRLFCRLF keep-alive,
    /// answered with one CRLF (RFC 5626 section 4.4.1).
    KeepAlive { len: usize, ping: bool },
    /// A whole message of `len` octets.
    Message { len: usize },
    /// Headers without a Content-Length (mandatory on streams, RFC 3261 section 18.3), or one
    /// that is not a number or comes twice: the headers end at `head`. The stream cannot be
    /// framed any more; answer 400 if possible, then close.
    BadLength { head: usize },
    /// Longer than [`MAX_MESSAGE`]: close.
    TooLarge,
}

/// Frames the first message of `buffer` by its Content-Length.
pub fn frame(buffer: &[u8]) -> Frame {
    let crlfs = buffer
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    if crlfs > 0 {
        if crlfs == buffer.len() && crlfs < 4 {
            // Perhaps the first half of a ping.
            return Frame::Incomplete;
        }
        let ping = find(&buffer[..crlfs], b"\r\n\r\n").is_some();
        return Frame::KeepAlive { len: crlfs, ping };
    }
    let Some(end) = find(buffer, b"\r\n\r\n") else {
        return if buffer.len() > MAX_MESSAGE {
            Frame::TooLarge
        } else {
            Frame::Incomplete
        };
    };
    let head = &buffer[..end];
    let mut lengths = head.split(|b| *b == b'\n').skip(1).filter_map(|line| {
        let line = std::str::from_utf8(line).ok()?;
        let (name, value) = line.split_once(':')?;
        let name = name.trim();
        (name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l"))
            .then(|| value.trim())
    });
    let length = match (lengths.next(), lengths.next()) {
        (Some(value), None) if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
            value.parse::<usize>().ok()
        }
        _ => None,
    };
    let Some(length) = length else {
        return Frame::BadLength { head: end + 4 };
    };
    let len = end + 4 + length;
    if len > MAX_MESSAGE {
        Frame::TooLarge
    } else if buffer.len() < len {
        Frame::Incomplete
    } else {
        Frame::Message { len }
    }
}

/// What a connection does next with what it has read, from a [`Framer`].
#[derive(Debug, PartialEq, Eq)]
pub enum Framed {
    /// Hand this message to the signalling loop.
    Message(Vec<u8>),
    /// A keep-alive ping: answer one CRLF.
    Ping,
    /// The framing is broken: write this 400 if there is one, then close.
    BadLength { answer: Option<Vec<u8>> },
    /// A message over [`MAX_MESSAGE`]: close.
    TooLarge,
}

/// The read side of one connection without the I/O: bytes in with [`push`](Self::push), what
/// to do out as an [`Iterator`]. Kept apart from [`serve`] so that a fuzzer can check that
/// how the bytes were split into reads never changes the messages.
#[derive(Debug, Default)]
pub struct Framer {
    buffer: Vec<u8>,
}

impl Framer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buffer.extend_from_slice(data);
    }

    /// What was read but not yet framed.
    pub fn pending(&self) -> &[u8] {
        &self.buffer
    }
}

/// Not fused: `None` means "until more is pushed", and the framer goes on after a push.
impl Iterator for Framer {
    type Item = Framed;

    /// The next thing to do. After `BadLength` or `TooLarge` the stream cannot be framed any
    /// more; those are returned again if asked.
    fn next(&mut self) -> Option<Framed> {
        loop {
            match frame(&self.buffer) {
                Frame::Incomplete => return None,
                Frame::KeepAlive { len, ping } => {
                    self.buffer.drain(..len);
                    if ping {
                        return Some(Framed::Ping);
                    }
                }
                Frame::Message { len } => {
                    return Some(Framed::Message(self.buffer.drain(..len).collect()))
                }
                Frame::BadLength { head } => {
                    return Some(Framed::BadLength {
                        answer: bad_request(&self.buffer[..head]),
                    })
                }
                Frame::TooLarge => return Some(Framed::TooLarge),
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The 400 for a request whose framing is broken, when its head says where to send it.
fn bad_request(head: &[u8]) -> Option<Vec<u8>> {
    match message::parse(head) {
        Ok(m) if m.method().is_some_and(|method| method != "ACK") => {
            Some(message::response(&m, 400, None, &[], None))
        }
        Err(Malformed::Answer { partial, .. }) => {
            Some(message::response(&partial, 400, None, &[], None))
        }
        _ => None,
    }
}

/// Where to open a new connection for `data` when the one to `peer` closed: a request goes to
/// its Request-URI's address (the peer's Contact, RFC 3261 section 12.2.1.1), a response to the
/// source address at the top Via's port (section 18.2.2). Only IP literals: names are not
/// resolved in the signalling loop.
pub fn reopen_target(data: &[u8], peer: Peer) -> Option<SocketAddr> {
    let text = std::str::from_utf8(data).ok()?;
    let start = text.lines().next()?;
    let default_port = match peer.transport {
        Transport::Tls => 5061,
        Transport::Udp | Transport::Tcp => 5060,
    };
    if start.starts_with("SIP/2.0 ") {
        let via = text
            .lines()
            .find_map(|l| l.strip_prefix("Via:").or_else(|| l.strip_prefix("v:")))?;
        let sent_by = via.split_whitespace().nth(1)?;
        let sent_by = sent_by.split([';', ',']).next()?;
        let port = host_port(sent_by, default_port)?.1;
        return Some(SocketAddr::new(peer.addr.ip(), port));
    }
    let uri = start.split_whitespace().nth(1)?;
    let rest = uri
        .strip_prefix("sip:")
        .or_else(|| uri.strip_prefix("sips:"))?;
    let host_port_text = rest.rsplit('@').next()?.split([';', '?']).next()?;
    let (host, port) = host_port(host_port_text, default_port)?;
    Some(SocketAddr::new(host.parse().ok()?, port))
}

/// `host[:port]` or `[v6][:port]`.
fn host_port(text: &str, default_port: u16) -> Option<(&str, u16)> {
    if let Some(v6) = text.strip_prefix('[') {
        let (host, rest) = v6.split_once(']')?;
        let port = match rest.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => default_port,
        };
        return Some((host, port));
    }
    match text.rsplit_once(':') {
        Some((host, port)) => Some((host, port.parse().ok()?)),
        None => Some((text, default_port)),
    }
}

/// Reads and writes one connection until it closes, the loop drops its [`Connection`], it
/// breaks the framing, or `cancel`.
#[allow(clippy::too_many_arguments)]
pub async fn serve<S>(
    stream: S,
    from: Peer,
    id: u64,
    mut writes: mpsc::Receiver<Vec<u8>>,
    inbound: mpsc::Sender<Inbound>,
    cancel: CancellationToken,
    _permit: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut framer = Framer::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut idle_at = Instant::now() + IDLE_TIMEOUT;
    'connection: loop {
        for framed in framer.by_ref() {
            match framed {
                Framed::Ping => {
                    if write(&mut writer, b"\r\n").await.is_err() {
                        break 'connection;
                    }
                }
                Framed::Message(data) => {
                    let message = Inbound::Message { from, data };
                    tokio::select! {
                        _ = cancel.cancelled() => break 'connection,
                        sent = inbound.send(message) => if sent.is_err() { break 'connection },
                    }
                }
                Framed::BadLength { answer } => {
                    tracing::info!(%from, "a SIP message without a usable Content-Length: closing");
                    if let Some(answer) = answer {
                        let _ = write(&mut writer, &answer).await;
                    }
                    break 'connection;
                }
                Framed::TooLarge => {
                    tracing::info!(%from, "a SIP message over {MAX_MESSAGE} octets: closing");
                    break 'connection;
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            read = reader.read(&mut chunk) => match read {
                Ok(0) => break,
                Ok(n) => {
                    framer.push(&chunk[..n]);
                    idle_at = Instant::now() + IDLE_TIMEOUT;
                }
                Err(e) => {
                    tracing::debug!(%from, "SIP stream read: {e}");
                    break;
                }
            },
            data = writes.recv() => match data {
                Some(data) => {
                    if let Err(e) = write(&mut writer, &data).await {
                        tracing::debug!(%from, "SIP stream write: {e}");
                        break;
                    }
                    idle_at = Instant::now() + IDLE_TIMEOUT;
                }
                // The loop closed the connection (idle, or shutting down).
                None => break,
            },
            _ = tokio::time::sleep_until(idle_at) => {
                idle_at = Instant::now() + IDLE_TIMEOUT;
                // The loop answers by dropping the connection or not; a full queue means the
                // loop is busy, and the next timeout asks again.
                let _ = inbound.try_send(Inbound::Idle { from, id });
            }
        }
    }
    let _ = writer.shutdown().await;
    let _ = inbound.send(Inbound::Closed { from, id }).await;
}

async fn write<W: AsyncWrite + Unpin>(writer: &mut W, data: &[u8]) -> std::io::Result<()> {
    writer.write_all(data).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTIONS: &str = "OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\n\
        Via: SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bK-1\r\nMax-Forwards: 70\r\n\
        From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:agent@127.0.0.1>\r\nCall-ID: x\r\n\
        CSeq: 1 OPTIONS\r\n";

    #[test]
    fn messages_are_framed_by_content_length_across_reads() {
        let message = format!("{OPTIONS}Content-Length: 4\r\n\r\nbody");
        let two = format!("{message}{message}");
        assert_eq!(frame(two.as_bytes()), Frame::Message { len: message.len() });
        for cut in [1, 10, message.len() - 5, message.len() - 1] {
            assert_eq!(
                frame(&message.as_bytes()[..cut]),
                Frame::Incomplete,
                "{cut}"
            );
        }
        let compact = format!("{OPTIONS}l: 0\r\n\r\n");
        assert_eq!(
            frame(compact.as_bytes()),
            Frame::Message { len: compact.len() }
        );
    }

    #[test]
    fn keep_alives_are_skipped_and_a_double_crlf_is_a_ping() {
        assert_eq!(frame(b"\r\n"), Frame::Incomplete);
        assert_eq!(frame(b"\r\n\r\n"), Frame::KeepAlive { len: 4, ping: true });
        let after = format!("\r\n{OPTIONS}Content-Length: 0\r\n\r\n");
        assert_eq!(
            frame(after.as_bytes()),
            Frame::KeepAlive {
                len: 2,
                ping: false
            }
        );
    }

    #[test]
    fn a_missing_or_doubled_content_length_is_answered_400_and_too_large_is_refused() {
        let missing = format!("{OPTIONS}\r\n");
        assert_eq!(
            frame(missing.as_bytes()),
            Frame::BadLength {
                head: missing.len()
            }
        );
        let answer = bad_request(missing.as_bytes()).expect("an answer");
        assert!(String::from_utf8_lossy(&answer).starts_with("SIP/2.0 400 Bad Request\r\n"));
        let doubled = format!("{OPTIONS}Content-Length: 0\r\nl: 0\r\n\r\n");
        assert!(matches!(frame(doubled.as_bytes()), Frame::BadLength { .. }));
        let signed = format!("{OPTIONS}Content-Length: -1\r\n\r\n");
        assert!(matches!(frame(signed.as_bytes()), Frame::BadLength { .. }));
        assert_eq!(bad_request(b"SIP/2.0 200 OK\r\n\r\n"), None);
        let huge = format!("{OPTIONS}Content-Length: {MAX_MESSAGE}\r\n\r\n");
        assert_eq!(frame(huge.as_bytes()), Frame::TooLarge);
        assert_eq!(frame(&vec![b'a'; MAX_MESSAGE + 1]), Frame::TooLarge);
        assert_eq!(frame(&vec![b'a'; MAX_MESSAGE]), Frame::Incomplete);
    }

    /// Two messages back to back with a ping between them give the same messages whatever
    /// reads they arrive in.
    #[test]
    fn the_framer_gives_the_same_messages_for_any_split_of_the_stream() {
        let message = format!("{OPTIONS}Content-Length: 4\r\n\r\nbody");
        let stream = format!("{message}\r\n\r\n{message}\r\n");
        let expected = vec![
            Framed::Message(message.clone().into_bytes()),
            Framed::Ping,
            Framed::Message(message.clone().into_bytes()),
        ];
        for cut in 0..=stream.len() {
            let mut framer = Framer::new();
            let mut out = Vec::new();
            for part in [&stream.as_bytes()[..cut], &stream.as_bytes()[cut..]] {
                framer.push(part);
                out.extend(&mut framer);
            }
            assert_eq!(out, expected, "cut at {cut}");
            assert_eq!(framer.pending(), b"\r\n", "cut at {cut}");
        }
        let mut broken = Framer::new();
        broken.push(format!("{OPTIONS}\r\n").as_bytes());
        assert!(matches!(
            broken.next(),
            Some(Framed::BadLength { answer: Some(_) })
        ));
    }

    #[test]
    fn a_closed_connection_is_reopened_to_the_contact_or_the_via_port() {
        let peer = Peer::new("192.0.2.5:40000".parse().expect("literal"), Transport::Tcp);
        let bye = b"BYE sip:patient@192.0.2.5:5070;transport=tcp SIP/2.0\r\nVia: x\r\n\r\n";
        assert_eq!(
            reopen_target(bye, peer),
            Some("192.0.2.5:5070".parse().expect("literal"))
        );
        let no_port = b"BYE sip:patient@192.0.2.9 SIP/2.0\r\n\r\n";
        assert_eq!(
            reopen_target(no_port, peer),
            Some("192.0.2.9:5060".parse().expect("literal"))
        );
        let ok = b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 10.0.0.1:5080;branch=z9hG4bK1\r\n\r\n";
        assert_eq!(
            reopen_target(ok, peer),
            Some("192.0.2.5:5080".parse().expect("literal")),
            "the source address, the Via's port"
        );
        let named = b"BYE sip:patient@phone.example:5070 SIP/2.0\r\n\r\n";
        assert_eq!(reopen_target(named, peer), None);
        let v6 = b"BYE sip:patient@[2001:db8::1]:5070 SIP/2.0\r\n\r\n";
        assert_eq!(
            reopen_target(v6, peer),
            Some("[2001:db8::1]:5070".parse().expect("literal"))
        );
    }
}
