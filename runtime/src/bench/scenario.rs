//! Scenario files: a scripted conversation of user turns, and the audio it is spoken with.
//!
//! ```toml
//! name = "clinic"
//! voice = "en-us"               # espeak-ng voice for text turns (the agent speaks Piper "joe")
//!
//! [[turn]]
//! text = "Is my hemoglobin normal?"
//! pause_before_ms = 800         # silence after the agent's previous reply has played out
//!
//! [[turn]]
//! wav = "clips/question.wav"    # relative to the scenario file; any rate, mono or stereo
//!
//! [[turn]]
//! text = "Sorry, one more thing."
//! barge_in_after_ms = 700       # speak over the agent, 700 ms after its reply began arriving
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::Deserialize;

/// Audio rate of the clips and of the WebSocket session the bench opens.
pub const RATE: u32 = 16_000;
/// A sample louder than this (0.1% of full scale) is speech: sox's `silence` trim threshold, so
/// the trimmed clip's first and last samples are the true start and end of speech.
const SPEECH_THRESHOLD: i32 = 33;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// espeak-ng voice for text turns.
    #[serde(default = "default_voice")]
    pub voice: String,
    /// espeak-ng speed, words per minute.
    #[serde(default = "default_wpm")]
    pub words_per_minute: u32,
    #[serde(rename = "turn")]
    pub turns: Vec<TurnSpec>,
}

fn default_voice() -> String {
    // espeak-ng's formant US English: nothing like the agent's neural Piper voice, and the voice
    // of the Pipecat anchor's audio and of the tests (its female variants transcribe worse).
    "en-us".into()
}

