//! `talkline serve --sip-listen`: a real SIP peer (Debian's sipp) calls the agent, the test
//! speaks a question into the call as PCMU RTP and hears the agent's answer back; broken SIP is
//! answered or dropped without harming the server.

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use talkline_tests::sip::free_udp_port;
use talkline_tests::{espeak_16k, mulaw, start_server, unmulaw};

fn rtp(payload_type: u8, sequence: u16, timestamp: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, payload_type];
    p.extend_from_slice(&sequence.to_be_bytes());
    p.extend_from_slice(&timestamp.to_be_bytes());
    p.extend_from_slice(&0x7a1c_0001u32.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// Sends `request` to the SIP server and returns the first line of its answer, if any.
fn ask(sip: &str, request: &str) -> Option<String> {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("a client socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout set");
    let local = socket.local_addr().expect("bound");
    let text = request.replace("LOCAL", &local.to_string());
    socket.send_to(text.as_bytes(), sip).expect("sent");
    let mut buf = [0u8; 4096];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    answer.lines().next().map(str::to_string)
}

const OPTIONS: &str =
    "OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP LOCAL;branch=z9hG4bK-o1\r\n\
    Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=1\r\nTo: <sip:agent@127.0.0.1>\r\n\
    Call-ID: options-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";

/// Waits for the SIP side to answer OPTIONS (it starts beside HTTP).
fn wait_for_sip(sip: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if ask(sip, OPTIONS).is_some() {
            return;
        }
    }
    panic!("the SIP listener at {sip} never answered OPTIONS");
}

