//! LLM tokens to speakable chunks. The first chunk goes out as soon as a short clause is complete
//! (time to first audio); later chunks are whole sentences (better prosody, fewer model runs).
//!
//! A boundary is punctuation followed by whitespace, so "4.5" and "e.g.x" never split, and the
//! chunker waits for the next token when punctuation ends the text it has so far.

/// When to cut.
#[derive(Debug, Clone, Copy)]
pub struct ChunkerConfig {
    /// The first chunk needs at least this many words ("Yes," alone waits for more).
    pub first_min_words: usize,
    /// A first clause longer than this is cut after this many words, so the voice starts while
    /// the LLM is still writing it (0: wait for the clause). Time to first audio matters more than
    /// the prosody of one early cut.
    pub first_max_words: usize,
    /// The same for the second chunk: it is cut at its first clause end, or after this many
    /// words (0: the rest of the sentence). It must be voiced before the first chunk has played,
    /// and while it is the rest of a long sentence the voice waits for the LLM to write all of it.
    pub second_max_words: usize,
    /// A chunk longer than this is cut at its last clause boundary, else at a space, so a run-on
    /// sentence (or 10 kB without punctuation) never becomes one huge model input.
    pub max_chars: usize,
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        ChunkerConfig {
            first_min_words: 3,
            // Measured with `talkline bench` on the clinic scenario (2 cores): 4 words instead of
            // 6 brought the first audio about 130 ms sooner (p50), two words of SmolLM2 decoding
            // and a shorter first Piper run; 3 instead of 4, another 40-100 ms (p50 of 20-30
            // turns, two rounds). 2 instead of 3: first token to first audio p50 120 against
            // 140 ms, and a lower voice-to-voice p50 in each of 4 rounds of 15 turns
            // (2026-11-29); but the looped-back echo test (`tests/serve_echo.rs`, debug build)
            // then let the agent's voice through as the caller, as words and turns, in 2 runs of
            // 2, while the second chunk was the rest of the sentence. With the second chunk cut
            // at six words (`second_max_words`), two words passed that test in 2 runs of 2, but
            // gave no lower voice-to-voice than three (p50 387 and 410 against 385 and 410, same
            // rounds), so three stays.
            first_max_words: 3,
            second_max_words: SECOND_MAX_WORDS,
            max_chars: 300,
        }
    }
}

/// See [`ChunkerConfig::second_max_words`]. Six words are about 1.5 s of speech, written and
/// voiced in well under the second or so the first chunk plays, however long the sentence. On the
/// clinic scenario (short answers, `talkline bench --reps 3`, five alternating rounds, 75 turns a
/// side, 2026-11-29) voice-to-voice was the same as with the rest of the sentence as the second
/// chunk (p50 410 / p95 531 ms against 411 / 542), with no gap inside a reply either way.
pub const SECOND_MAX_WORDS: usize = 6;

/// A piece of text to synthesize, with its place in the whole text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextChunk {
    pub index: usize,
    pub text: String,
    /// Byte offset of `text` in everything pushed so far.
    pub start: usize,
}

/// Cuts a stream of text deltas into chunks. Sans-I/O: feed it, collect what it returns.
#[derive(Debug, Default)]
pub struct ClauseChunker {
    config: ChunkerConfig,
    buf: String,
    /// Bytes of the whole text before `buf`.
    offset: usize,
    emitted: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Boundary {
    Clause,
    Sentence,
}

/// Words with a period that does not end a sentence.
const ABBREVIATIONS: &[&str] = &[
    "Dr", "Mr", "Mrs", "Ms", "Prof", "St", "Jr", "Sr", "vs", "etc", "e.g", "i.e", "approx", "No",
    "a.m", "p.m", "Fig", "ref",
];

impl ClauseChunker {
    pub fn new(config: ChunkerConfig) -> Self {
        ClauseChunker {
            config,
            ..Default::default()
        }
    }

    /// Adds text; returns the chunks that are now complete.
    pub fn push(&mut self, delta: &str) -> Vec<TextChunk> {
        self.buf.push_str(delta);
        let mut out = Vec::new();
        while let Some(cut) = self.next_cut() {
            if let Some(chunk) = self.take(cut) {
                out.push(chunk);
            }
        }
        out
    }

    /// Chunks cut so far.
    pub fn chunks_emitted(&self) -> usize {
        self.emitted
    }

