//! Text to phonemes. Piper voices are trained on espeak-ng IPA; [`espeak::EspeakPhonemizer`] is
//! the default (cargo feature `espeak`, GPL-3.0). Anything else implements [`Phonemizer`].

#[cfg(feature = "espeak")]
pub mod espeak;

use std::ops::Range;

use unicode_normalization::UnicodeNormalization;

use crate::error::Result;

/// One clause as espeak-ng splits text: its phonemes, and the punctuation that ended it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clause {
    /// IPA, as the phonemizer wrote it (before NFD), without the terminator.
    pub ipa: String,
    /// `. ? ! , : ;` or `None` when the clause ended for another reason (end of text, length).
    pub terminator: Option<char>,
    pub end_of_sentence: bool,
    /// Bytes of the input text this clause covers.
    pub text: Range<usize>,
}

/// Turns text into clauses of phonemes. Implementations hold whatever state they need;
/// one instance serves one thread at a time.
pub trait Phonemizer: Send {
    fn phonemize(&mut self, text: &str) -> Result<Vec<Clause>>;
}

/// Piper's grouping (piper/phonemize_espeak.py): per sentence, the NFD code points of each
/// clause's phonemes, with the terminator kept as a "phoneme" (the voices were trained with
/// punctuation) and a space after a clause that does not end the sentence.
pub fn sentences(clauses: &[Clause]) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    let mut sentence: Vec<String> = Vec::new();
    for clause in clauses {
        let mut text = strip_language_flags(&clause.ipa);
        if let Some(t) = clause.terminator {
            text.push(t);
            if matches!(t, ',' | ':' | ';') {
                text.push(' ');
            }
        }
        sentence.extend(text.nfd().map(String::from));
        if clause.end_of_sentence {
            all.push(std::mem::take(&mut sentence));
        }
    }
    if !sentence.is_empty() {
        all.push(sentence);
    }
    all.retain(|s| !s.is_empty());
    all
}

/// espeak-ng marks words it read in another language with `(lang)`; Piper removes the marks.
fn strip_language_flags(ipa: &str) -> String {
    let mut out = String::with_capacity(ipa.len());
    let mut depth = 0usize;
    for c in ipa.chars() {
        match c {
            '(' => depth += 1,
            ')' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// Merges adjacent phonemes that form a known vowel cluster (piper's `_merge_known_vowel_clusters`),
/// longest match first.
pub fn merge_vowel_clusters(phones: Vec<String>, clusters: &[Vec<String>]) -> Vec<String> {
    let max_len = clusters.iter().map(Vec::len).max().unwrap_or(0);
    if max_len < 2 {
        return phones;
    }
    let mut out = Vec::with_capacity(phones.len());
    let mut i = 0;
    while i < phones.len() {
        let longest = (2..=max_len.min(phones.len() - i))
            .rev()
            .find(|&n| clusters.iter().any(|c| c.as_slice() == &phones[i..i + n]));
        match longest {
            Some(n) => {
                out.push(phones[i..i + n].concat());
                i += n;
            }
            None => {
                out.push(phones[i].clone());
                i += 1;
            }
        }
    }
    out
}

/// For `phoneme_type = "text"` voices: the phonemes are the text's NFD code points.
#[derive(Debug, Default, Clone, Copy)]
pub struct TextPhonemizer;

impl Phonemizer for TextPhonemizer {
    fn phonemize(&mut self, text: &str) -> Result<Vec<Clause>> {
        Ok(vec![Clause {
            ipa: text.to_string(),
            terminator: None,
            end_of_sentence: true,
            text: 0..text.len(),
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clause(ipa: &str, terminator: Option<char>, end: bool) -> Clause {
        Clause {
            ipa: ipa.into(),
            terminator,
            end_of_sentence: end,
            text: 0..0,
        }
    }

    #[test]
    fn clauses_group_into_sentences_with_punctuation_kept() {
        let s = sentences(&[
            clause("həlˈoʊ", Some(','), false),
            clause("wˈɜːld", Some('!'), true),
            clause("(fr)bɔ̃ʒuʁ(en)", None, false),
        ]);
        let joined: Vec<String> = s.iter().map(|p| p.concat()).collect();
        assert_eq!(joined[0], "həlˈoʊ, wˈɜːld!");
        // NFD splits the nasal vowel into its base and a combining tilde.
        assert_eq!(s[1], ["b", "ɔ", "\u{303}", "ʒ", "u", "ʁ"]);
    }

    #[test]
    fn vowel_clusters_merge_longest_first() {
        let phones: Vec<String> = ["a", "ɪ", "t", "o", "ʊ"].map(String::from).to_vec();
        let clusters = vec![
            vec!["a".to_string(), "ɪ".to_string()],
            vec!["o".to_string(), "ʊ".to_string()],
        ];
        assert_eq!(merge_vowel_clusters(phones, &clusters), ["aɪ", "t", "oʊ"]);
    }
}
