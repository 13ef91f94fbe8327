//! Interoperability: a real softphone (Debian's baresip, headless) calls `talkline serve
//! --sip-listen` with a spoken question as its microphone, hears the agent's answer, and hangs
//! up; the server and the phone's own recording both show the conversation happened.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use talkline_tests::sip::{
    free_udp_port, metric, speech_8k, wait_for_metric, wait_for_sip, write_wav_8k, Guard,
    SESSIONS_ACTIVE, SIP_CALLS,
};
use talkline_tests::{read_wav_f32, start_server};

/// baresip's modules, as Debian's baresip-core installs them.
const BARESIP_MODULES: &str = "/usr/lib/baresip/modules";
/// Silence after the question: the agent hears the end of the turn, answers, and its answer
/// plays out before the file ends (baresip hangs up at the end of its audio source).
const TAIL_S: f32 = 14.0;
/// Far longer than the call (the question file lasts about 17 s): only a stuck call gets here.
const CALL_LIMIT: Duration = Duration::from_secs(50);

/// A baresip configuration in `dir` (its `-f` folder): UDP on 127.0.0.1:`sip_port`, G.711 only,
/// no sound card. The microphone is the `aufile` source playing `question` (8 kHz, what the
/// PCMU call samples at); the `sndfile` filter records what the phone hears into `recordings`.
/// The `menu` module runs the `-e` dial command and hangs up when the audio source ends.
fn baresip_config(dir: &Path, sip_port: u16, question: &Path, recordings: &Path) {
    let config = format!(
        "poll_method epoll\n\
         sip_listen 127.0.0.1:{sip_port}\n\
         net_interface 127.0.0.1\n\
         audio_source aufile,{question}\n\
         audio_player\n\
         audio_alert\n\
         module_path {BARESIP_MODULES}\n\
         module g711.so\n\
         module aufile.so\n\
         module sndfile.so\n\
         module_app account.so\n\
         module_app menu.so\n\
         snd_path {recordings}\n",
        question = question.display(),
        recordings = recordings.display(),
    );
    std::fs::write(dir.join("config"), config).expect("baresip's config is written");
    // One local account that never registers, offering PCMU only.
    std::fs::write(
        dir.join("accounts"),
        "<sip:caller@127.0.0.1>;regint=0;audio_codecs=PCMU\n",
    )
    .expect("baresip's accounts are written");
}

#[test]
fn baresip_calls_in_asks_a_question_and_hears_the_answer() {
    let sip = format!("127.0.0.1:{}", free_udp_port());
    let server = start_server(&["--max-tokens", "24", "--sip-listen", &sip]);
    wait_for_sip(&sip, Duration::from_secs(30));

    let dir = tempfile::tempdir().expect("temp dir");
    let (config_dir, home, recordings) = (
        dir.path().join("baresip"),
        dir.path().join("home"),
        dir.path().join("recordings"),
    );
    for d in [&config_dir, &home, &recordings] {
        std::fs::create_dir_all(d).expect("a folder for baresip");
    }
    let question = dir.path().join("question.wav");
    write_wav_8k(
        &question,
        &speech_8k("Is my hemoglobin normal?", 1.0, TAIL_S),
    );
    baresip_config(&config_dir, free_udp_port(), &question, &recordings);

    let log_path = dir.path().join("baresip.log");
    let log_file = std::fs::File::create(&log_path).expect("a log file");
    let mut command = Command::new("baresip");
    command
        .arg("-f")
        .arg(&config_dir)
        // baresip stays up after its call; this only bounds a run that goes wrong.
        .args(["-t", "60"])
        .args(["-e", &format!("/dial sip:agent@{sip}")])
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("a second log handle"))
        .stderr(log_file);
    let mut baresip = Guard::spawn(command, "baresip");
    // The call ends when the question file does: baresip hangs up and says so.
    let deadline = Instant::now() + CALL_LIMIT;
    let mut log = String::new();
    while Instant::now() < deadline && !log.contains("terminated") {
        std::thread::sleep(Duration::from_millis(200));
        log = std::fs::read_to_string(&log_path).unwrap_or_default();
    }
    baresip.stop();
    assert!(
        log.contains("Call established"),
        "baresip's call was not answered:\n{log}"
    );
    assert!(
        log.contains("terminated"),
        "baresip did not hang up within {CALL_LIMIT:?}:\n{log}"
    );

    // The server: one call, the caller's question heard and answered with audio, and the
    // session closed by baresip's BYE.
    let metrics = wait_for_metric(&server.addr, SESSIONS_ACTIVE, 0.0, Duration::from_secs(10));
    assert_eq!(metric(&metrics, SESSIONS_ACTIVE), 0.0, "{metrics}");
    assert_eq!(metric(&metrics, SIP_CALLS), 1.0, "{metrics}");
    let answered = metric(
        &metrics,
        "talkline_stage_latency_seconds_count{stage=\"voice_to_voice\"}",
    );
    assert!(
        answered >= 1.0,
        "no user turn was answered with audio:\n{metrics}"
    );

    // The phone: what it heard (the decoded PCMU) is the agent speaking, not silence.
    let heard = std::fs::read_dir(&recordings)
        .expect("the recordings folder")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("-dec.wav"))
        .unwrap_or_else(|| panic!("baresip recorded nothing it heard:\n{log}"));
    let samples = read_wav_f32(&heard);
    assert!(
        samples.len() >= 8_000,
        "baresip heard only {} samples of the agent",
        samples.len()
    );
    let rms = (samples.iter().map(|s| (s * s) as f64).sum::<f64>() / samples.len() as f64).sqrt();
    assert!(rms > 0.01, "what baresip heard is silent (rms {rms})");
}
