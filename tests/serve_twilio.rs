//! `talkline serve`'s Twilio Media Streams mode: a fake telephony provider sends a caller's
//! question as base64 μ-law at 8 kHz and gets the agent's spoken answer back the same way.

use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use talkline_tests::{espeak_16k, mulaw, start_server, unmulaw};
use tokio_tungstenite::tungstenite::Message;

#[test]
fn a_phone_call_gets_a_spoken_answer_in_mulaw() {
    let server = start_server(&["--max-tokens", "24"]);
    // 16 kHz speech down to 8 kHz by averaging pairs (espeak has little energy above 4 kHz).
    let speech16 = espeak_16k("Is my hemoglobin normal?");
    let mut audio8: Vec<f32> = vec![0.0; 4_000];
    audio8.extend(
        speech16
            .chunks(2)
            .map(|p| p.iter().sum::<f32>() / p.len() as f32),
    );
    // The caller stays on the line long enough to hear the whole (short) reply.
    audio8.extend(vec![0.0; 8_000 * 14]);
    let b64 = base64::engine::general_purpose::STANDARD;

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/twilio", server.addr))
            .await
            .expect("connects");
        let (mut tx, mut rx) = ws.split();
        tx.send(Message::Text(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#.into()))
            .await
            .unwrap();
        tx.send(Message::Text(
            r#"{"event":"start","sequenceNumber":"1","streamSid":"MZ1","start":{"streamSid":"MZ1","accountSid":"AC1","callSid":"CA1","tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}"#.into(),
        ))
        .await
        .unwrap();
        // Garbage in the middle of a call is ignored, not fatal.
        tx.send(Message::Text("{not json".into())).await.unwrap();
        let sender = tokio::spawn(async move {
            let b64 = base64::engine::general_purpose::STANDARD;
            let start = Instant::now();
            for (i, frame) in audio8.chunks(160).enumerate() {
                tokio::time::sleep_until((start + Duration::from_millis(20 * i as u64)).into()).await;
                let payload: Vec<u8> = frame.iter().map(|s| mulaw((s * 32767.0) as i16)).collect();
                let msg = format!(
                    r#"{{"event":"media","streamSid":"MZ1","media":{{"track":"inbound","chunk":"{i}","timestamp":"{}","payload":"{}"}}}}"#,
                    i * 20,
                    b64.encode(payload)
                );
                if tx.send(Message::Text(msg.into())).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Message::Text(r#"{"event":"stop","streamSid":"MZ1"}"#.into())).await;
        });
        let (mut samples, mut energy, mut marks) = (0usize, 0f64, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(Duration::from_secs(15), rx.next()).await else {
                break;
            };
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            assert_eq!(v["streamSid"], "MZ1", "{v}");
            match v["event"].as_str() {
                Some("media") => {
                    let bytes = b64.decode(v["media"]["payload"].as_str().unwrap()).unwrap();
                    assert_eq!(bytes.len(), 160, "20 ms of 8 kHz μ-law");
                    for b in bytes {
                        let x = unmulaw(b) as f64 / 32768.0;
                        energy += x * x;
                    }
                    samples += 160;
                }
                Some("mark") => {
                    marks += 1;
                    break;
                }
                _ => {}
            }
        }
        sender.abort();
        assert!(samples >= 4_000, "only {samples} samples of agent audio");
        assert!((energy / samples as f64).sqrt() > 0.01, "agent audio is silent");
        assert_eq!(marks, 1, "a mark after the reply");
    });
}
