//! `talkline models` and `talkline config check`, driven through the real binary against a
//! private cache folder and the real package index.

use std::fs;
use std::path::Path;

use talkline_tests::{stderr, stdout, talkline};

const SMALL_MODEL: &str = "silero-vad";
const SMALL_FILE: &str = "silero-vad/silero_vad.onnx";
const SMALL_WHEEL: &str = "wheels/silero_vad-6.2.3-py3-none-any.whl";

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 0xff;
    fs::write(path, bytes).unwrap();
}

#[test]
fn fetch_from_scratch_is_idempotent_and_repairs_corruption() {
    let cache = tempfile::tempdir().unwrap();
    let env = [("TALKLINE_MODELS", cache.path())];
    let fetch = ["models", "fetch", "--only", SMALL_MODEL];

    let first = talkline(&fetch, &env);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        stdout(&first).contains("wheel downloaded"),
        "{}",
        stdout(&first)
    );
    assert!(cache.path().join(SMALL_FILE).is_file());

    let second = talkline(&fetch, &env);
    assert!(second.status.success());
    assert!(
        stdout(&second).contains("silero-vad: already up to date"),
        "{}",
        stdout(&second)
    );
    assert!(!stderr(&second).contains("downloading"));

    // A corrupted file fails `verify`, naming the file and the repair command...
    flip_byte(&cache.path().join(SMALL_FILE), 1000);
    let verify = talkline(&["models", "verify", "--only", SMALL_MODEL], &env);
    assert!(!verify.status.success());
    assert!(stdout(&verify).contains("CORRUPT"), "{}", stdout(&verify));
    assert!(stdout(&verify).contains("silero_vad.onnx"));
    assert!(stderr(&verify).contains("talkline models fetch --only silero-vad"));

    // ...and `fetch` repairs it from the cached wheel, without the network.
    let repair = talkline(&fetch, &env);
    assert!(repair.status.success(), "{}", stderr(&repair));
    assert!(stderr(&repair).contains("corrupt"), "{}", stderr(&repair));
    assert!(
        stdout(&repair).contains("from the cached wheel"),
        "{}",
        stdout(&repair)
    );
    let verify = talkline(&["models", "verify", "--only", SMALL_MODEL], &env);
    assert!(verify.status.success(), "{}", stdout(&verify));

    // A corrupted cached wheel is downloaded again rather than trusted.
    flip_byte(&cache.path().join(SMALL_WHEEL), 5000);
    fs::remove_file(cache.path().join(SMALL_FILE)).unwrap();
    let refetch = talkline(&fetch, &env);
    assert!(refetch.status.success(), "{}", stderr(&refetch));
    assert!(stderr(&refetch).contains("cached wheel is corrupt"));
    assert!(stdout(&refetch).contains("wheel downloaded"));
    // No half-written files are left behind.
    for entry in fs::read_dir(cache.path().join("silero-vad")).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(!name.to_string_lossy().ends_with(".partial"), "{name:?}");
    }
}

#[test]
fn unreachable_registry_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(talkline_tests::talkline_bin())
        .args(["models", "fetch", "--only", SMALL_MODEL])
        .env("TALKLINE_MODELS", cache.path())
        // A closed port on this machine stands in for an unreachable index.
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_FIND_LINKS", "")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("pip download silero-vad==6.2.3"), "{err}");
    assert!(err.contains("package index reachable"), "{err}");
    assert!(!cache.path().join(SMALL_FILE).exists());
}

#[test]
fn unknown_model_names_the_known_ones() {
    let cache = tempfile::tempdir().unwrap();
    let out = talkline(
        &["models", "fetch", "--only", "gpt-5"],
        &[("TALKLINE_MODELS", cache.path())],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("gpt-5") && err.contains("whisper-tiny.en"),
        "{err}"
    );
}

#[test]
fn config_check_names_every_missing_model_and_its_fetch_command() {
    let cache = tempfile::tempdir().unwrap();
    let out = talkline(&["config", "check"], &[("TALKLINE_MODELS", cache.path())]);
    assert!(!out.status.success());
    let text = stdout(&out);
    for model in [
        "whisper-tiny.en",
        "silero-vad",
        "smollm2-135m",
        "piper-joe",
        "onnxruntime",
    ] {
        assert!(
            text.contains(&format!("talkline models fetch --only {model}")),
            "{model}: {text}"
        );
    }
}

#[test]
fn config_check_accepts_own_models_by_path_and_rejects_wrong_files() {
    let dir = tempfile::tempdir().unwrap();
    let own_gguf = dir.path().join("llama-3.2-1b.gguf");
    fs::write(&own_gguf, b"GGUF\x03\x00\x00\x00").unwrap();
    let not_whisper = dir.path().join("whisper.bin");
    fs::write(&not_whisper, b"PK\x03\x04 not a ggml file").unwrap();
    let config = dir.path().join("talkline.toml");
    fs::write(
        &config,
        format!(
            "[asr]\nmodel = {:?}\n[llm]\nbackend = \"local\"\nmodel = {:?}\n",
            not_whisper, own_gguf
        ),
    )
    .unwrap();
    let out = talkline(
        &["config", "check", "--config", config.to_str().unwrap()],
        &[("TALKLINE_MODELS", dir.path())],
    );
    let text = stdout(&out);
    assert!(!out.status.success());
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok") && l.contains("llama-3.2-1b.gguf")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("PROBLEM")
            && l.contains("whisper.bin")
            && l.contains("[asr] model")),
        "{text}"
    );

    fs::write(&config, "[asr]\nthreads = \"two\"\n").unwrap();
    let out = talkline(
        &["config", "check", "--config", config.to_str().unwrap()],
        &[],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("threads"), "{}", stderr(&out));
}
