//! Text normalisation for English voices: what a lab-results assistant writes ("HbA1c 6.5%",
//! "Hb 13.2 g/dL (ref 12.0–15.5)", "BP 120/80 mmHg", "03/15/2024 at 2:30 pm") becomes words that
//! espeak-ng reads correctly.
//!
//! Hand-written because no maintained crate covers this: number-to-words crates spell numbers but
//! know nothing of units, ranges, blood pressure or clinical abbreviations, and the reading rules
//! (decimals digit by digit, years in pairs, "oh five" in times) are ours to choose.
//!
//! The text is processed word by word (split at whitespace) and every source word keeps the span
//! of words it became, so a playback position can be mapped back to the original text.

use std::ops::Range;

/// The result of [`normalize`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Normalized {
    /// What the phonemizer should read.
    pub spoken: String,
    /// For every source word, in order: its bytes in the input and in [`Self::spoken`].
    pub words: Vec<WordMap>,
    /// Characters that were left out, and why.
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WordMap {
    pub source: Range<usize>,
    pub spoken: Range<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub text: String,
    pub reason: SkipReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Emoji and pictographs have no reading.
    Emoji,
    /// Letters of a script the English voice cannot pronounce (e.g. CJK, Cyrillic, Arabic).
    UnknownScript,
    /// Control and other invisible characters.
    Control,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = match self.reason {
            SkipReason::Emoji => "emoji",
            SkipReason::UnknownScript => "a script this voice cannot read",
            SkipReason::Control => "a control character",
        };
        write!(f, "{:?} ({why})", self.text)
    }
}

/// Normalises English text for speech.
pub fn normalize(text: &str) -> Normalized {
    let mut out = Normalized::default();
    let tokens: Vec<(Range<usize>, &str)> = split_words(text);
    let mut i = 0;
    while i < tokens.len() {
        let (range, word) = (&tokens[i].0, tokens[i].1);
        let next = tokens.get(i + 1).map(|t| t.1);
        // A unit reads as a unit after any quantity ("13.2", "120/80", "4.5–11.0"), and in the
        // singular only after exactly "1".
        let prev_number = i.checked_sub(1).and_then(|p| {
            let core = strip_punct(tokens[p].1).1;
            let core = core.trim_start_matches(COMPARATORS);
            parse_number(core).or_else(|| {
                core.starts_with(|c: char| c.is_ascii_digit())
                    .then_some(Number { is_one: false })
            })
        });
        // A lone dash between two numbers is a range: "4.5 – 11.0".
        let spoken = if is_dash(word)
            && prev_number.is_some()
            && next.is_some_and(|n| parse_number(strip_punct(n).1).is_some())
        {
            "to".to_string()
        } else if let Some(core) = date_part(&tokens, i) {
            let (lead, _, trail) = strip_punct(word);
            format!("{}{core}{}", clean_punct(lead), clean_punct(trail))
        } else {
            let (filtered, skipped) = filter_chars(word);
            out.skipped.extend(skipped);
            speak_word(&filtered, prev_number, next)
        };
        push_word(&mut out, range.clone(), &spoken);
        i += 1;
    }
    out
}

/// Written-out dates: "Mar 15, 2024", "March 15", "15 March 2024". The day becomes an ordinal,
/// an abbreviated month its full name, and the year is read in pairs.
fn date_part(tokens: &[(Range<usize>, &str)], i: usize) -> Option<String> {
    let core = |j: usize| tokens.get(j).map(|t| strip_punct(t.1).1);
    let here = core(i)?;
    let prev = i.checked_sub(1).and_then(core);
    let prev2 = i.checked_sub(2).and_then(core);
    let next = core(i + 1);
    let day = |s: Option<&str>| {
        s.filter(|s| all_digits(s) && s.len() <= 2)
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|d| (1..=31).contains(d))
    };
    let is_month = |s: Option<&str>| s.and_then(month_name).is_some();
    if let Some(month) = month_name(here) {
        return (day(next).is_some() || day(prev).is_some()).then(|| month.to_string());
    }
    if let Some(d) = day(Some(here)) {
        return (is_month(prev) || is_month(next)).then(|| ordinal(d));
    }
    if all_digits(here) && here.len() == 4 {
        let year: u64 = here.parse().ok()?;
        let after_date = is_month(prev) || (day(prev).is_some() && is_month(prev2));
        return (after_date && (1100..=2099).contains(&year)).then(|| year_words(year));
    }
    None
}

