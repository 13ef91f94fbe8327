//! The SIP user agent on the real server, driven by a hand-built caller: the destination
//! allow-list (403, no toll fraud), digest authentication of callers that does not tell an
//! unknown user from a wrong password, the un-REGISTER a stopping server sends, and a call in
//! wideband Opus.

use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use talkline_tests::sip_caller::{free_udp_port, header, headers, param, status, Caller};
use talkline_tests::{espeak_16k, start_server, talkline_bin};

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A caller's `Authorization` for the SHA-256 challenge `challenge` (RFC 8760, qop=auth),
/// computed here independently of the server's code.
fn sha256_authorization(challenge: &str, user: &str, password: &str, uri: &str) -> String {
    let realm = param(challenge, "realm").expect("a realm");
    let nonce = param(challenge, "nonce").expect("a nonce");
    let ha1 = sha256_hex(&format!("{user}:{realm}:{password}"));
    let ha2 = sha256_hex(&format!("INVITE:{uri}"));
    let response = sha256_hex(&format!("{ha1}:{nonce}:00000001:c0ffee:auth:{ha2}"));
    format!(
        "Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", \
         response=\"{response}\", algorithm=SHA-256, qop=auth, nc=00000001, cnonce=\"c0ffee\""
    )
}

/// The server's answer with what differs per request blanked: tags, nonces, branch.
fn normalized(response: &str) -> String {
    response
        .lines()
        .map(|line| {
            let mut line = line.to_string();
            for marker in ["tag=", "nonce=\"", "branch="] {
                if let Some(start) = line.find(marker) {
                    let from = start + marker.len();
                    let end = line[from..]
                        .find(['"', ';', ',', '>'])
                        .map_or(line.len(), |e| from + e);
                    line.replace_range(from..end, "*");
                }
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn an_invite_off_the_allow_list_gets_403_and_a_transfer_target_off_it_stops_the_start() {
    let sip = format!("127.0.0.1:{}", free_udp_port());
    let _server = start_server(&["--sip-listen", &sip, "--sip-allow", "agent@*"]);
    let caller = Caller::new(&sip);

    let premium = format!("sip:0090123456@{sip}");
    caller.invite(&premium, "toll-1", 1, None);
    let refused = caller
        .final_response(Duration::from_secs(20))
        .expect("an answer to the INVITE");
    assert_eq!(status(&refused), 403, "{refused}");
    caller.ack(&premium, "toll-1", 1, &refused, true);

    let agent = format!("sip:agent@{sip}");
    caller.invite(&agent, "ok-1", 1, None);
    let answered = caller
        .final_response(Duration::from_secs(20))
        .expect("an answer to the INVITE");
    assert_eq!(status(&answered), 200, "{answered}");
    caller.ack(&agent, "ok-1", 1, &answered, false);
    let to = header(&answered, "To").expect("a To").to_string();
    caller.bye(&agent, "ok-1", 2, &to);
    let bye = caller
        .final_response(Duration::from_secs(5))
        .expect("an answer to the BYE");
    assert_eq!(status(&bye), 200, "{bye}");

    // The operator's own transfer target must be on the list too: refused at start-up.
    let out = Command::new(talkline_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--sip-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--sip-allow",
            "agent@*",
            "--sip-transfer-to",
            "sip:0090123@gw.example",
        ])
        .output()
        .expect("talkline runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--sip-allow"), "{stderr}");
    // And `talkline call` refuses before loading anything or sending a byte.
    let out = Command::new(talkline_bin())
        .args(["call", "sip:0090123@127.0.0.1:9", "--sip-allow", "nurse@*"])
        .output()
        .expect("talkline runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not on the --sip-allow list"), "{stderr}");
}

#[test]
fn callers_authenticate_and_an_unknown_user_looks_like_a_wrong_password() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let users = dir.path().join("callers");
    std::fs::write(&users, "# who may call\npatient:s3cret\n").expect("written");
    let sip = format!("127.0.0.1:{}", free_udp_port());
    let _server = start_server(&[
        "--sip-listen",
        &sip,
        "--sip-auth-users",
        users.to_str().expect("utf-8 path"),
    ]);
    let caller = Caller::new(&sip);
    let uri = format!("sip:agent@{sip}");

    caller.invite(&uri, "auth-1", 1, None);
    let challenge = caller
        .final_response(Duration::from_secs(20))
        .expect("a challenge");
    assert_eq!(status(&challenge), 401, "{challenge}");
    let offered = headers(&challenge, "WWW-Authenticate");
    assert_eq!(offered.len(), 2, "{challenge}");
    assert!(offered[0].contains("algorithm=SHA-256"), "{challenge}");
    assert!(offered[1].contains("algorithm=MD5"), "{challenge}");
    caller.ack(&uri, "auth-1", 1, &challenge, true);

    let unknown = sha256_authorization(offered[0], "mallory", "s3cret", &uri);
    caller.invite(&uri, "auth-1", 2, Some(&unknown));
    let to_unknown = caller
        .final_response(Duration::from_secs(5))
        .expect("an answer");
    caller.ack(&uri, "auth-1", 2, &to_unknown, true);
    let wrong = sha256_authorization(offered[0], "patient", "guess", &uri);
    caller.invite(&uri, "auth-1", 3, Some(&wrong));
    let to_wrong = caller
        .final_response(Duration::from_secs(5))
        .expect("an answer");
    caller.ack(&uri, "auth-1", 3, &to_wrong, true);
    assert_eq!(status(&to_unknown), 401);
    // Byte for byte the same but for tags, nonce and the CSeq number.
    assert_eq!(
        normalized(&to_unknown).replace("CSeq: 2", "CSeq: n"),
        normalized(&to_wrong).replace("CSeq: 3", "CSeq: n"),
    );

    let right = sha256_authorization(offered[0], "patient", "s3cret", &uri);
    caller.invite(&uri, "auth-1", 4, Some(&right));
    let answered = caller
        .final_response(Duration::from_secs(20))
        .expect("an answer");
    assert_eq!(status(&answered), 200, "{answered}");
    caller.ack(&uri, "auth-1", 4, &answered, false);
    let to = header(&answered, "To").expect("a To").to_string();
    caller.bye(&uri, "auth-1", 5, &to);
    let bye = caller
        .final_response(Duration::from_secs(5))
        .expect("a BYE answer");
    assert_eq!(status(&bye), 200, "{bye}");
}

