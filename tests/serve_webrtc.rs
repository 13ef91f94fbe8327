//! The WebRTC transport of `talkline serve`, driven by a webrtc-rs client peer: WHIP-style
//! signaling, Opus both ways over DTLS-SRTP, events on the data channel, hang-up by DELETE.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use talkline_tests::{espeak_16k, start_server, wer};
use tokio::sync::mpsc;
use webrtc::api::interceptor_registry::register_default_interceptors;
use webrtc::api::media_engine::{MediaEngine, MIME_TYPE_OPUS};
use webrtc::api::APIBuilder;
use webrtc::interceptor::registry::Registry;
use webrtc::media::Sample;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::rtp_transceiver::rtp_codec::RTCRtpCodecCapability;
use webrtc::track::track_local::track_local_static_sample::TrackLocalStaticSample;

const RATE: u32 = 48_000;

/// Agent audio as the client decoded it.
#[derive(Default)]
struct Heard {
    samples: usize,
    energy: f64,
}

impl Heard {
    fn rms(&self) -> f64 {
        (self.energy / self.samples.max(1) as f64).sqrt()
    }
}

struct Client {
    peer: Arc<RTCPeerConnection>,
    track: Arc<TrackLocalStaticSample>,
    events: mpsc::Receiver<serde_json::Value>,
    heard: Arc<Mutex<Heard>>,
    connected: mpsc::Receiver<()>,
}

async fn client() -> Client {
    let mut media = MediaEngine::default();
    media.register_default_codecs().unwrap();
    let registry = register_default_interceptors(Registry::new(), &mut media).unwrap();
    let api = APIBuilder::new()
        .with_media_engine(media)
        .with_interceptor_registry(registry)
        .build();
    let peer = Arc::new(
        api.new_peer_connection(RTCConfiguration::default())
            .await
            .unwrap(),
    );
    let track = Arc::new(TrackLocalStaticSample::new(
        RTCRtpCodecCapability {
            mime_type: MIME_TYPE_OPUS.to_owned(),
            ..Default::default()
        },
        "caller".to_owned(),
        "test".to_owned(),
    ));
    peer.add_track(track.clone()).await.unwrap();

    let (events_tx, events) = mpsc::channel(1_000);
    let data_channel = peer.create_data_channel("events", None).await.unwrap();
    data_channel.on_message(Box::new(move |msg| {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.data) {
            let _ = events_tx.try_send(v);
        }
        Box::pin(async {})
    }));

    let heard = Arc::new(Mutex::new(Heard::default()));
    let sink = heard.clone();
    peer.on_track(Box::new(move |remote, _, _| {
        let sink = sink.clone();
        tokio::spawn(async move {
            let mut decoder = opus::Decoder::new(RATE, opus::Channels::Mono).unwrap();
            let mut pcm = vec![0f32; 5_760];
            while let Ok((packet, _)) = remote.read_rtp().await {
                let Ok(n) = decoder.decode_float(&packet.payload, &mut pcm, false) else {
                    continue;
                };
                let mut heard = sink.lock().unwrap();
                heard.samples += n;
                heard.energy += pcm[..n].iter().map(|&s| (s as f64).powi(2)).sum::<f64>();
            }
        });
        Box::pin(async {})
    }));
    let (connected_tx, connected) = mpsc::channel(1);
    peer.on_peer_connection_state_change(Box::new(move |state| {
        if state == RTCPeerConnectionState::Connected {
            let _ = connected_tx.try_send(());
        }
        Box::pin(async {})
    }));
    Client {
        peer,
        track,
        events,
        heard,
        connected,
    }
}

/// Offers to the server; returns the call's URL.
async fn call(client: &Client, addr: &str) -> String {
    let offer = client.peer.create_offer(None).await.unwrap();
    let mut gathered = client.peer.gathering_complete_promise().await;
    client.peer.set_local_description(offer).await.unwrap();
    let _ = gathered.recv().await;
    let sdp = client.peer.local_description().await.unwrap().sdp;
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/webrtc/offer"))
        .header("Content-Type", "application/sdp")
        .body(sdp)
        .send()
        .await
        .expect("the offer is posted");
    assert_eq!(response.status().as_u16(), 201, "offer answered");
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/sdp"
    );
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let answer = response.text().await.unwrap();
    client
        .peer
        .set_remote_description(RTCSessionDescription::answer(answer).unwrap())
        .await
        .unwrap();
    location
}