fn month_name(s: &str) -> Option<&'static str> {
    const ABBREVIATED: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let s = if s == "Sept" { "Sep" } else { s };
    MONTHS
        .iter()
        .zip(ABBREVIATED)
        .find(|(full, short)| **full == s || *short == s)
        .map(|(full, _)| *full)
}

/// No normalisation (voices in other languages): the words as they are, each mapped to itself.
pub fn passthrough(text: &str) -> Normalized {
    let mut out = Normalized::default();
    for (range, word) in split_words(text) {
        push_word(&mut out, range, word);
    }
    out
}

fn push_word(out: &mut Normalized, source: Range<usize>, spoken: &str) {
    let mut spoken = spoken.trim();
    // Leading punctuation (from an opening bracket) belongs after the previous word, and means
    // nothing at the start.
    let body = spoken.trim_start_matches([',', '.', ';', ':', '!', '?']);
    let lead = &spoken[..spoken.len() - body.len()];
    if !lead.is_empty() {
        if !out.spoken.is_empty() && !out.spoken.ends_with([',', '.', ';', ':', '!', '?']) {
            out.spoken.push_str(lead);
        }
        spoken = body.trim_start();
    }
    if spoken.is_empty() {
        return;
    }
    if !out.spoken.is_empty() {
        out.spoken.push(' ');
    }
    let start = out.spoken.len();
    out.spoken.push_str(spoken);
    out.words.push(WordMap {
        source,
        spoken: start..out.spoken.len(),
    });
}

fn split_words(text: &str) -> Vec<(Range<usize>, &str)> {
    let mut words = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                words.push((s..i, &text[s..i]));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        words.push((s..text.len(), &text[s..]));
    }
    words
}

/// Removes what cannot be spoken, reporting it.
fn filter_chars(word: &str) -> (String, Vec<Skipped>) {
    let mut kept = String::with_capacity(word.len());
    let mut skipped: Vec<Skipped> = Vec::new();
    for c in word.chars() {
        let reason = if is_emoji(c) {
            Some(SkipReason::Emoji)
        } else if c.is_control() || is_invisible(c) {
            Some(SkipReason::Control)
        } else if c.is_alphabetic() && !is_latin(c) && !is_greek_symbol(c) {
            Some(SkipReason::UnknownScript)
        } else {
            None
        };
        match reason {
            None => kept.push(c),
            Some(reason) => match skipped.last_mut() {
                Some(last) if last.reason == reason => last.text.push(c),
                _ => skipped.push(Skipped {
                    text: c.to_string(),
                    reason,
                }),
            },
        }
    }
    // Emoji sequences carry joiners and variation selectors; they belong to the emoji.
    for s in &mut skipped {
        s.text.retain(|c| !matches!(c, '\u{200d}' | '\u{fe0f}'));
    }
    skipped.retain(|s| !s.text.is_empty());
    (kept, skipped)
}

fn is_emoji(c: char) -> bool {
    matches!(c as u32,
        0x1F000..=0x1FAFF | 0x2600..=0x27BF | 0x2B00..=0x2BFF | 0xFE0F | 0x200D | 0xE0020..=0xE007F)
}

fn is_invisible(c: char) -> bool {
    matches!(c as u32, 0x200B..=0x200F | 0x2060..=0x206F | 0xFEFF)
}

/// Latin letters, with their accented forms (café, naïve).
fn is_latin(c: char) -> bool {
    c.is_ascii_alphabetic()
        || matches!(c as u32, 0x00C0..=0x024F | 0x1E00..=0x1EFF)
        || c == 'ª'
        || c == 'º'
}

/// Greek letters used as symbols in medical text (µ, α, β ...) are read by name.
fn is_greek_symbol(c: char) -> bool {
    greek_name(c).is_some()
}

fn greek_name(c: char) -> Option<&'static str> {
    Some(match c {
        'µ' | 'μ' => "micro",
        'α' => "alpha",
        'β' => "beta",
        'γ' => "gamma",
        'δ' | 'Δ' => "delta",
        _ => return None,
    })
}

fn is_dash(word: &str) -> bool {
    matches!(word, "-" | "–" | "—" | "−")
}

const LEADING: &[char] = &['(', '[', '"', '\'', '“', '‘', '«'];
const TRAILING: &[char] = &[
    ')', ']', '"', '\'', '”', '’', '»', ',', '.', ';', ':', '!', '?', '…',
];