/// A registrar of our own: answers the REGISTER 200, then expects the un-REGISTER (Expires: 0)
/// when the server is stopped, and the server to exit once it is answered.
#[test]
fn a_stopping_server_removes_its_registration() {
    let registrar = UdpSocket::bind("127.0.0.1:0").expect("a registrar socket");
    registrar
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout set");
    let aor = format!("sip:agent@{}", registrar.local_addr().expect("bound"));
    let sip = format!("127.0.0.1:{}", free_udp_port());
    let mut server = start_server(&["--sip-listen", &sip, "--sip-register", &aor]);

    let receive_register = |expires: &str| -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 8192];
        while Instant::now() < deadline {
            let Ok((n, from)) = registrar.recv_from(&mut buf) else {
                continue;
            };
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if !text.starts_with("REGISTER ") {
                continue;
            }
            let mut ok = String::from("SIP/2.0 200 OK\r\n");
            for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
                for value in headers(&text, name) {
                    ok += &format!("{name}: {value}\r\n");
                }
            }
            ok += "Content-Length: 0\r\n\r\n";
            registrar.send_to(ok.as_bytes(), from).expect("answered");
            if header(&text, "Expires") == Some(expires) {
                return true;
            }
        }
        false
    };
    assert!(receive_register("3600"), "no REGISTER for the binding");
    let exited = std::thread::scope(|scope| {
        let stopping = scope.spawn(|| server.interrupt(Duration::from_secs(15)));
        let removed = receive_register("0");
        (removed, stopping.join().expect("joined"))
    });
    assert!(exited.0, "no REGISTER with Expires: 0 at shutdown");
    assert!(exited.1.is_some(), "the server did not exit");
}

const OPUS_OFFER: &str =
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
    m=audio PORT RTP/AVP 0 96 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:96 opus/48000/2\r\n\
    a=fmtp:96 useinbandfec=1\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n";

