//! `talkline serve --sip-listen` over TCP (on the UDP port) and `--sip-tls-listen` over TLS:
//! stream framing, a sipp call over TCP, and a whole call over TLS from a small rustls client
//! that trusts a certificate made here. And issue 11: a flood of OPTIONS from one address is
//! throttled while a call from another completes.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use talkline_tests::sip::{free_udp_port, http_get, metric, speech_8k, wait_for_sip, Guard};
use talkline_tests::{mulaw, start_server, talkline_bin, unmulaw};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// How long the servers here may take to load their models and answer OPTIONS.
const READY: Duration = Duration::from_secs(60);
const THROTTLED: &str = "talkline_sip_requests_throttled_total";

/// A TCP port that was free a moment ago.
fn free_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("bound").port()
}

/// A UDP port free for UDP and TCP both, for `--sip-listen`.
fn free_sip_port() -> u16 {
    loop {
        let port = free_udp_port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn rtp(sequence: u16, timestamp: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 0];
    p.extend_from_slice(&sequence.to_be_bytes());
    p.extend_from_slice(&timestamp.to_be_bytes());
    p.extend_from_slice(&0x5eed_0001u32.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn sdp(rtp_port: u16) -> String {
    format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {rtp_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n\
         a=rtpmap:101 telephone-event/8000\r\n"
    )
}

/// A request from us: `transport` is the Via token, `local` our address.
#[allow(clippy::too_many_arguments)]
fn request(
    method: &str,
    transport: &str,
    local: &str,
    server: &str,
    call_id: &str,
    cseq: u32,
    to_tag: Option<&str>,
    body: &str,
) -> String {
    let to = match to_tag {
        Some(tag) => format!("<sip:agent@{server}>;tag={tag}"),
        None => format!("<sip:agent@{server}>"),
    };
    let content_type = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/sdp\r\n"
    };
    let param = transport.to_ascii_lowercase();
    format!(
        "{method} sip:agent@{server} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {local};branch=z9hG4bK-{call_id}-{cseq}-{method}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:caller@{local}>;tag=caller\r\nTo: {to}\r\n\
         Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n\
         Contact: <sip:caller@{local};transport={param}>\r\n\
         {content_type}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A header's value in a message's text.
fn header<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// SIP messages off a stream, framed by Content-Length.
struct SipStream<S> {
    stream: S,
    buffer: Vec<u8>,
}

impl<S: Read + Write> SipStream<S> {
    fn new(stream: S) -> Self {
        Self {
            stream,
            buffer: Vec::new(),
        }
    }

    fn send(&mut self, message: &str) {
        self.stream.write_all(message.as_bytes()).expect("sent");
        self.stream.flush().expect("flushed");
    }

    /// The next message, or `None` when the stream ends or stays silent (its read timeout).
    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buffer[..end]).into_owned();
                let length: usize = header(&head, "Content-Length")
                    .and_then(|l| l.parse().ok())
                    .expect("the server frames its messages with Content-Length");
                if self.buffer.len() >= end + 4 + length {
                    let message: Vec<u8> = self.buffer.drain(..end + 4 + length).collect();
                    return Some(String::from_utf8_lossy(&message).into_owned());
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Messages until a final response to `method`, which is returned.
    fn final_response(&mut self, method: &str) -> String {
        while let Some(message) = self.next() {
            let cseq = header(&message, "CSeq").unwrap_or_default();
            let provisional = message.starts_with("SIP/2.0 1");
            if message.starts_with("SIP/2.0 ") && cseq.ends_with(method) && !provisional {
                return message;
            }
        }
        panic!("no final response to {method}");
    }
}

/// Plays `audio` (8 kHz) as PCMU RTP to `target` from `socket`, paced at 20 ms, while reading
/// the agent's RTP; returns the agent's samples and their RMS.
fn talk(socket: &UdpSocket, target: &str, audio: Vec<f32>) -> (usize, f64) {
    let sender_socket = socket.try_clone().expect("a second handle");
    let target = target.to_string();
    let frames = audio.len() / 160;
    let sender = std::thread::spawn(move || {
        let start = Instant::now();
        for (i, frame) in audio.chunks(160).enumerate() {
            let due = start + Duration::from_millis(20 * i as u64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let payload: Vec<u8> = frame.iter().map(|s| mulaw((s * 32767.0) as i16)).collect();
            let _ = sender_socket.send_to(&rtp(i as u16, 160 * i as u32, &payload), &target);
        }
    });
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout set");
    let (mut samples, mut energy) = (0usize, 0f64);
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_millis(20 * frames as u64);
    while Instant::now() < deadline {
        let Ok((n, _)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if n < 12 || buf[1] & 0x7F != 0 {
            continue;
        }
        for &b in &buf[12..n] {
            let x = unmulaw(b) as f64 / 32768.0;
            energy += x * x;
        }
        samples += n - 12;
    }
    sender.join().expect("the RTP sender finished");
    (samples, (energy / samples.max(1) as f64).sqrt())
}

/// The RTP port in a message's SDP.
fn media_port(message: &str) -> u16 {
    message
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no m=audio in\n{message}"))
}

/// The To tag of a response.
fn to_tag(message: &str) -> String {
    let to = header(message, "To").expect("a To header");
    to.split(";tag=")
        .nth(1)
        .expect("a To tag")
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn sip_over_tcp_frames_by_content_length_and_carries_a_sipp_call() {
    let port = free_sip_port();
    let sip = format!("127.0.0.1:{port}");
    let _server = start_server(&["--sip-listen", &sip]);
    wait_for_sip(&sip, READY);

    // OPTIONS over TCP, split over two writes: answered on the same connection.
    let tcp = TcpStream::connect(&sip).expect("SIP over TCP on the UDP port");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout set");
    let local = tcp.local_addr().expect("bound").to_string();
    let mut stream = SipStream::new(tcp);
    let options = request("OPTIONS", "TCP", &local, &sip, "tcp-options", 1, None, "");
    let (first, second) = options.split_at(40);
    stream.send(first);
    std::thread::sleep(Duration::from_millis(100));
    stream.send(second);
    let ok = stream.next().expect("an answer");
    assert!(ok.starts_with("SIP/2.0 200 OK\r\n"), "{ok}");
    assert!(ok.contains("Via: SIP/2.0/TCP "), "{ok}");
    // A keep-alive ping between messages gets its pong (RFC 5626).
    stream.send("\r\n\r\n");
    let mut pong = [0u8; 2];
    stream.stream.read_exact(&mut pong).expect("a pong");
    assert_eq!(&pong, b"\r\n");
    // Without Content-Length a stream cannot be framed: 400, then the connection closes.
    let unframed = request("OPTIONS", "TCP", &local, &sip, "tcp-nolength", 2, None, "")
        .replace("Content-Length: 0\r\n", "");
    stream.send(&unframed);
    let refused = stream.next().expect("an answer");
    assert!(
        refused.starts_with("SIP/2.0 400 Bad Request\r\n"),
        "{refused}"
    );
    assert_eq!(stream.next(), None, "the connection is closed");

    // sipp's own caller over TCP (-t t1: one connection): INVITE, 200, ACK, BYE, 200.
    let dir = tempfile::tempdir().expect("temp dir");
    let port_file = dir.path().join("rtp-port");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("sip/uac.xml");
    let mut command = Command::new("sipp");
    command
        .arg("-sf")
        .arg(&scenario)
        .args(["-t", "t1", "-m", "1", "-d", "2000"])
        .args(["-i", "127.0.0.1", "-mi", "127.0.0.1", "-nostdin"])
        .args(["-p", &free_tcp_port().to_string()])
        .args(["-timeout", "60s", "-timeout_error"])
        .arg("-set")
        .arg("port_file")
        .arg(&port_file)
        .arg(&sip)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut sipp = Guard::spawn(command, "sipp over TCP");
    let status = sipp.wait(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "sipp's call over TCP did not succeed: {status:?}"
    );
    assert!(port_file.exists(), "sipp never saw the 200 OK's SDP");
}

/// A self-signed certificate for `localhost` in `dir`: (cert path, key path, cert PEM).
fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a certificate");
    let cert_path = dir.join("sip.crt");
    let key_path = dir.join("sip.key");
    std::fs::write(&cert_path, cert.pem()).expect("written");
    std::fs::write(&key_path, key_pair.serialize_pem()).expect("written");
    (cert_path, key_path, cert.pem())
}

/// A TLS connection to `addr` that trusts `cert_pem` and nothing else.
fn tls_connect(addr: &str, cert_pem: &str) -> StreamOwned<ClientConnection, TcpStream> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(cert.expect("our own PEM")).expect("a root");
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").expect("a name");
    let connection = ClientConnection::new(Arc::new(config), name).expect("a TLS client");
    let tcp = TcpStream::connect(addr).expect("SIP over TLS listens");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout set");
    StreamOwned::new(connection, tcp)
}

#[test]
fn a_call_over_tls_gets_a_spoken_answer_and_ends_with_bye() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key, cert_pem) = self_signed(dir.path());
    let sip = format!("127.0.0.1:{}", free_sip_port());
    let tls_addr = format!("127.0.0.1:{}", free_tcp_port());
    let _server = start_server(&[
        "--max-tokens",
        "24",
        "--sip-listen",
        &sip,
        "--sip-tls-listen",
        &tls_addr,
        "--sip-tls-cert",
        cert.to_str().expect("a UTF-8 path"),
        "--sip-tls-key",
        key.to_str().expect("a UTF-8 path"),
    ]);
    wait_for_sip(&sip, READY);

    let tls = tls_connect(&tls_addr, &cert_pem);
    let local = tls.sock.local_addr().expect("bound").to_string();
    let mut stream = SipStream::new(tls);
    let media = UdpSocket::bind("127.0.0.1:0").expect("an RTP socket");
    let rtp_port = media.local_addr().expect("bound").port();
    let body = sdp(rtp_port);
    stream.send(&request(
        "INVITE", "TLS", &local, &tls_addr, "tls-call", 1, None, &body,
    ));
    let ok = stream.final_response("INVITE");
    assert!(ok.starts_with("SIP/2.0 200 OK\r\n"), "{ok}");
    let contact = header(&ok, "Contact").expect("a Contact");
    assert!(
        contact.contains(&format!("{tls_addr};transport=tls")),
        "in-dialog requests must come back over TLS: {contact}"
    );
    let tag = to_tag(&ok);
    let server_rtp = format!("127.0.0.1:{}", media_port(&ok));
    stream.send(&request(
        "ACK",
        "TLS",
        &local,
        &tls_addr,
        "tls-call",
        1,
        Some(&tag),
        "",
    ));

    let (samples, rms) = talk(
        &media,
        &server_rtp,
        speech_8k("Is my hemoglobin normal?", 0.5, 16.0),
    );
    assert!(samples >= 8_000, "only {samples} samples of agent audio");
    assert!(rms > 0.01, "agent audio is silent (rms {rms})");

    stream.send(&request(
        "BYE",
        "TLS",
        &local,
        &tls_addr,
        "tls-call",
        2,
        Some(&tag),
        "",
    ));
    let bye_ok = stream.final_response("BYE");
    assert!(bye_ok.starts_with("SIP/2.0 200 OK\r\n"), "{bye_ok}");
}

#[test]
fn a_bad_sip_tls_certificate_path_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing.crt");
    let sip = format!("127.0.0.1:{}", free_sip_port());
    let output = Command::new(talkline_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--sip-listen", &sip])
        .args(["--sip-tls-listen", "127.0.0.1:0", "--sip-tls-cert"])
        .arg(&missing)
        .arg("--sip-tls-key")
        .arg(&missing)
        .stdin(Stdio::null())
        .output()
        .expect("talkline runs");
    assert!(!output.status.success(), "started without its certificate");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("missing.crt") && stderr.contains("TLS"),
        "the error does not name the certificate:\n{stderr}"
    );
}

/// Issue 11: a per-IP SIP flood, e.g. 200 OPTIONS/s, is throttled while a legitimate call from
/// another address completes.
#[test]
fn issue_11_an_options_flood_from_one_address_is_throttled_while_a_call_completes() {
    let sip = format!("127.0.0.1:{}", free_sip_port());
    let server = start_server(&["--sip-listen", &sip]);
    wait_for_sip(&sip, READY);

    const FLOOD: usize = 600;
    let flooder = UdpSocket::bind("127.0.0.2:0").expect("a socket on 127.0.0.2 (Linux lo)");
    let flood_local = flooder.local_addr().expect("bound").to_string();
    let listener = flooder.try_clone().expect("a second handle");
    listener
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout set");
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let still_flooding = flooding.clone();
    let answers = std::thread::spawn(move || {
        let mut answered = 0usize;
        let mut buf = [0u8; 4096];
        let mut quiet_since = None;
        loop {
            match listener.recv_from(&mut buf) {
                Ok((n, _)) if buf[..n].starts_with(b"SIP/2.0 ") => answered += 1,
                _ => {}
            }
            if still_flooding.load(std::sync::atomic::Ordering::Relaxed) {
                continue;
            }
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(1) {
                return answered;
            }
        }
    });
    let target = sip.clone();
    let flood = std::thread::spawn(move || {
        let start = Instant::now();
        for i in 0..FLOOD {
            let due = start + Duration::from_millis(5 * i as u64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let options = request(
                "OPTIONS",
                "UDP",
                &flood_local,
                &target,
                &format!("flood-{i}"),
                1,
                None,
                "",
            );
            flooder.send_to(options.as_bytes(), &target).expect("sent");
        }
    });

    // Meanwhile, a call from 127.0.0.1: INVITE answered 200, ACK, BYE answered 200.
    std::thread::sleep(Duration::from_millis(500));
    let caller = UdpSocket::bind("127.0.0.1:0").expect("a caller socket");
    caller
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout set");
    let local = caller.local_addr().expect("bound").to_string();
    let media = UdpSocket::bind("127.0.0.1:0").expect("an RTP socket");
    let invite = request(
        "INVITE",
        "UDP",
        &local,
        &sip,
        "legit-call",
        1,
        None,
        &sdp(media.local_addr().expect("bound").port()),
    );
    let final_response = |method: &str, message: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 8192];
        caller.send_to(message.as_bytes(), &sip).expect("sent");
        while Instant::now() < deadline {
            let Ok((n, _)) = caller.recv_from(&mut buf) else {
                // UDP: retransmit, as a phone would (timers A and E).
                caller.send_to(message.as_bytes(), &sip).expect("sent");
                continue;
            };
            let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
            let cseq = header(&answer, "CSeq").unwrap_or_default();
            if cseq.ends_with(method) && !answer.starts_with("SIP/2.0 1") {
                return answer;
            }
        }
        panic!("no final answer to the call's {method} during the flood");
    };
    let ok = final_response("INVITE", &invite);
    assert!(ok.starts_with("SIP/2.0 200 OK\r\n"), "{ok}");
    let tag = to_tag(&ok);
    let ack = request("ACK", "UDP", &local, &sip, "legit-call", 1, Some(&tag), "");
    caller.send_to(ack.as_bytes(), &sip).expect("sent");
    std::thread::sleep(Duration::from_secs(1));
    let bye = request("BYE", "UDP", &local, &sip, "legit-call", 2, Some(&tag), "");
    let bye_ok = final_response("BYE", &bye);
    assert!(bye_ok.starts_with("SIP/2.0 200 OK\r\n"), "{bye_ok}");

    flood.join().expect("the flood was sent");
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let answered = answers.join().expect("the flood's answers were counted");
    assert!(
        answered > 0,
        "the flooder's first requests are still answered"
    );
    assert!(
        answered < FLOOD / 2,
        "{answered} of {FLOOD} flood requests were answered"
    );
    let metrics = http_get(&server.addr, "/metrics");
    let throttled = metric(&metrics, THROTTLED);
    assert!(
        throttled >= (FLOOD / 2) as f64,
        "{THROTTLED} is {throttled}:\n{metrics}"
    );
}

/// RFC 3261 section 18: when the caller's TCP connection has closed, our in-dialog request
/// (here the BYE of a media timeout) goes over a new connection to its Contact.
#[test]
fn a_bye_after_the_callers_tcp_connection_closed_reaches_its_contact() {
    let sip = format!("127.0.0.1:{}", free_sip_port());
    let _server = start_server(&["--sip-listen", &sip, "--sip-media-timeout", "1"]);
    wait_for_sip(&sip, READY);
    let contact = std::net::TcpListener::bind("127.0.0.1:0").expect("the caller's listener");
    let contact_addr = contact.local_addr().expect("bound").to_string();
    let tcp = TcpStream::connect(&sip).expect("SIP over TCP");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout set");
    let mut stream = SipStream::new(tcp);
    let media = UdpSocket::bind("127.0.0.1:0").expect("an RTP socket");
    let body = sdp(media.local_addr().expect("bound").port());
    // Via and Contact name the caller's listening address, as a phone's would.
    stream.send(&request(
        "INVITE",
        "TCP",
        &contact_addr,
        &sip,
        "reopen",
        1,
        None,
        &body,
    ));
    let ok = stream.final_response("INVITE");
    assert!(ok.starts_with("SIP/2.0 200 OK\r\n"), "{ok}");
    let tag = to_tag(&ok);
    stream.send(&request(
        "ACK",
        "TCP",
        &contact_addr,
        &sip,
        "reopen",
        1,
        Some(&tag),
        "",
    ));
    drop(stream);

    // No RTP from us: after the media timeout the server hangs up, over a new connection.
    contact.set_nonblocking(false).expect("blocking accept");
    let (incoming, _) = contact
        .accept()
        .expect("the server connects to our Contact");
    incoming
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout set");
    let mut incoming = SipStream::new(incoming);
    let bye = incoming.next().expect("a request");
    assert!(bye.starts_with("BYE sip:caller@"), "{bye}");
    assert!(bye.contains("Via: SIP/2.0/TCP "), "{bye}");
    // Our answer on the connection the BYE came on ends it.
    let via = header(&bye, "Via").expect("a Via");
    let mut answer = format!("SIP/2.0 200 OK\r\nVia: {via}\r\n");
    for name in ["From", "To", "Call-ID", "CSeq"] {
        answer += &format!("{name}: {}\r\n", header(&bye, name).expect("a header"));
    }
    answer += "Content-Length: 0\r\n\r\n";
    incoming.send(&answer);
}