    /// The text left at the end of the stream.
    pub fn finish(&mut self) -> Option<TextChunk> {
        let all = self.buf.len();
        self.take(all)
    }

    fn take(&mut self, cut: usize) -> Option<TextChunk> {
        let piece: String = self.buf.drain(..cut).collect();
        let start = self.offset + (piece.len() - piece.trim_start().len());
        self.offset += cut;
        let text = piece.trim();
        if text.is_empty() {
            return None;
        }
        let chunk = TextChunk {
            index: self.emitted,
            text: text.to_string(),
            start,
        };
        self.emitted += 1;
        Some(chunk)
    }

    /// Where to cut `buf` now, if anywhere.
    fn next_cut(&self) -> Option<usize> {
        // The chunks the caller waits for: the first, and the second, which must be ready before
        // the first has played.
        let (early, max_words) = match self.emitted {
            0 => (true, self.config.first_max_words),
            1 => (
                self.config.second_max_words > 0,
                self.config.second_max_words,
            ),
            _ => (false, 0),
        };
        let mut last_clause = None;
        for (end, kind) in boundaries(&self.buf) {
            if end > self.config.max_chars {
                break;
            }
            match kind {
                Boundary::Sentence => return Some(end),
                Boundary::Clause
                    if early && words(&self.buf[..end]) >= self.config.first_min_words =>
                {
                    return Some(end)
                }
                _ => last_clause = Some(end),
            }
        }
        if early && max_words > 0 {
            // A cut after "are", "the" or "of" leaves the voice on a word no phrase ends with,
            // and its falling pitch there is heard ("Your results are | back"): up to two more
            // words wait for one that can end a phrase, or for the clause's own end above.
            for n in max_words..=max_words + 2 {
                match nth_word_end(&self.buf, n) {
                    None => break,
                    Some(end) if n < max_words + 2 && leaves_a_phrase_open(&self.buf[..end]) => {}
                    Some(end) => return Some(end),
                }
            }
        }
        if self.buf.len() > self.config.max_chars {
            if let Some(end) = last_clause {
                return Some(end);
            }
            let limit = floor_boundary(&self.buf, self.config.max_chars);
            return Some(
                self.buf[..limit]
                    .rfind(char::is_whitespace)
                    .filter(|&i| i > 0)
                    .unwrap_or(limit),
            );
        }
        None
    }
}

/// The end of the `n`-th word, once whitespace shows that word is complete.
fn nth_word_end(s: &str, n: usize) -> Option<usize> {
    let mut count = 0;
    let mut in_word = false;
    for (i, c) in s.char_indices() {
        if c.is_whitespace() {
            if in_word {
                count += 1;
                if count == n {
                    return Some(i);
                }
            }
            in_word = false;
        } else {
            in_word = true;
        }
    }
    None
}

/// Whether `text` ends on an English function word (an article, preposition, conjunction,
/// auxiliary or possessive) that a phrase does not end with.
fn leaves_a_phrase_open(text: &str) -> bool {
    const OPEN: &[&str] = &[
        "a", "an", "the", "my", "your", "his", "her", "its", "our", "their", "this", "that",
        "these", "those", "of", "to", "in", "on", "at", "for", "with", "by", "from", "about", "as",
        "into", "than", "and", "or", "but", "if", "because", "is", "are", "was", "were", "be",
        "been", "am", "will", "would", "can", "could", "should", "may", "might", "must", "do",
        "does", "did", "has", "have", "had", "not", "very", "i", "you", "we", "they", "he", "she",
        "i'm", "you're", "it's", "we're", "they're", "there's", "what", "which", "who", "how",
        "some", "any", "no", "more", "most",
    ];
    let Some(last) = text.split_whitespace().next_back() else {
        return false;
    };
    let word = last.to_lowercase().replace('\u{2019}', "'");
    OPEN.contains(&word.as_str())
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Byte offsets just after each boundary (after closing quotes), with their kind. Only
/// boundaries followed by whitespace count; a blank line ends a sentence.
fn boundaries(s: &str) -> Vec<(usize, Boundary)> {
    let mut out = Vec::new();
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        let kind = match c {
            '.' | '!' | '?' | '…' => Some(Boundary::Sentence),
            ',' | ';' | ':' => Some(Boundary::Clause),
            // Cut after the blank line, not before it: a cut at its start would leave it at
            // the head of the buffer, where it would be cut again at offset 0, forever.
            '\n' if chars.get(i + 1).is_some_and(|&(_, n)| n == '\n') => {
                out.push((at + 2, Boundary::Sentence));
                i += 2;
                continue;
            }
            _ => None,
        };
        if let Some(kind) = kind {
            // Closing quotes and brackets stay with the clause they close.
            let mut j = i + 1;
            while j < chars.len() && matches!(chars[j].1, '"' | '\'' | ')' | ']' | '”' | '’') {
                j += 1;
            }
            // The boundary is only known once whitespace follows.
            if j < chars.len() && chars[j].1.is_whitespace() {
                // "Dr. Lee" goes on: never cut after an abbreviation or an initial.
                if c == '.' && is_abbreviation(&s[..at]) {
                    i = j;
                    continue;
                }
                let end = chars.get(j).map_or(s.len(), |&(b, _)| b);
                out.push((end, kind));
            }
            i = j;
            continue;
        }
        i += 1;
    }
    out
}

fn is_abbreviation(before_period: &str) -> bool {
    let word = before_period
        .rsplit(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or("");
    ABBREVIATIONS.contains(&word)
        // A single capital is an initial: "J. Smith".
        || (word.chars().count() == 1 && word.chars().all(|c| c.is_uppercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clause tests below were written for a four-word first cut, and their texts open
    /// with clauses of four or five words; the cut itself is tested on its own.
    const FOUR_WORD_FIRST_CUT: ChunkerConfig = ChunkerConfig {
        first_min_words: 3,
        first_max_words: 4,
        second_max_words: 0,
        max_chars: 300,
    };

    fn feed(tokens: &[&str], config: ChunkerConfig) -> Vec<String> {
        let mut c = ClauseChunker::new(config);
        let mut out: Vec<String> = Vec::new();
        for t in tokens {
            out.extend(c.push(t).into_iter().map(|c| c.text));
        }
        out.extend(c.finish().map(|c| c.text));
        out
    }

    fn tokens(text: &str) -> Vec<&str> {
        // LLM-like pieces: words with their leading space.
        let mut out = Vec::new();
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c == ' ' && i > start {
                out.push(&text[start..i]);
                start = i;
            }
        }
        out.push(&text[start..]);
        out
    }

    #[test]
    fn the_second_chunk_ends_at_its_first_clause_or_after_its_words_then_sentences_follow() {
        let text = "The blood test is used to check for a condition called high cholesterol, \
                    which can lead to heart disease. It is simple.";
        assert_eq!(
            feed(&tokens(text), ChunkerConfig::default()),
            [
                "The blood test",
                // Six words would end on "a": the cut waits for "condition".
                "is used to check for a condition",
                "called high cholesterol, which can lead to heart disease.",
                "It is simple.",
            ]
        );
        let clause = "Your results are back, and your hemoglobin is normal, the iron is fine too.";
        assert_eq!(
            feed(&tokens(clause), ChunkerConfig::default()),
            [
                "Your results are back,",
                "and your hemoglobin is normal,",
                "the iron is fine too."
            ]
        );
        let rest_of_sentence = ChunkerConfig {
            second_max_words: 0,
            ..ChunkerConfig::default()
        };
        assert_eq!(
            feed(&tokens(text), rest_of_sentence),
            [
                "The blood test",
                "is used to check for a condition called high cholesterol, which can lead to heart \
                 disease.",
                "It is simple.",
            ]
        );
    }

    #[test]
    fn a_blank_line_ends_a_sentence_and_the_chunker_goes_on() {
        let pieces = [
            "The results of the patient's lab",
            "\n\n",
            "- hemoglobin",
            " is normal",
        ];
        let whole_clauses = ChunkerConfig {
            first_max_words: 0,
            ..ChunkerConfig::default()
        };
        assert_eq!(
            feed(&pieces, whole_clauses),
            ["The results of the patient's lab", "- hemoglobin is normal"]
        );
    }

    #[test]
    fn first_chunk_is_a_short_clause_then_sentences() {
        let text = "Your results look good, and nothing needs attention. The hemoglobin is normal, the iron is fine. See you soon!";
        assert_eq!(
            feed(&tokens(text), FOUR_WORD_FIRST_CUT),
            [
                "Your results look good,",
                "and nothing needs attention.",
                "The hemoglobin is normal, the iron is fine.",
                "See you soon!",
            ]
        );
    }

    #[test]
    fn a_clause_too_short_for_the_first_chunk_waits() {
        assert_eq!(
            feed(
                &tokens("Yes, that is right, indeed."),
                ChunkerConfig::default()
            ),
            ["Yes, that is right,", "indeed."]
        );
    }

    #[test]
    fn decimals_abbreviations_and_initials_do_not_split() {
        let text = "Dr. Lee says 4.5 g/dL is fine. J. Smith agrees with Dr. Lee e.g. here.";
        let whole_clauses = ChunkerConfig {
            first_max_words: 0,
            second_max_words: 0,
            ..ChunkerConfig::default()
        };
        assert_eq!(
            feed(&tokens(text), whole_clauses),
            [
                "Dr. Lee says 4.5 g/dL is fine.",
                "J. Smith agrees with Dr. Lee e.g. here."
            ]
        );
    }

    #[test]
    fn punctuation_at_the_end_of_a_token_waits_for_the_next_one() {
        let mut c = ClauseChunker::new(FOUR_WORD_FIRST_CUT);
        assert!(c.push("It is 4.").is_empty(), "could be a decimal");
        assert!(c.push("5 today").is_empty());
        let chunks = c.push(". Then");
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].text, "It is 4.5 today.");
        assert_eq!(c.finish().unwrap().text, "Then");
    }

    #[test]
    fn quotes_stay_with_their_sentence_and_offsets_point_into_the_text() {
        let text = "He said \"stop.\" Then he left.";
        let mut c = ClauseChunker::new(ChunkerConfig::default());
        let mut chunks = c.push(text);
        chunks.extend(c.finish());
        assert_eq!(chunks[0].text, "He said \"stop.\"");
        assert_eq!(&text[chunks[1].start..], "Then he left.");
        assert_eq!(chunks[1].index, 1);
    }

    #[test]
    fn long_text_without_punctuation_is_cut_at_spaces() {
        let text = "word ".repeat(2_000); // 10 kB
        let chunks = feed(&[text.as_str()], ChunkerConfig::default());
        assert!(chunks.len() >= 30, "{} chunks", chunks.len());
        assert!(chunks
            .iter()
            .all(|c| c.len() <= 300 && !c.contains("wo rd")));
        assert_eq!(chunks.iter().map(|c| words(c)).sum::<usize>(), 2_000);
    }

    #[test]
    fn long_sentence_is_cut_at_its_last_clause_boundary() {
        let text = format!(
            "{}, and then {}.",
            "a ".repeat(100).trim(),
            "b ".repeat(100).trim()
        );
        let config = ChunkerConfig {
            first_min_words: 3,
            first_max_words: 0,
            second_max_words: 0,
            max_chars: 250,
        };
        let chunks = feed(&[text.as_str()], config);
        assert_eq!(chunks[0], format!("{},", "a ".repeat(100).trim()));
    }

    #[test]
    fn a_long_first_clause_is_cut_early_so_the_voice_starts_sooner() {
        let text = "A high cholesterol number refers to a person's overall health, and more. Fine.";
        assert_eq!(
            feed(&tokens(text), ChunkerConfig::default()),
            [
                "A high cholesterol",
                "number refers to a person's overall",
                "health, and more.",
                "Fine.",
            ]
        );
        // The cut waits until the third word is known to be whole.
        let mut c = ClauseChunker::new(ChunkerConfig::default());
        assert!(c.push("A high cholest").is_empty());
        assert!(c.push("erol").is_empty());
        assert_eq!(c.push(" number")[0].text, "A high cholesterol");
    }

    #[test]
    fn the_first_cut_never_leaves_the_voice_on_a_word_no_phrase_ends_with() {
        let config = ChunkerConfig::default();
        // "are" and "the" wait for the next word; the clause's comma comes first here.
        assert_eq!(
            feed(
                &tokens("Your results are back, and they look good."),
                config
            ),
            ["Your results are back,", "and they look good."]
        );
        assert_eq!(
            feed(&tokens("Your level of the iron is normal today."), config),
            ["Your level of the iron", "is normal today."]
        );
        // At most two words more: a run of function words is cut all the same.
        assert_eq!(
            feed(&tokens("It is in the of a test."), config)[0],
            "It is in the of"
        );
    }

    #[test]
    fn empty_input_gives_no_chunks() {
        assert!(feed(&["", "  ", "\n"], ChunkerConfig::default()).is_empty());
    }
}