/// Speaks `audio` (16 kHz) into the call in real time, Opus in 20 ms frames.
async fn speak(track: Arc<TrackLocalStaticSample>, audio: Vec<f32>) {
    let audio = talkline_tts::resample::resample(&audio, 16_000, RATE).unwrap();
    let mut encoder =
        opus::Encoder::new(RATE, opus::Channels::Mono, opus::Application::Voip).unwrap();
    let mut packet = vec![0u8; 1_500];
    let start = Instant::now();
    for (i, frame) in audio.chunks(960).enumerate() {
        let mut frame = frame.to_vec();
        frame.resize(960, 0.0);
        let n = encoder.encode_float(&frame, &mut packet).unwrap();
        tokio::time::sleep_until((start + Duration::from_millis(20 * i as u64)).into()).await;
        let sample = Sample {
            data: packet[..n].to_vec().into(),
            duration: Duration::from_millis(20),
            ..Default::default()
        };
        if track.write_sample(&sample).await.is_err() {
            break;
        }
    }
}

async fn active_sessions(addr: &str) -> u64 {
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("talkline_sessions_active "))
        .and_then(|v| v.trim().parse().ok())
        .expect("an active-sessions gauge")
}

#[test]
fn a_webrtc_caller_is_transcribed_and_hears_a_spoken_reply() {
    let server = start_server(&["--max-tokens", "24"]);
    // Not "hemoglobin": through Opus, tiny.en hears espeak-ng's "hemoglobin" as "human love in"
    // (it does so offline too, on the same round trip, with either Opus mode at 64 kbit/s).
    let question = "What is a normal blood pressure?";
    let mut audio = vec![0.0f32; 8_000];
    audio.extend(espeak_16k(question));
    audio.extend(vec![0.0f32; 16_000 * 6]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = client().await;
        let location = call(&client, &server.addr).await;
        assert!(location.starts_with("/webrtc/session/"), "{location}");
        tokio::time::timeout(Duration::from_secs(10), client.connected.recv())
            .await
            .expect("ICE and DTLS connect within 10 s");
        let speaker = tokio::spawn(speak(client.track.clone(), audio));

        let (mut final_text, mut turn) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while turn.is_none() && Instant::now() < deadline {
            let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_secs(20), client.events.recv()).await
            else {
                break;
            };
            match event["type"].as_str() {
                Some("final") => final_text = event["text"].as_str().map(str::to_owned),
                Some("turn") => turn = Some(event),
                _ => {}
            }
        }
        let final_text = final_text.expect("a final transcript on the data channel");
        assert!(wer(question, &final_text) <= 0.25, "{final_text:?}");
        let turn = turn.expect("a turn event on the data channel");
        assert!(
            !turn["agent_text"].as_str().unwrap_or("").trim().is_empty(),
            "{turn}"
        );
        assert!(turn["voice_to_voice_ms"].as_f64().is_some(), "{turn}");
        {
            let heard = client.heard.lock().unwrap();
            // The server streams silence between replies: the reply is in the energy.
            assert!(heard.samples > RATE as usize, "{} samples", heard.samples);
            assert!(
                heard.rms() > 0.005,
                "agent audio is silent: rms {}",
                heard.rms()
            );
        }
        speaker.abort();

        // Hanging up ends the session and frees its slot.
        let hang_up = reqwest::Client::new()
            .delete(format!("http://{}{location}", server.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(hang_up.status().as_u16(), 200);
        let gone = Instant::now() + Duration::from_secs(10);
        while active_sessions(&server.addr).await > 0 {
            assert!(Instant::now() < gone, "the session outlived its hang-up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let again = reqwest::Client::new()
            .delete(format!("http://{}{location}", server.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(again.status().as_u16(), 404, "a call hung up twice");
        client.peer.close().await.unwrap();
    });
}

#[test]
fn malformed_offers_get_400_with_a_reason_and_the_server_lives_on() {
    let server = start_server(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let url = format!("http://{}/webrtc/offer", server.addr);
        for (offer, reason) in [
            ("", "not valid SDP"),
            ("v=0\r\nthis is not sdp\r\n", "not valid SDP"),
            (
                "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n",
                "no audio",
            ),
            (
                // Audio but no ICE credentials or DTLS fingerprint: webrtc-rs refuses it.
                "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
                 m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:111 opus/48000/2\r\n\
                 m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n",
                "",
            ),
        ] {
            let response = http.post(&url).body(offer).send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            assert_eq!(status, 400, "{offer:?} -> {status} {body}");
            assert!(body.contains(reason) && body.trim().len() > 10, "{body:?}");
        }
        // An offer over the size limit (64 KiB) is refused unread.
        let huge = format!("v=0\r\n{}", "a=x-padding:0123456789abcdef\r\n".repeat(4096));
        let response = http.post(&url).body(huge).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 413);
        assert_eq!(active_sessions(&server.addr).await, 0, "refused offers hold no slot");
        let health = reqwest::get(format!("http://{}/healthz", server.addr))
            .await
            .unwrap();
        assert_eq!(health.status().as_u16(), 200);
    });
}