/// Splits leading and trailing punctuation off a word: ("(", "12.0", "),").
fn strip_punct(word: &str) -> (&str, &str, &str) {
    let core_start = word.len() - word.trim_start_matches(LEADING).len();
    let rest = &word[core_start..];
    let core = rest.trim_end_matches(TRAILING);
    (&word[..core_start], core, &rest[core.len()..])
}

/// One source word to spoken words.
fn speak_word(word: &str, prev_number: Option<Number>, next: Option<&str>) -> String {
    if word.is_empty() {
        return String::new();
    }
    // Abbreviations with their own period ("Dr.") come before punctuation is split off.
    let (lead, trailing_core) = {
        let start = word.len() - word.trim_start_matches(LEADING).len();
        (&word[..start], &word[start..])
    };
    for (abbrev, spoken) in DOTTED_ABBREVIATIONS {
        if let Some(rest) = trailing_core.strip_prefix(abbrev) {
            if rest.chars().all(|c| TRAILING.contains(&c)) {
                // "Dr." keeps no period; a following sentence period is still there in `rest`.
                let rest = rest.trim_start_matches('.');
                return format!("{}{spoken}{}", clean_punct(lead), clean_punct(rest));
            }
        }
    }
    let (lead, core, trail) = strip_punct(word);
    let next_core = next.map(|n| strip_punct(n).1);
    let spoken = speak_core(core, prev_number, next_core);
    format!("{}{}{}", clean_punct(lead), spoken, clean_punct(trail))
}

/// Keeps punctuation espeak-ng uses for clauses and pauses; quotes and brackets become pauses
/// at most (a bracketed aside reads best with commas around it).
fn clean_punct(p: &str) -> String {
    let mut out = String::new();
    for c in p.chars() {
        let mapped = match c {
            ',' | '.' | ';' | ':' | '!' | '?' => Some(c),
            '…' => Some('.'),
            '(' | ')' | '[' | ']' => Some(','),
            _ => None,
        };
        if let Some(m) = mapped {
            if !out.ends_with(m) {
                out.push(m);
            }
        }
    }
    // "(... mg)." is one sentence end, not a pause and then an end.
    if out.len() > 1 && out.contains(['.', '!', '?', ';', ':']) {
        out.retain(|c| c != ',');
    }
    out
}

const DOTTED_ABBREVIATIONS: &[(&str, &str)] = &[
    ("Dr.", "Doctor"),
    ("Mr.", "Mister"),
    ("Mrs.", "Missus"),
    ("Ms.", "Miz"),
    ("Prof.", "Professor"),
    ("vs.", "versus"),
    ("e.g.", "for example"),
    ("i.e.", "that is"),
    ("etc.", "et cetera"),
    ("approx.", "approximately"),
    ("a.m.", "eh em"),
    ("p.m.", "p m"),
];

/// Spellings espeak-ng reads right, found by listening to its phonemes.
const ABBREVIATIONS: &[(&str, &str)] = &[
    ("HbA1c", "H B A1C"),
    ("HBA1C", "H B A1C"),
    ("A1c", "A1C"),
    ("LDL", "L D L"),
    ("HDL", "H D L"),
    ("LDL-C", "L D L C"),
    ("HDL-C", "H D L C"),
    ("eGFR", "E G F R"),
    ("GFR", "G F R"),
    ("BP", "blood pressure"),
    ("WBC", "W B C"),
    ("RBC", "R B C"),
    ("TSH", "T S H"),
    ("ALT", "A L T"),
    ("AST", "A S T"),
    ("BMI", "B M I"),
    ("am", "eh em"),
    ("AM", "eh em"),
    ("pm", "p m"),
    ("PM", "p m"),
];

