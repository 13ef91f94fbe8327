//! espeak-ng through its C API (libespeak-ng, GPL-3.0).
//!
//! The FFI is declared by hand: it is four functions, and the existing `-sys` crates either run
//! bindgen or build espeak-ng from source, which this offline, Debian-packaged build avoids.
//!
//! libespeak-ng keeps global state and is not thread-safe, so every call goes through one
//! process-wide lock, and the library is initialised once per process with one data folder.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Clause, Phonemizer};
use crate::error::{Result, TtsError};

#[link(name = "espeak-ng")]
extern "C" {
    fn espeak_Initialize(
        output: c_int,
        buflength: c_int,
        path: *const c_char,
        options: c_int,
    ) -> c_int;
    fn espeak_SetVoiceByName(name: *const c_char) -> c_int;
    fn espeak_TextToPhonemes(
        textptr: *mut *const c_void,
        textmode: c_int,
        phonememode: c_int,
    ) -> *const c_char;
}

/// `AUDIO_OUTPUT_SYNCHRONOUS`: no audio thread; we only ask for phonemes.
const AUDIO_OUTPUT_SYNCHRONOUS: c_int = 2;
/// `espeakINITIALIZE_DONT_EXIT`: without it, a bad data folder makes espeak-ng call `exit()`.
const INITIALIZE_DONT_EXIT: c_int = 0x8000;
/// `espeakCHARS_AUTO`, what Piper passes.
const CHARS_AUTO: c_int = 0;
/// `espeakPHONEMES_IPA`, what Piper passes.
const PHONEMES_IPA: c_int = 0x02;
const EE_OK: c_int = 0;

struct EspeakGlobal {
    /// The data folder espeak-ng was initialised with (`None`: its compiled-in default).
    data: Option<PathBuf>,
    voice: Option<String>,
}

static ESPEAK: Mutex<Option<EspeakGlobal>> = Mutex::new(None);

/// The folder that holds `espeak-ng-data` for Piper's own phonemes: the `piper-espeak-data`
/// model that `talkline models fetch` extracts from the `piper-tts` wheel. Debian's 1.51 data
/// differ in a few words (`normal`: nˈoːɹməl instead of Piper's nˈɔːɹməl).
pub const PIPER_DATA_SUBDIR: &str = "espeak-ng-data";

/// espeak-ng phonemes for one espeak voice (e.g. `en-us`).
#[derive(Debug)]
pub struct EspeakPhonemizer {
    voice: CString,
    voice_name: String,
}

impl EspeakPhonemizer {
    /// `data_parent` is the folder that contains `espeak-ng-data` (Piper's data); `None` uses the
    /// system's. The first phonemizer of the process fixes the data folder; asking for another
    /// later is an error, because libespeak-ng has one global state.
    pub fn new(data_parent: Option<&Path>, voice: &str) -> Result<Self> {
        let c_voice = CString::new(voice)
            .map_err(|_| TtsError::Espeak(format!("voice name {voice:?} contains NUL")))?;
        let mut global = lock();
        match global.as_ref() {
            Some(g) if g.data.as_deref() == data_parent => {}
            Some(g) => {
                return Err(TtsError::Espeak(format!(
                    "espeak-ng is already initialised with data {}; one data folder per process",
                    g.data
                        .as_deref()
                        .map_or("(system default)".into(), |p| p.display().to_string())
                )))
            }
            None => {
                let c_path = match data_parent {
                    Some(p) => {
                        if !p.join(PIPER_DATA_SUBDIR).join("phontab").is_file() {
                            return Err(TtsError::Espeak(format!(
                                "{} has no espeak-ng-data/phontab",
                                p.display()
                            )));
                        }
                        Some(CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| {
                            TtsError::Espeak(format!("path {} contains NUL", p.display()))
                        })?)
                    }
                    None => None,
                };
                let ptr = c_path.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
                // SAFETY: `ptr` is NULL or a NUL-terminated string that outlives the call; the
                // global lock serialises all espeak-ng calls.
                let rate = unsafe {
                    espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, ptr, INITIALIZE_DONT_EXIT)
                };
                if rate <= 0 {
                    return Err(TtsError::Espeak(format!(
                        "espeak_Initialize failed ({rate}) with data {}",
                        data_parent.map_or("(system default)".into(), |p| p.display().to_string())
                    )));
                }
                *global = Some(EspeakGlobal {
                    data: data_parent.map(Path::to_path_buf),
                    voice: None,
                });
            }
        }
        let g = global.as_mut().expect("initialised just above");
        select_voice(g, &c_voice, voice)?;
        Ok(EspeakPhonemizer {
            voice: c_voice,
            voice_name: voice.to_string(),
        })
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<EspeakGlobal>> {
    // A panic while holding the lock leaves espeak-ng's state as valid as after any call.
    ESPEAK.lock().unwrap_or_else(|p| p.into_inner())
}