/// Starts a sipp caller on `scenario` against `sip`; returns it and the server's RTP port, which
/// the scenario writes to `port_file` from the 200 OK's SDP.
// The child is returned to the caller, which waits for it; clippy cannot see past the return.
#[allow(clippy::zombie_processes)]
fn sipp_call(
    scenario: &Path,
    sip: &str,
    port_file: &Path,
    extra: &[&str],
) -> (std::process::Child, u16) {
    let mut sipp = Command::new("sipp")
        .arg("-sf")
        .arg(scenario)
        .args(["-m", "1", "-i", "127.0.0.1", "-mi", "127.0.0.1", "-nostdin"])
        .args(["-timeout", "90s", "-timeout_error"])
        .arg("-set")
        .arg("port_file")
        .arg(port_file)
        .args(extra)
        .arg(sip)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("sipp is installed (apt-get install sip-tester; scripts/install-deps does)");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(port) = std::fs::read_to_string(port_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return (sipp, port);
        }
        if Instant::now() >= deadline {
            let _ = sipp.kill();
            let _ = sipp.wait();
            panic!("sipp never got the 200 OK");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_sipp_call_gets_a_spoken_answer_over_rtp() {
    let sip_port = free_udp_port();
    let sip = format!("127.0.0.1:{sip_port}");
    let server = start_server(&["--max-tokens", "24", "--sip-listen", &sip]);
    wait_for_sip(&sip);
    let dir = tempfile::tempdir().expect("temp dir");
    let port_file = dir.path().join("rtp-port");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("sip/uac.xml");
    let (mut sipp, rtp_port) = sipp_call(&scenario, &sip, &port_file, &["-d", "22000"]);

    // The caller's question at 8 kHz (pairs averaged: espeak has little energy above 4 kHz),
    // then silence for as long as the agent answers.
    let speech16 = espeak_16k("Is my hemoglobin normal?");
    let mut audio8: Vec<f32> = vec![0.0; 4_000];
    audio8.extend(
        speech16
            .chunks(2)
            .map(|p| p.iter().sum::<f32>() / p.len() as f32),
    );
    audio8.extend(vec![0.0; 8_000 * 16]);
    let socket = UdpSocket::bind("127.0.0.1:0").expect("an RTP socket");
    let target = format!("127.0.0.1:{rtp_port}");
    let sender_socket = socket.try_clone().expect("a second handle");
    let sender = std::thread::spawn(move || {
        let start = Instant::now();
        for (i, frame) in audio8.chunks(160).enumerate() {
            let due = start + Duration::from_millis(20 * i as u64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let payload: Vec<u8> = frame.iter().map(|s| mulaw((s * 32767.0) as i16)).collect();
            let packet = rtp(0, 1_000u16.wrapping_add(i as u16), 160 * i as u32, &payload);
            let _ = sender_socket.send_to(&packet, &target);
            if i == 150 {
                // A DTMF key press (RFC 4733): the end packet three times.
                for _ in 0..3 {
                    let event = rtp(101, 60_000, 160 * i as u32, &[5, 0x8A, 3, 32]);
                    let _ = sender_socket.send_to(&event, &target);
                }
            }
        }
    });

    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout set");
    let (mut samples, mut energy) = (0usize, 0f64);
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(21);
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
    let status = wait_with_timeout(&mut sipp, Duration::from_secs(30));
    assert!(status, "sipp's call (INVITE, ACK, BYE) did not succeed");
    assert!(samples >= 8_000, "only {samples} samples of agent audio");
    let rms = (energy / samples as f64).sqrt();
    assert!(rms > 0.01, "agent audio is silent (rms {rms})");

    let metrics = http_get(&server.addr, "/metrics");
    assert!(
        metrics.contains("sip"),
        "no SIP session in /metrics:\n{metrics}"
    );
}

/// The lab-results agent hands a clinical question to a nurse: once its "I'll connect you with
/// a nurse" has played, the server REFERs the caller (sipp) to `--sip-transfer-to`, takes the
/// 202 and the NOTIFY saying the nurse answered, and hangs up with BYE.
#[test]
fn a_clinical_question_is_transferred_to_a_nurse_with_refer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (config, audit) = talkline_tests::lab_results_config(dir.path());
    let sip_port = free_udp_port();
    let sip = format!("127.0.0.1:{sip_port}");
    let config_arg = config.to_str().expect("a UTF-8 temp path");
    let transfer_to = "sip:nurse@127.0.0.1:5999";
    let _server = start_server(&[
        "--config",
        config_arg,
        "--sip-listen",
        &sip,
        "--sip-transfer-to",
        transfer_to,
    ]);
    wait_for_sip(&sip);
    let port_file = dir.path().join("rtp-port");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("sip/uac_transfer.xml");
    let (mut sipp, rtp_port) = sipp_call(&scenario, &sip, &port_file, &[]);

    // Silence until the greeting has played (agent RTP, then a pause in it), then the question,
    // then silence until sipp's scenario (REFER, NOTIFY, BYE) is over. Whisper tiny hears
    // espeak at 8 kHz imperfectly ("stop" may become "start"), so the question names its topic
    // twice and is asked again when no transfer has come within ASK_AGAIN_FRAMES.
    const ASK_AGAIN_FRAMES: usize = 15 * 50;
    let speech16 = espeak_16k("Should I stop taking my medication?");
    let question: Vec<f32> = speech16
        .chunks(2)
        .map(|p| p.iter().sum::<f32>() / p.len() as f32)
        .collect();
    let socket = UdpSocket::bind("127.0.0.1:0").expect("an RTP socket");
    socket.set_nonblocking(true).expect("non-blocking");
    let target = format!("127.0.0.1:{rtp_port}");
    let start = Instant::now();
    let deadline = start + Duration::from_secs(80);
    let (mut greeting_heard, mut last_agent_packet) = (false, start);
    let mut question_at: Option<usize> = None;
    let mut buf = [0u8; 2048];
    let mut finished = None;
    for i in 0usize.. {
        let due = start + Duration::from_millis(20 * i as u64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        while let Ok((n, _)) = socket.recv_from(&mut buf) {
            if n >= 12 {
                greeting_heard = true;
                last_agent_packet = Instant::now();
            }
        }
        let greeting_over =
            greeting_heard && last_agent_packet.elapsed() > Duration::from_millis(800);
        if question_at.is_none() && (greeting_over || start.elapsed() > Duration::from_secs(20)) {
            question_at = Some(i);
        }
        if question_at.is_some_and(|q| i - q >= ASK_AGAIN_FRAMES) {
            question_at = Some(i);
        }
        let frame: Vec<u8> = match question_at {
            Some(q) => {
                let from = (i - q) * 160;
                (0..160)
                    .map(|k| {
                        mulaw((question.get(from + k).copied().unwrap_or(0.0) * 32767.0) as i16)
                    })
                    .collect()
            }
            None => vec![mulaw(0); 160],
        };
        let packet = rtp(0, 3_000u16.wrapping_add(i as u16), 160 * i as u32, &frame);
        let _ = socket.send_to(&packet, &target);
        if i % 25 == 0 {
            if let Ok(Some(status)) = sipp.try_wait() {
                finished = Some(status.success());
                break;
            }
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let ok = match finished {
        Some(ok) => ok,
        None => wait_with_timeout(&mut sipp, Duration::from_secs(5)),
    };
    assert!(greeting_heard, "the agent's greeting never arrived as RTP");
    assert!(
        ok,
        "sipp's transfer (REFER 202, NOTIFY sipfrag 200, BYE) did not succeed"
    );
    let audit = std::fs::read_to_string(&audit).expect("an audit log");
    assert!(
        audit.contains("transfer"),
        "no transfer in the audit log: {audit}"
    );
}

/// `--sip-register`: sipp as the registrar challenges the first REGISTER (401, digest), checks
/// the answer against the password, and expects the refresh before the short binding lapses.
#[test]
fn the_server_registers_with_digest_auth_and_refreshes() {
    let registrar_port = free_udp_port();
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("sip/registrar.xml");
    let mut sipp = Command::new("sipp")
        .arg("-sf")
        .arg(&scenario)
        .args(["-m", "1", "-i", "127.0.0.1", "-nostdin"])
        .args(["-p", &registrar_port.to_string()])
        .args(["-timeout", "30s", "-timeout_error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("sipp is installed (apt-get install sip-tester; scripts/install-deps does)");
    // sipp binds its port before it reads; a REGISTER sent earlier is retransmitted anyway.
    std::thread::sleep(Duration::from_millis(300));
    let sip = format!("127.0.0.1:{}", free_udp_port());
    let aor = format!("sip:agent@127.0.0.1:{registrar_port}");
    let _server = start_server(&[
        "--sip-listen",
        &sip,
        "--sip-register",
        &aor,
        "--sip-password",
        "secret",
        "--sip-register-expires",
        "60",
    ]);
    assert!(
        wait_with_timeout(&mut sipp, Duration::from_secs(40)),
        "sipp's registrar did not see a valid digest answer and a refresh"
    );
}

fn wait_with_timeout(child: &mut std::process::Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("HTTP connects");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("sent");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("read");
    body
}

#[test]
fn malformed_sip_is_answered_or_dropped_and_a_full_server_says_503() {
    let sip_port = free_udp_port();
    let sip = format!("127.0.0.1:{sip_port}");
    let _server = start_server(&["--max-sessions", "0", "--sip-listen", &sip]);
    wait_for_sip(&sip);

    // Garbage is dropped: no answer.
    assert_eq!(ask(&sip, "\u{1}\u{2} this is not SIP \r\n\r\n"), None);
    // A request without Call-ID, From, To or CSeq is answered 400.
    let missing =
        "INVITE sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP LOCAL;branch=z9hG4bK-m1\r\n\
        Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(
        ask(&sip, missing).as_deref(),
        Some("SIP/2.0 400 Bad Request")
    );
    // An unknown method is answered 501.
    let unknown = OPTIONS
        .replace("OPTIONS sip:", "FROBNICATE sip:")
        .replace("1 OPTIONS", "1 FROBNICATE");
    assert_eq!(
        ask(&sip, &unknown).as_deref(),
        Some("SIP/2.0 501 Not Implemented")
    );
    // The server is still there.
    assert_eq!(ask(&sip, OPTIONS).as_deref(), Some("SIP/2.0 200 OK"));

    // No session slot: an INVITE gets 503 (after 100 Trying).
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
        m=audio 40000 RTP/AVP 0\r\n";
    let invite = format!(
        "INVITE sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP LOCAL;branch=z9hG4bK-i1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:patient@127.0.0.1>;tag=1\r\nTo: <sip:agent@127.0.0.1>\r\n\
         Call-ID: busy-1\r\nCSeq: 1 INVITE\r\nContact: <sip:patient@LOCAL>\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    let socket = UdpSocket::bind("127.0.0.1:0").expect("a client socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout set");
    let local = socket.local_addr().expect("bound").to_string();
    socket
        .send_to(invite.replace("LOCAL", &local).as_bytes(), &sip)
        .expect("sent");
    let mut buf = [0u8; 4096];
    let mut finals = Vec::new();
    while let Ok((n, _)) = socket.recv_from(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if !text.starts_with("SIP/2.0 100") {
            finals.push(text);
            break;
        }
    }
    let answer = finals.first().expect("a final answer to the INVITE");
    assert!(
        answer.starts_with("SIP/2.0 503 Service Unavailable"),
        "{answer}"
    );
    assert!(answer.contains("Retry-After: "), "{answer}");
}

/// `talkline call`: the assistant calls out. sipp answers as a plain UAS (INVITE, 200 with SDP,
/// ACK); it sends no RTP, so after the media timeout talkline hangs up with BYE, which sipp
/// must see and answer for its one call to count as a success.
#[test]
fn an_outbound_call_is_answered_by_sipp_and_ended_with_bye() {
    let port = free_udp_port();
    let mut sipp = Command::new("sipp")
        .args(["-sn", "uas", "-m", "1", "-i", "127.0.0.1", "-nostdin"])
        .args(["-p", &port.to_string()])
        .args(["-timeout", "60s", "-timeout_error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("sipp is installed (apt-get install sip-tester; scripts/install-deps does)");
    // A late-binding sipp only delays the call: the INVITE is retransmitted (timer A).
    let call = talkline_tests::talkline(
        &[
            "call",
            &format!("sip:patient@127.0.0.1:{port}"),
            "--media-timeout",
            "3",
            "--max-tokens",
            "8",
        ],
        &[],
    );
    let sipp_status = sipp.wait().expect("sipp ends");
    assert!(
        call.status.success(),
        "talkline call failed: {}",
        talkline_tests::stderr(&call)
    );
    assert!(
        sipp_status.success(),
        "sipp did not complete its call: {sipp_status}"
    );
}