/// Units, with their singular and plural readings.
const UNITS: &[(&str, &str, &str)] = &[
    ("g/dL", "gram per deciliter", "grams per deciliter"),
    (
        "mg/dL",
        "milligram per deciliter",
        "milligrams per deciliter",
    ),
    ("mg/L", "milligram per liter", "milligrams per liter"),
    ("mmol/L", "millimole per liter", "millimoles per liter"),
    ("mmol/mol", "millimole per mole", "millimoles per mole"),
    ("µmol/L", "micromole per liter", "micromoles per liter"),
    ("μmol/L", "micromole per liter", "micromoles per liter"),
    ("umol/L", "micromole per liter", "micromoles per liter"),
    (
        "mEq/L",
        "milliequivalent per liter",
        "milliequivalents per liter",
    ),
    (
        "ng/mL",
        "nanogram per milliliter",
        "nanograms per milliliter",
    ),
    (
        "pg/mL",
        "picogram per milliliter",
        "picograms per milliliter",
    ),
    ("U/L", "unit per liter", "units per liter"),
    (
        "IU/L",
        "international unit per liter",
        "international units per liter",
    ),
    (
        "mIU/L",
        "milli international unit per liter",
        "milli international units per liter",
    ),
    ("mL/min", "milliliter per minute", "milliliters per minute"),
    (
        "mL/min/1.73m²",
        "milliliter per minute per one point seven three square meters",
        "milliliters per minute per one point seven three square meters",
    ),
    ("mmHg", "millimeter of mercury", "millimeters of mercury"),
    ("bpm", "beat per minute", "beats per minute"),
    ("kg", "kilogram", "kilograms"),
    ("g", "gram", "grams"),
    ("mg", "milligram", "milligrams"),
    ("mcg", "microgram", "micrograms"),
    ("µg", "microgram", "micrograms"),
    ("mL", "milliliter", "milliliters"),
    ("µL", "microliter", "microliters"),
    ("μL", "microliter", "microliters"),
    ("uL", "microliter", "microliters"),
    ("dL", "deciliter", "deciliters"),
    ("ml", "milliliter", "milliliters"),
    ("L", "liter", "liters"),
    ("cm", "centimeter", "centimeters"),
    ("mm", "millimeter", "millimeters"),
    ("km", "kilometer", "kilometers"),
    ("fL", "femtoliter", "femtoliters"),
    ("pg", "picogram", "picograms"),
    ("%", "percent", "percent"),
    ("°C", "degree Celsius", "degrees Celsius"),
    ("°F", "degree Fahrenheit", "degrees Fahrenheit"),
    ("h", "hour", "hours"),
    ("hrs", "hour", "hours"),
    ("min", "minute", "minutes"),
];

/// Cell counts: "×10^9/L" and its spellings.
fn cell_count_unit(s: &str) -> Option<String> {
    let rest = s
        .strip_prefix('×')
        .or_else(|| s.strip_prefix('x'))
        .or_else(|| s.strip_prefix('X'))
        .or_else(|| s.strip_prefix('*'))
        .unwrap_or(s);
    let (exp, per) = if let Some(r) = rest.strip_prefix("10^") {
        let digits: String = r.chars().take_while(char::is_ascii_digit).collect();
        (digits.parse::<u64>().ok()?, &r[digits.len()..])
    } else if let Some(r) = rest.strip_prefix("10") {
        let sup: String = r
            .chars()
            .take_while(|c| superscript_digit(*c).is_some())
            .collect();
        if sup.is_empty() {
            return None;
        }
        let value = sup
            .chars()
            .filter_map(superscript_digit)
            .fold(0u64, |v, d| v * 10 + u64::from(d));
        (value, &r[sup.len()..])
    } else {
        return None;
    };
    let per = match per {
        "" => String::new(),
        "/L" => " per liter".into(),
        "/uL" | "/µL" | "/μL" => " per microliter".into(),
        "/mL" => " per milliliter".into(),
        _ => return None,
    };
    let prefix = if rest.len() < s.len() { "times " } else { "" };
    Some(format!("{prefix}ten to the {}{per}", ordinal(exp)))
}

fn superscript_digit(c: char) -> Option<u32> {
    "⁰¹²³⁴⁵⁶⁷⁸⁹".chars().position(|s| s == c).map(|p| p as u32)
}

/// What a unit needs to know about the quantity before it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Number {
    is_one: bool,
}

fn parse_number(s: &str) -> Option<Number> {
    let (neg, digits) = number_parts(s)?;
    Some(Number {
        is_one: !neg && digits == "1",
    })
}