fn default_wpm() -> u32 {
    175 // espeak-ng's own default
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnSpec {
    /// Spoken with espeak-ng.
    pub text: Option<String>,
    /// A recording (relative paths are relative to the scenario file).
    pub wav: Option<PathBuf>,
    /// Silence before speaking, counted from the moment the agent's previous reply has played
    /// out (or from the start of the session for the first turn).
    #[serde(default = "default_pause")]
    pub pause_before_ms: u64,
    /// Barge in: start speaking this long after the agent's reply to the previous turn began
    /// arriving, while it is still talking. `pause_before_ms` is then ignored.
    pub barge_in_after_ms: Option<u64>,
}

fn default_pause() -> u64 {
    800
}

/// A turn ready to send: 16 kHz PCM16 audio and where the speech in it starts and ends.
#[derive(Debug, Clone)]
pub struct TurnAudio {
    pub label: String,
    pub pcm: Vec<i16>,
    /// First and one-past-last sample of speech in `pcm` (ground truth).
    pub speech_start: usize,
    pub speech_end: usize,
    pub pause_before_ms: u64,
    pub barge_in_after_ms: Option<u64>,
    /// The clip as written into the report folder (the baselines read it).
    pub path: PathBuf,
}

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scenario {}", path.display()))?;
        let scenario: Scenario = toml::from_str(&text)
            .with_context(|| format!("scenario {} is invalid", path.display()))?;
        if scenario.turns.is_empty() {
            bail!("scenario {} has no [[turn]]", path.display());
        }
        for (i, t) in scenario.turns.iter().enumerate() {
            if t.text.is_some() == t.wav.is_some() {
                bail!(
                    "turn {} of {}: give exactly one of `text` or `wav`",
                    i + 1,
                    path.display()
                );
            }
            if i == 0 && t.barge_in_after_ms.is_some() {
                bail!(
                    "turn 1 of {}: there is no agent reply to barge in on",
                    path.display()
                );
            }
        }
        Ok(scenario)
    }

    /// The built-in two-turn conversation of `--quick`.
    pub fn quick() -> Self {
        let turn = |text: &str| TurnSpec {
            text: Some(text.into()),
            wav: None,
            pause_before_ms: 600,
            barge_in_after_ms: None,
        };
        Scenario {
            name: "quick".into(),
            description: "a question and a thank-you, no barge-in (the CI harness check)".into(),
            voice: default_voice(),
            words_per_minute: default_wpm(),
            // Both survive the telephone band: over SIP (8 kHz, G.711) tiny.en hears "Is my
            // hemoglobin normal?" as "It's my ego in normal" and "Thank you, goodbye." at
            // times as nothing, which leaves a turn unanswered and the harness check failing
            // for a reason that is not the harness's.
            turns: vec![
                turn("When should I repeat the blood test?"),
                turn("Okay, thank you very much."),
            ],
        }
    }

    /// Speaks or converts every turn into `dir`, trimmed to its speech: the clip's first and last
    /// samples are the true start and end of speech.
    pub fn render(&self, base: &Path, dir: &Path) -> anyhow::Result<Vec<TurnAudio>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut out = Vec::new();
        for (i, t) in self.turns.iter().enumerate() {
            let raw = dir.join(format!("turn{}-raw.wav", i + 1));
            let clip = dir.join(format!("turn{}.wav", i + 1));
            let label = match (&t.text, &t.wav) {
                (Some(text), _) => {
                    run(Command::new("espeak-ng")
                        .args([
                            "-v",
                            &self.voice,
                            "-s",
                            &self.words_per_minute.to_string(),
                            "-w",
                        ])
                        .arg(&raw)
                        .arg(text))
                    .context("espeak-ng is needed for text turns (apt-get install espeak-ng)")?;
                    text.clone()
                }
                (None, Some(wav)) => {
                    let src = if wav.is_absolute() {
                        wav.clone()
                    } else {
                        base.join(wav)
                    };
                    std::fs::copy(&src, &raw)
                        .with_context(|| format!("turn {}: reading {}", i + 1, src.display()))?;
                    src.display().to_string()
                }
                (None, None) => bail!("turn {}: no text and no wav", i + 1),
            };
            // -D: no dither, so the same text gives bit-identical audio run after run.
            run(Command::new("sox")
                .arg("-D")
                .arg(&raw)
                .args(["-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer"])
                .arg(&clip)
                .args([
                    "silence", "1", "0.005", "0.1%", "reverse", "silence", "1", "0.005",
                ])
                .args(["0.1%", "reverse"]))
            .context("sox is needed to convert and trim turns (apt-get install sox)")?;
            let _ = std::fs::remove_file(&raw);
            let pcm = read_pcm16(&clip)?;
            let loud = |s: &&i16| i32::from(**s).abs() > SPEECH_THRESHOLD;
            let Some(speech_start) = pcm.iter().position(|s| loud(&s)) else {
                bail!("turn {} ({label}) has no speech", i + 1);
            };
            let speech_end = pcm
                .iter()
                .rposition(|s| loud(&s))
                .map_or(pcm.len(), |e| e + 1);
            out.push(TurnAudio {
                label,
                pcm,
                speech_start,
                speech_end,
                pause_before_ms: t.pause_before_ms,
                barge_in_after_ms: t.barge_in_after_ms,
                path: clip,
            });
        }
        Ok(out)
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn read_pcm16(path: &Path) -> anyhow::Result<Vec<i16>> {
    let mut reader =
        hound::WavReader::open(path).with_context(|| format!("reading {}", path.display()))?;
    let spec = reader.spec();
    if spec.sample_rate != RATE || spec.channels != 1 || spec.bits_per_sample != 16 {
        bail!("{} is not 16 kHz mono PCM16 after sox", path.display());
    }
    reader
        .samples::<i16>()
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("decoding {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_needs_exactly_one_source_and_turn_one_cannot_barge_in() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(
            &p,
            "name = \"x\"\n[[turn]]\ntext = \"hi\"\nwav = \"a.wav\"\n",
        )
        .unwrap();
        assert!(Scenario::load(&p).is_err());
        std::fs::write(
            &p,
            "name = \"x\"\n[[turn]]\ntext = \"hi\"\nbarge_in_after_ms = 5\n",
        )
        .unwrap();
        assert!(Scenario::load(&p).is_err());
        std::fs::write(&p, "name = \"x\"\n[[turn]]\ntext = \"hi\"\n[[turn]]\ntext = \"b\"\nbarge_in_after_ms = 500\n").unwrap();
        let s = Scenario::load(&p).unwrap();
        assert_eq!(s.turns[1].barge_in_after_ms, Some(500));
        assert_eq!(s.turns[0].pause_before_ms, 800);
    }
}