/// A caller offering Opus beside PCMU gets Opus (wideband is what the recognizer wants), speaks
/// a question as 16 kHz Opus RTP and hears a spoken answer in Opus, on the 48 kHz RTP clock.
#[test]
fn a_call_offering_opus_is_answered_in_opus() {
    let sip = format!("127.0.0.1:{}", free_udp_port());
    let _server = start_server(&["--max-tokens", "24", "--sip-listen", &sip]);
    let caller = Caller::new(&sip);
    let rtp = UdpSocket::bind("127.0.0.1:0").expect("an RTP socket");
    let offer = OPUS_OFFER.replace("PORT", &rtp.local_addr().expect("bound").port().to_string());
    let uri = format!("sip:agent@{sip}");
    let local = caller.local();
    caller.send(&format!(
        "INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-opus-1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:patient@127.0.0.1>;tag=p1\r\nTo: <{uri}>\r\n\
         Call-ID: opus-1\r\nCSeq: 1 INVITE\r\nContact: <sip:patient@{local}>\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{offer}",
        offer.len()
    ));
    let answered = caller
        .final_response(Duration::from_secs(20))
        .expect("an answer to the INVITE");
    assert_eq!(status(&answered), 200, "{answered}");
    assert!(answered.contains("RTP/AVP 96 101\r\n"), "{answered}");
    assert!(answered.contains("a=rtpmap:96 opus/48000/2"), "{answered}");
    caller.ack(&uri, "opus-1", 1, &answered, false);
    let media_port: u16 = answered
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("a media port in the answer");

    // The question, 20 ms Opus frames at 16 kHz, then silence while the agent answers.
    let mut audio = vec![0.0f32; 8_000];
    audio.extend(espeak_16k("What is a normal blood pressure?"));
    let speech_end = audio.len();
    audio.extend(vec![0.0; 16_000 * 14]);
    let target = format!("127.0.0.1:{media_port}");
    let sender_socket = rtp.try_clone().expect("a second handle");
    let sender = std::thread::spawn(move || {
        let mut encoder = opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip)
            .expect("an Opus encoder");
        let mut payload = vec![0u8; 1_500];
        let start = Instant::now();
        for (i, frame) in audio.chunks_exact(320).enumerate() {
            let due = start + Duration::from_millis(20 * i as u64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let n = encoder.encode_float(frame, &mut payload).expect("encoded");
            let mut packet = vec![0x80, 96];
            packet.extend_from_slice(&(i as u16).to_be_bytes());
            packet.extend_from_slice(&(960 * i as u32).to_be_bytes());
            packet.extend_from_slice(&0x0badcafeu32.to_be_bytes());
            packet.extend_from_slice(&payload[..n]);
            let _ = sender_socket.send_to(&packet, &target);
        }
        start
    });

    rtp.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout set");
    let mut decoder = opus::Decoder::new(16_000, opus::Channels::Mono).expect("a decoder");
    let mut pcm = vec![0f32; 1_920];
    let (mut samples, mut energy) = (0usize, 0f64);
    let mut timestamps = Vec::new();
    let mut first_audible: Option<Instant> = None;
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(16);
    while Instant::now() < deadline {
        let Ok((n, _)) = rtp.recv_from(&mut buf) else {
            continue;
        };
        if n < 12 {
            continue;
        }
        assert_eq!(buf[1] & 0x7F, 96, "agent audio in another payload type");
        timestamps.push(u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]));
        let decoded = decoder
            .decode_float(&buf[12..n], &mut pcm, false)
            .expect("the agent's Opus decodes");
        let frame_energy: f64 = pcm[..decoded].iter().map(|&x| f64::from(x * x)).sum();
        if first_audible.is_none() && (frame_energy / decoded as f64).sqrt() > 0.01 {
            first_audible = Some(Instant::now());
        }
        energy += frame_energy;
        samples += decoded;
    }
    let started = sender.join().expect("the RTP sender finished");
    let to = header(&answered, "To").expect("a To").to_string();
    caller.bye(&uri, "opus-1", 2, &to);
    assert_eq!(
        caller
            .final_response(Duration::from_secs(5))
            .map(|r| status(&r)),
        Some(200)
    );

    assert!(samples >= 16_000, "only {samples} samples of agent audio");
    let rms = (energy / samples as f64).sqrt();
    assert!(rms > 0.01, "agent audio is silent (rms {rms})");
    // The answer follows the question: the agent heard it.
    let first = first_audible.expect("an audible agent frame");
    let question_over = started + Duration::from_secs_f64(speech_end as f64 / 16_000.0);
    assert!(
        first > question_over,
        "the agent spoke before the question ended"
    );
    // Opus on RTP counts a 48 kHz clock: 960 ticks per 20 ms packet within a reply.
    let steps: Vec<u32> = timestamps
        .windows(2)
        .map(|w| w[1].wrapping_sub(w[0]))
        .collect();
    let per_frame = steps.iter().filter(|&&d| d == 960).count();
    assert!(
        per_frame * 10 >= steps.len() * 9,
        "timestamp steps {steps:?}"
    );
}