/// Validates a written number (optional sign, digits with optional thousands commas, optional
/// fraction) and returns (negative, digits without commas).
fn number_parts(s: &str) -> Option<(bool, String)> {
    let (neg, body) = match s.strip_prefix(['-', '−']) {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if body.is_empty() {
        return None;
    }
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    if let Some(f) = frac {
        if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    if int.is_empty() && frac.is_none() {
        return None;
    }
    let int_digits: String = if int.contains(',') {
        let groups: Vec<&str> = int.split(',').collect();
        let ok = !groups[0].is_empty()
            && groups[0].len() <= 3
            && groups[1..].iter().all(|g| g.len() == 3);
        if !ok {
            return None;
        }
        groups.concat()
    } else {
        int.to_string()
    };
    if !int_digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits = if int_digits.is_empty() {
        "0".to_string()
    } else {
        int_digits
    };
    if let Some(f) = frac {
        digits.push('.');
        digits.push_str(f);
    }
    Some((neg, digits))
}

/// "4.5" -> "four point five", "-3" -> "minus three", "1,200" -> "one thousand two hundred".
fn speak_number(s: &str) -> Option<String> {
    let (neg, digits) = number_parts(s)?;
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (digits.as_str(), None),
    };
    let mut out = String::new();
    if neg {
        out.push_str("minus ");
    }
    out.push_str(&integer_words(int));
    if let Some(f) = frac {
        out.push_str(" point");
        for d in f.chars() {
            out.push(' ');
            out.push_str(digit_word(d));
        }
    }
    Some(out)
}

fn digit_word(d: char) -> &'static str {
    const DIGITS: [&str; 10] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ];
    d.to_digit(10).map_or("", |v| DIGITS[v as usize])
}

/// Cardinal words for a string of ASCII digits; numbers past the trillions are read digit by
/// digit, as people read long identifiers.
fn integer_words(digits: &str) -> String {
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return "zero".into();
    }
    if digits.len() > 15 {
        return digits.chars().map(digit_word).collect::<Vec<_>>().join(" ");
    }
    let n: u64 = digits.parse().expect("at most 15 ASCII digits fit in u64");
    cardinal(n)
}

/// `n` in words, as the voice says it: 1,250 is "one thousand two hundred fifty".
pub fn cardinal(n: u64) -> String {
    const ONES: [&str; 20] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 10] = [
        "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    ];
    const SCALES: [(u64, &str); 4] = [
        (1_000_000_000_000, "trillion"),
        (1_000_000_000, "billion"),
        (1_000_000, "million"),
        (1_000, "thousand"),
    ];
    if n < 20 {
        return ONES[n as usize].into();
    }
    if n < 100 {
        let (t, o) = (n / 10, n % 10);
        return if o == 0 {
            TENS[t as usize].into()
        } else {
            format!("{} {}", TENS[t as usize], ONES[o as usize])
        };
    }
    if n < 1000 {
        let (h, rest) = (n / 100, n % 100);
        return if rest == 0 {
            format!("{} hundred", ONES[h as usize])
        } else {
            format!("{} hundred {}", ONES[h as usize], cardinal(rest))
        };
    }
    for (scale, name) in SCALES {
        if n >= scale {
            let (high, rest) = (n / scale, n % scale);
            return if rest == 0 {
                format!("{} {name}", cardinal(high))
            } else {
                format!("{} {name} {}", cardinal(high), cardinal(rest))
            };
        }
    }
    unreachable!("every n >= 1000 is covered by a scale")
}

/// `n` as an ordinal in words: 21 is "twenty first".
pub fn ordinal(n: u64) -> String {
    let words = cardinal(n);
    let (head, last) = match words.rsplit_once(' ') {
        Some((h, l)) => (format!("{h} "), l.to_string()),
        None => (String::new(), words.clone()),
    };
    let last = match last.as_str() {
        "one" => "first".into(),
        "two" => "second".into(),
        "three" => "third".into(),
        "five" => "fifth".into(),
        "eight" => "eighth".into(),
        "nine" => "ninth".into(),
        "twelve" => "twelfth".into(),
        l if l.ends_with('y') => format!("{}ieth", &l[..l.len() - 1]),
        l => format!("{l}th"),
    };
    format!("{head}{last}")
}

