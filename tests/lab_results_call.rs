//! The lab-results line as a real call: the real server with `kind = "lab-results"`, a
//! WebSocket caller who speaks (espeak-ng) and keys a PIN (DTMF), the real models throughout.
//! The caller is verified, hears a result from the record, and the audit log holds exactly that.
//! The question is about blood sugar, not hemoglobin: tiny.en hears espeak-ng's "hemoglobin" as
//! "human love in".

use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use talkline_tests::{espeak_16k, pcm16, start_server};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;

/// Speaks `text` in real time, then keeps the line open with silence until stopped.
async fn say(sink: &mut Sink, text: &str) {
    let mut audio = espeak_16k(text);
    audio.extend(vec![0.0f32; 16_000]);
    let start = Instant::now();
    for (i, frame) in audio.chunks(320).enumerate() {
        tokio::time::sleep_until((start + Duration::from_millis(20 * i as u64)).into()).await;
        sink.send(Message::Binary(pcm16(frame).into()))
            .await
            .unwrap();
    }
}

/// The agent's next finished turn: the words the caller heard.
async fn next_turn(turns: &mut tokio::sync::mpsc::Receiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(40), turns.recv())
        .await
        .expect("the agent answers within 40 s")
        .expect("the call is still up")
}

async fn silence(sink: &mut Sink) {
    let _ = sink.send(Message::Binary(pcm16(&[0.0; 320]).into())).await;
}

#[test]
fn a_caller_verifies_by_voice_and_keypad_and_hears_their_blood_sugar() {
    let dir = tempfile::tempdir().unwrap();
    let (config, audit) = talkline_tests::lab_results_config(dir.path());
    let server = start_server(&["--config", config.to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let agent_said: Vec<String> = rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
            .await
            .expect("connects");
        ws.send(Message::Text(
            r#"{"type":"hello","sample_rate":16000}"#.into(),
        ))
        .await
        .unwrap();
        let (mut sink, mut stream) = ws.split();
        // Silence keeps the media clock going; each step waits for the agent's turn to end.
        let (turn_tx, mut turns) = tokio::sync::mpsc::channel::<String>(16);
        let reader = tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Text(t) = msg {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "final" {
                        eprintln!("caller (as transcribed): {}", v["text"]);
                    }
                    if v["type"] == "turn" {
                        let _ = turn_tx
                            .send(v["agent_text"].as_str().unwrap_or("").to_owned())
                            .await;
                    }
                }
            }
        });
        let mut said = Vec::new();
        // The greeting plays while the line carries silence.
        let greeting = {
            let mut turn = Box::pin(next_turn(&mut turns));
            loop {
                tokio::select! {
                    t = &mut turn => break t,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                silence(&mut sink).await;
            }
        };
        said.push(greeting);
        say(
            &mut sink,
            "My date of birth is March fourth, nineteen sixty one.",
        )
        .await;
        said.push(next_turn(&mut turns).await);
        for digit in ["1", "2", "3", "4"] {
            sink.send(Message::Text(
                format!(r#"{{"type":"dtmf","digit":"{digit}"}}"#).into(),
            ))
            .await
            .unwrap();
        }
        said.push(next_turn(&mut turns).await);
        // tiny.en now and then garbles a word of espeak-ng's question ("What is my blood?
        // Shogher"); like a real caller, this one asks again, at most twice more.
        for _ in 0..3 {
            say(&mut sink, "What is my blood sugar?").await;
            let answer = next_turn(&mut turns).await;
            let heard_the_result = answer.contains("126");
            said.push(answer);
            if heard_the_result {
                break;
            }
        }
        let _ = sink.send(Message::Text(r#"{"type":"bye"}"#.into())).await;
        reader.abort();
        said
    });
    eprintln!("the agent said: {agent_said:#?}");
    assert!(
        agent_said[0].to_lowercase().contains("date of birth"),
        "{agent_said:?}"
    );
    assert!(
        agent_said[1].to_lowercase().contains("pin"),
        "not asked for the PIN: {agent_said:?}"
    );
    assert!(
        agent_said[2].to_lowercase().contains("verified"),
        "not verified: {agent_said:?}"
    );
    let result = agent_said.last().expect("an answer to the question");
    assert!(
        result.contains("126") && result.contains("above the normal range of 70 to 99"),
        "the glucose and its range from the record: {result:?}"
    );
    let audit = std::fs::read_to_string(&audit).expect("an audit log");
    let disclosures: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .filter(|e: &serde_json::Value| e["event"] == "disclosure")
        .collect();
    assert_eq!(disclosures.len(), 1, "{audit}");
    assert_eq!(disclosures[0]["patient_id"], "synthetic-ada");
    assert_eq!(
        disclosures[0]["result_ids"],
        serde_json::json!(["ada-glucose"])
    );
}

/// `talkline converse --agent lab-results`: a recorded call, date of birth and PIN spoken, runs
/// through the live session with the lab-results agent.
#[test]
fn converse_with_the_lab_results_agent_verifies_a_spoken_pin_and_reads_a_result() {
    let dir = tempfile::tempdir().unwrap();
    // The config selects lab-results too; `--agent` below says so again, as a user would.
    let (config, audit) = talkline_tests::lab_results_config(dir.path());
    // Gaps long enough for each prompt of the agent to play out before the caller answers.
    let clip = talkline_tests::spoken_clip(
        &[
            "My date of birth is March fourth, nineteen sixty one.",
            "one, two, three, four.",
            "What is my blood sugar?",
        ],
        9.0,
    );
    let input = dir.path().join("call.wav");
    talkline_tests::write_wav_16k(&input, &clip);
    let (output, events) = (dir.path().join("out.wav"), dir.path().join("turns.jsonl"));
    let run = talkline_tests::talkline(
        &[
            "--config",
            config.to_str().unwrap(),
            "converse",
            "--agent",
            "lab-results",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
        ],
        &[],
    );
    assert!(run.status.success(), "{}", talkline_tests::stderr(&run));
    let turns: Vec<serde_json::Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let said: Vec<String> = turns
        .iter()
        .map(|e| e["agent_text"].as_str().unwrap_or("").to_owned())
        .collect();
    // What was heard and when, so that a failure says whether ASR or the turn-taking missed.
    let heard: Vec<String> = turns
        .iter()
        .map(|e| format!("{} @ {} ms", e["user_text"], e["speech_end_ms"]))
        .collect();
    assert!(
        said.iter().any(|s| s.contains("verified")),
        "never verified: {said:#?}\nheard: {heard:#?}"
    );
    assert!(
        said.iter()
            .any(|s| s.contains("126") && s.contains("70 to 99")),
        "the glucose was not read: {said:#?}"
    );
    let audit = std::fs::read_to_string(&audit).expect("an audit log");
    assert!(audit.contains(r#""result_ids":["ada-glucose"]"#), "{audit}");
}