fn select_voice(g: &mut EspeakGlobal, c_voice: &CStr, voice: &str) -> Result<()> {
    if g.voice.as_deref() == Some(voice) {
        return Ok(());
    }
    // SAFETY: NUL-terminated string; calls are serialised by the global lock.
    let rc = unsafe { espeak_SetVoiceByName(c_voice.as_ptr()) };
    if rc != EE_OK {
        g.voice = None;
        return Err(TtsError::Espeak(format!(
            "espeak-ng has no voice {voice:?} (error {rc})"
        )));
    }
    g.voice = Some(voice.to_string());
    Ok(())
}

impl Phonemizer for EspeakPhonemizer {
    fn phonemize(&mut self, text: &str) -> Result<Vec<Clause>> {
        // espeak-ng reads a C string; an interior NUL would silently cut the text short.
        let clean: String = text.chars().filter(|&c| c != '\0').collect();
        let c_text = CString::new(clean.clone()).expect("NUL characters were removed above");
        let base = c_text.as_ptr() as usize;
        let end = base + clean.len();
        let mut global = lock();
        let g = global
            .as_mut()
            .expect("an EspeakPhonemizer exists only after espeak-ng was initialised");
        select_voice(g, &self.voice, &self.voice_name)?;
        let mut clauses = Vec::new();
        let mut ptr = c_text.as_ptr() as *const c_void;
        let mut start = 0;
        while !ptr.is_null() {
            // SAFETY: `ptr` points into `c_text` (NUL-terminated, alive for the loop); espeak-ng
            // advances it clause by clause and sets it to NULL at the end. The returned buffer
            // is espeak-ng's own and is copied before the next call.
            let ipa = unsafe {
                let out = espeak_TextToPhonemes(&mut ptr, CHARS_AUTO, PHONEMES_IPA);
                if out.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(out).to_string_lossy().into_owned()
                }
            };
            let stop = if ptr.is_null() {
                clean.len()
            } else {
                let raw = floor_char_boundary(&clean, (ptr as usize).clamp(base, end) - base);
                if raw <= start {
                    // espeak-ng made no progress: stop rather than loop forever.
                    break;
                }
                without_lookahead(&clean, start, raw)
            };
            let span = start..stop;
            start = stop;
            let terminator = recover_terminator(&clean[span.clone()]);
            clauses.push(Clause {
                ipa: ipa.trim().to_string(),
                terminator,
                end_of_sentence: matches!(terminator, Some('.' | '?' | '!')),
                text: span,
            });
        }
        // Clauses with neither sound nor punctuation (e.g. trailing whitespace) carry nothing.
        clauses.retain(|c| !c.ipa.is_empty() || c.terminator.is_some());
        Ok(clauses)
    }
}

/// espeak-ng 1.51's `espeak_TextToPhonemes` does not report why a clause ended (Piper's patched
/// build has `espeak_TextToPhonemesWithTerminator`), so read it back from the text the clause
/// consumed: its last punctuation mark, ignoring trailing spaces and closing quotes/brackets.
fn recover_terminator(span: &str) -> Option<char> {
    let trimmed = span.trim_end_matches(|c: char| {
        c.is_whitespace() || matches!(c, '"' | '\'' | ')' | ']' | '”' | '’')
    });
    // An ellipsis ends a clause without a terminator in Piper's output ("Wait... what" gives
    // "wˈeɪtwˌʌt"), and does not end the sentence.
    if trimmed.ends_with("..") {
        return None;
    }
    match trimmed.chars().next_back()? {
        last @ ('.' | '?' | '!' | ',' | ':' | ';') => Some(last),
        _ => None,
    }
}

/// espeak-ng reads one character past the space that follows a clause before it returns, and
/// leaves the text pointer after it (measured: "Hello, world" stops at "w"); that character
/// belongs to the next clause.
fn without_lookahead(text: &str, start: usize, stop: usize) -> usize {
    let mut chars = text[start..stop].char_indices().rev();
    match (chars.next(), chars.next()) {
        (Some((last_at, last)), Some((_, before)))
            if !last.is_whitespace() && before.is_whitespace() =>
        {
            start + last_at
        }
        _ => stop,
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminators_are_recovered_from_the_clause_text() {
        assert_eq!(recover_terminator("Hello, "), Some(','));
        assert_eq!(recover_terminator("world!"), Some('!'));
        assert_eq!(recover_terminator("he said \"yes.\" "), Some('.'));
        assert_eq!(recover_terminator("no punctuation"), None);
        assert_eq!(recover_terminator(""), None);
        assert_eq!(recover_terminator("Wait... "), None);
        assert_eq!(recover_terminator("Wait… "), None);
    }

    #[test]
    fn the_lookahead_character_goes_to_the_next_clause() {
        let text = "Hello,   world! Été";
        assert_eq!(without_lookahead(text, 0, 10), 9);
        assert_eq!(&text[9..15], "world!");
        // "É" is two bytes; the clause still ends before it.
        assert_eq!(without_lookahead(text, 9, 18), 16);
        // A closing quote after the period is no lookahead.
        assert_eq!(without_lookahead("\"yes.\" Then", 0, 6), 6);
    }
}