/// Years in pairs: 1984 "nineteen eighty four", 2024 "twenty twenty four", 2005 "two thousand
/// five".
fn year_words(y: u64) -> String {
    match y {
        2000..=2009 => cardinal(y),
        1100..=2099 if y.is_multiple_of(100) => format!("{} hundred", cardinal(y / 100)),
        1100..=2099 if y % 100 < 10 => format!("{} oh {}", cardinal(y / 100), cardinal(y % 100)),
        1100..=2099 => format!("{} {}", cardinal(y / 100), cardinal(y % 100)),
        _ => cardinal(y),
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// The month names, January first.
pub const fn month_names() -> &'static [&'static str; 12] {
    &MONTHS
}

fn date_words(year: u64, month: u64, day: u64) -> Option<String> {
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(format!(
        "{} {}, {}",
        MONTHS[(month - 1) as usize],
        ordinal(day),
        year_words(year)
    ))
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// "2024-03-15" (ISO) or "03/15/2024" (US order).
fn speak_date(s: &str) -> Option<String> {
    let parse = |p: &str| all_digits(p).then(|| p.parse::<u64>().ok()).flatten();
    let iso: Vec<&str> = s.split('-').collect();
    if iso.len() == 3 && iso[0].len() == 4 && iso[1].len() <= 2 && iso[2].len() <= 2 {
        return date_words(parse(iso[0])?, parse(iso[1])?, parse(iso[2])?);
    }
    let us: Vec<&str> = s.split('/').collect();
    if us.len() == 3 && us[0].len() <= 2 && us[1].len() <= 2 && us[2].len() == 4 {
        return date_words(parse(us[2])?, parse(us[0])?, parse(us[1])?);
    }
    None
}

/// "14:30" -> "fourteen thirty", "2:05" -> "two oh five", "7:00" -> "seven o'clock".
fn speak_time(s: &str) -> Option<String> {
    let (h, m) = s.split_once(':')?;
    if !all_digits(h) || h.len() > 2 || m.len() != 2 || !all_digits(m) {
        return None;
    }
    let (h, m): (u64, u64) = (h.parse().ok()?, m.parse().ok()?);
    if h > 24 || m > 59 {
        return None;
    }
    Some(match m {
        0 => format!("{} o'clock", cardinal(h)),
        1..=9 => format!("{} oh {}", cardinal(h), cardinal(m)),
        _ => format!("{} {}", cardinal(h), cardinal(m)),
    })
}

fn unit_words(unit: &str, singular: bool) -> Option<String> {
    if let Some(words) = cell_count_unit(unit) {
        return Some(words);
    }
    UNITS
        .iter()
        .find(|(u, _, _)| *u == unit)
        .map(|(_, one, many)| if singular { *one } else { *many }.to_string())
}

/// Signs before a value: "<5", ">90", "≥60", "~3".
const COMPARATORS: &[char] = &['<', '>', '≤', '≥', '~'];

fn comparator_words(c: char) -> &'static str {
    match c {
        '<' => "less than",
        '>' => "greater than",
        '≤' => "less than or equal to",
        '≥' => "greater than or equal to",
        _ => "about",
    }
}

fn speak_core(core: &str, prev_number: Option<Number>, next_core: Option<&str>) -> String {
    if core.is_empty() {
        return String::new();
    }
    if let Some(sign) = core.chars().next().filter(|c| COMPARATORS.contains(c)) {
        let rest = &core[sign.len_utf8()..];
        if let Some(value) = speak_compound(rest, next_core) {
            return format!("{} {value}", comparator_words(sign));
        }
    }
    if let Some((_, spoken)) = ABBREVIATIONS.iter().find(|(a, _)| *a == core) {
        // "am"/"pm" are only times after a number; otherwise the English words.
        let is_meridiem = matches!(core, "am" | "AM" | "pm" | "PM");
        if !is_meridiem || prev_number.is_some() {
            return spoken.to_string();
        }
    }
    if let Some(words) = speak_number(core) {
        return words;
    }
    if let Some(words) = speak_date(core).or_else(|| speak_time(core)) {
        return words;
    }
    // A unit after a number ("5 mg"): singular after exactly "1".
    if prev_number.is_some() || cell_count_unit(core).is_some() {
        if let Some(words) = unit_words(core, prev_number.is_some_and(|n| n.is_one)) {
            return words;
        }
    }
    if let Some(words) = speak_compound(core, next_core) {
        return words;
    }
    spell_symbols(core)
}

/// Tokens that mix a number with something: "45%", "4.5g/dL", "4.5–11.0", "120/80", "7am",
/// "2:30pm", "1st", "$5", "5x10^9/L".
fn speak_compound(core: &str, next_core: Option<&str>) -> Option<String> {
    // Ordinals.
    for suffix in ["st", "nd", "rd", "th"] {
        if let Some(n) = core.strip_suffix(suffix) {
            if all_digits(n) && n.len() <= 15 {
                return Some(ordinal(n.parse().ok()?));
            }
        }
    }
    // Money.
    if let Some(amount) = core.strip_prefix('$') {
        let n = parse_number(amount)?;
        let words = speak_number(amount)?;
        return Some(format!(
            "{words} {}",
            if n.is_one { "dollar" } else { "dollars" }
        ));
    }
    // Times with a meridiem: "2:30pm", "7am".
    for (suffix, spoken) in [
        ("am", "eh em"),
        ("pm", "p m"),
        ("AM", "eh em"),
        ("PM", "p m"),
    ] {
        if let Some(t) = core.strip_suffix(suffix) {
            if let Some(time) = speak_time(t) {
                return Some(format!("{} {spoken}", time.trim_end_matches(" o'clock")));
            }
            if all_digits(t) && t.len() <= 2 {
                return Some(format!("{} {spoken}", cardinal(t.parse().ok()?)));
            }
        }
    }
    // Ranges: "4.5–11.0", "70-100".
    for dash in ['–', '—', '-', '−'] {
        if let Some((a, b)) = core.split_once(dash) {
            if a.is_empty() {
                continue;
            }
            if let (Some(x), Some(y)) = (speak_number(a), speak_quantity(b)) {
                return Some(format!("{x} to {y}"));
            }
        }
    }
    // Two numbers over a slash: blood pressure "120/80", or a ratio.
    if let Some((a, b)) = core.split_once('/') {
        if all_digits(a) && all_digits(b) {
            let bp = next_core == Some("mmHg") || (a.len() >= 2 && b.len() >= 2);
            let x = speak_number(a)?;
            let y = speak_number(b)?;
            return Some(if bp {
                format!("{x} over {y}")
            } else {
                format!("{x} out of {y}")
            });
        }
    }
    speak_quantity(core)
}

/// A number with a unit glued on: "45%", "4.5g/dL", "5x10^9/L".
fn speak_quantity(s: &str) -> Option<String> {
    if let Some(words) = speak_number(s) {
        return Some(words);
    }
    let split = s
        .char_indices()
        .find(|&(i, c)| {
            i > 0 && !(c.is_ascii_digit() || c == '.' || c == ',') && !(i == 0 && c == '-')
        })
        .map(|(i, _)| i)?;
    let (num, unit) = s.split_at(split);
    let n = parse_number(num)?;
    let unit_spoken = match unit.strip_prefix('/') {
        // A count per volume: "250,000/µL" is "per microliter".
        Some(per) if cell_count_unit(unit).is_none() => format!("per {}", unit_words(per, true)?),
        _ => unit_words(unit, n.is_one)?,
    };
    Some(format!("{} {unit_spoken}", speak_number(num)?))
}

/// Symbols espeak-ng would skip or misread, as words; anything else is left to espeak-ng.
fn spell_symbols(core: &str) -> String {
    let mut out = String::with_capacity(core.len());
    for c in core.chars() {
        let word = match c {
            '&' => Some(" and "),
            '+' => Some(" plus "),
            '=' => Some(" equals "),
            '@' => Some(" at "),
            '#' => Some(" number "),
            '%' => Some(" percent "),
            '<' => Some(" less than "),
            '>' => Some(" greater than "),
            '≤' => Some(" less than or equal to "),
            '≥' => Some(" greater than or equal to "),
            '°' => Some(" degrees "),
            '×' => Some(" times "),
            '/' => Some(" or "),
            '~' => Some(" about "),
            '_' | '*' | '^' | '|' | '\\' | '`' | '{' | '}' => Some(" "),
            _ => greek_name(c),
        };
        match word {
            Some(w) => out.push_str(w),
            None => out.push(c),
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_table() {
        let table: &[(&str, &str)] = &[
            // Numbers and decimals.
            ("7", "seven"),
            ("42", "forty two"),
            ("1,250", "one thousand two hundred fifty"),
            ("1000000", "one million"),
            ("4.5", "four point five"),
            ("0.25", "zero point two five"),
            ("-3", "minus three"),
            ("21st", "twenty first"),
            ("$5", "five dollars"),
            // Ranges.
            ("4.5–11.0", "four point five to eleven point zero"),
            ("70-100", "seventy to one hundred"),
            ("4.5 – 11.0", "four point five to eleven point zero"),
            // Units.
            ("13.2 g/dL", "thirteen point two grams per deciliter"),
            ("1 mg/dL", "one milligram per deciliter"),
            ("95 mg/dL", "ninety five milligrams per deciliter"),
            ("5.4 mmol/L", "five point four millimoles per liter"),
            ("6.5%", "six point five percent"),
            (
                "7.2 ×10^9/L",
                "seven point two times ten to the ninth per liter",
            ),
            (
                "4.5x10^9/L",
                "four point five times ten to the ninth per liter",
            ),
            (
                "250 ×10⁹/L",
                "two hundred fifty times ten to the ninth per liter",
            ),
            ("4.5g/dL", "four point five grams per deciliter"),
            ("135 mmHg", "one hundred thirty five millimeters of mercury"),
            ("250,000/µL", "two hundred fifty thousand per microliter"),
            ("<15 ng/mL", "less than fifteen nanograms per milliliter"),
            ("eGFR >90 mL/min/1.73m²", "E G F R greater than ninety milliliters per minute per one point seven three square meters"),
            ("(48 mmol/mol).", "forty eight millimoles per mole."),
            // Blood pressure.
            ("120/80", "one hundred twenty over eighty"),
            (
                "BP 120/80 mmHg",
                "blood pressure one hundred twenty over eighty millimeters of mercury",
            ),
            ("1/3", "one out of three"),
            // Dates and times.
            ("2024-03-15", "March fifteenth, twenty twenty four"),
            ("03/15/2024", "March fifteenth, twenty twenty four"),
            ("2005-01-01", "January first, two thousand five"),
            ("Mar 15, 2024", "March fifteenth, twenty twenty four"),
            ("on 3 June 1999.", "on third June nineteen ninety nine."),
            ("May 2024 was busy", "May twenty twenty four was busy"),
            ("in 2024 people", "in two thousand twenty four people"),
            ("You may 3 times", "You may three times"),
            ("14:30", "fourteen thirty"),
            ("2:05 pm", "two oh five p m"),
            ("7:00", "seven o'clock"),
            ("7am", "seven eh em"),
            ("2:30pm", "two thirty p m"),
            // Abbreviations.
            ("Dr. Smith", "Doctor Smith"),
            ("HbA1c", "H B A1C"),
            ("LDL and HDL", "L D L and H D L"),
            ("eGFR", "E G F R"),
            ("I am here", "I am here"),
            // Punctuation survives; brackets become pauses.
            ("Hello, world.", "Hello, world."),
            (
                "Hb 13.2 (ref 12.0–15.5)",
                "Hb thirteen point two, ref twelve point zero to fifteen point five,",
            ),
            ("(aside)", "aside,"),
            ("It is 5.", "It is five."),
            ("See Dr. Lee.", "See Doctor Lee."),
            ("salt & pepper", "salt and pepper"),
        ];
        for (input, expected) in table {
            assert_eq!(normalize(input).spoken, *expected, "input: {input:?}");
        }
    }

    #[test]
    fn emoji_and_unknown_scripts_are_skipped_and_reported() {
        let n = normalize("Great 👍 result 你好 café");
        assert_eq!(n.spoken, "Great result café");
        assert_eq!(
            n.skipped,
            vec![
                Skipped {
                    text: "👍".into(),
                    reason: SkipReason::Emoji
                },
                Skipped {
                    text: "你好".into(),
                    reason: SkipReason::UnknownScript
                },
            ]
        );
    }

    #[test]
    fn empty_and_whitespace_give_nothing() {
        assert_eq!(normalize(""), Normalized::default());
        assert_eq!(normalize(" \n\t "), Normalized::default());
    }

    #[test]
    fn every_source_word_maps_to_its_spoken_words() {
        let text = "Hb 13.2 g/dL today";
        let n = normalize(text);
        let pairs: Vec<(&str, &str)> = n
            .words
            .iter()
            .map(|w| (&text[w.source.clone()], &n.spoken[w.spoken.clone()]))
            .collect();
        assert_eq!(
            pairs,
            [
                ("Hb", "Hb"),
                ("13.2", "thirteen point two"),
                ("g/dL", "grams per deciliter"),
                ("today", "today"),
            ]
        );
    }

    #[test]
    fn huge_numbers_are_read_digit_by_digit() {
        assert_eq!(
            normalize("12345678901234567").spoken,
            "one two three four five six seven eight nine zero one two three four five six seven"
        );
    }

    #[test]
    fn ordinals_and_years() {
        assert_eq!(ordinal(12), "twelfth");
        assert_eq!(ordinal(20), "twentieth");
        assert_eq!(ordinal(103), "one hundred third");
        assert_eq!(year_words(1984), "nineteen eighty four");
        assert_eq!(year_words(1905), "nineteen oh five");
        assert_eq!(year_words(1900), "nineteen hundred");
    }
}
