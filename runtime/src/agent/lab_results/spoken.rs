//! Numbers, dates and digit strings as callers say them and as Whisper or an LLM writes them:
//! "13.5", "thirteen point five", "March 4th, 1961", "the fourth of March nineteen sixty one",
//! "3/4/1961", "1 2 3 4", "one two three four".
//!
//! Everything works on [`tokens`]: lower-case words with the punctuation that separates them
//! removed, so the gate (date of birth, PIN) and the guard (numbers in an answer) read text the
//! same way.

use std::sync::LazyLock;

use talkline_tts::normalize::{cardinal, month_names, ordinal};

/// A calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    pub year: i32,
    pub month: u32,
    pub day: u32,
}

// The words are the TTS normalizer's, so what the agent understands is spelled as what it says.
const MONTHS: &[&str; 12] = month_names();

impl Date {
    /// A real date (February 30th is not one).
    pub fn new(year: i32, month: u32, day: u32) -> Option<Date> {
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let days = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return None,
        };
        (1..=days)
            .contains(&day)
            .then_some(Date { year, month, day })
    }

    /// The date at the start of a FHIR `date` or `dateTime` ("2024-03-15", "2024-03-15T08:30:00Z").
    pub fn parse_iso(s: &str) -> Option<Date> {
        let head = s.get(..10)?;
        let mut parts = head.split('-');
        let year = parts.next().filter(|p| p.len() == 4)?.parse().ok()?;
        let month = parts.next().filter(|p| p.len() == 2)?.parse().ok()?;
        let day = parts.next().filter(|p| p.len() == 2)?.parse().ok()?;
        Date::new(year, month, day)
    }

    /// "March 15, 2024": what the TTS normalizer reads as "March fifteenth, twenty twenty four".
    pub fn spoken(&self) -> String {
        let month = MONTHS[(self.month as usize - 1).min(11)];
        format!("{month} {}, {}", self.day, self.year)
    }
}

/// A date as said, perhaps without its year ("March 15").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaidDate {
    pub month: u32,
    pub day: u32,
    pub year: Option<i32>,
}

impl SaidDate {
    pub fn matches(&self, date: &Date) -> bool {
        self.month == date.month && self.day == date.day && self.year.is_none_or(|y| y == date.year)
    }
    pub fn full(&self) -> Option<Date> {
        Date::new(self.year?, self.month, self.day)
    }
}

/// Lower-case words. Separators (`,` `-` `/` `:` brackets) split words, except inside numeric
/// dates ("3/4/1961", "1961-03-04"), decimals ("13.5") and thousands ("1,200").
pub fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for piece in text.split_whitespace() {
        let piece = piece
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase();
        if numeric_date(&piece).is_some() {
            out.push(piece);
            continue;
        }
        let piece = drop_thousands_commas(&piece);
        for part in piece.split(|c: char| !(c.is_alphanumeric() || c == '.' || c == '\'')) {
            let part = part.trim_matches(|c: char| !c.is_alphanumeric());
            if !part.is_empty() {
                out.push(part.to_string());
            }
        }
    }
    out
}

/// "1,200" -> "1200"; other commas stay (they separate words).
fn drop_thousands_commas(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    for (i, &c) in chars.iter().enumerate() {
        let grouping = c == ','
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.len() >= i + 4
            && chars[i + 1..i + 4].iter().all(char::is_ascii_digit)
            && chars.get(i + 4).is_none_or(|c| !c.is_ascii_digit());
        if !grouping {
            out.push(c);
        }
    }
    out
}

/// "3/4/1961" (US order), "03-04-1961", "1961-03-04".
fn numeric_date(token: &str) -> Option<Date> {
    let sep = if token.contains('/') { '/' } else { '-' };
    let parts: Vec<&str> = token.split(sep).collect();
    if parts.len() != 3 || !parts.iter().all(|p| all_digits(p)) {
        return None;
    }
    let n = |p: &str| p.parse::<u32>().ok();
    if parts[0].len() == 4 {
        return Date::new(parts[0].parse().ok()?, n(parts[1])?, n(parts[2])?);
    }
    if parts[2].len() == 4 && parts[0].len() <= 2 && parts[1].len() <= 2 {
        return Date::new(parts[2].parse().ok()?, n(parts[0])?, n(parts[1])?);
    }
    None
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

static UNITS: LazyLock<[String; 20]> =
    LazyLock::new(|| std::array::from_fn(|n| cardinal(n as u64)));
static TENS: LazyLock<[String; 8]> =
    LazyLock::new(|| std::array::from_fn(|k| cardinal(20 + 10 * k as u64)));
static ORDINALS: LazyLock<[String; 20]> =
    LazyLock::new(|| std::array::from_fn(|n| ordinal(n as u64)));

fn unit_word(t: &str) -> Option<u64> {
    UNITS.iter().position(|u| *u == t).map(|p| p as u64)
}

fn tens_word(t: &str) -> Option<u64> {
    TENS.iter()
        .position(|u| *u == t)
        .map(|p| 20 + 10 * p as u64)
}

/// A single spoken digit, "oh" included (PINs and years are read that way).
fn digit_word(t: &str) -> Option<u32> {
    match t {
        "oh" | "o" => Some(0),
        _ => unit_word(t).filter(|d| *d < 10).map(|d| d as u32),
    }
}

/// The number written with digits at the start of `token` ("13.5", "126mg", "15th"), unless a
/// letter comes first ("a1c", "b12" are names).
pub fn leading_number(token: &str) -> Option<f64> {
    if !token.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let int_end = token
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(token.len());
    let mut end = int_end;
    if let Some(frac) = token[int_end..].strip_prefix('.') {
        let frac_len = frac
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(frac.len());
        if frac_len > 0 {
            end = int_end + 1 + frac_len;
        }
    }
    token[..end].parse().ok()
}

#[derive(Clone, Copy, PartialEq)]
enum Last {
    Nothing,
    Digit,
    Teen,
    Tens,
    Hundred,
    Thousand,
}

/// A number in words at `tokens[i]`: "thirteen point five", "one hundred and twenty six".
/// Returns the value and how many tokens it took.
pub fn number_words(tokens: &[String], i: usize) -> Option<(f64, usize)> {
    let (mut total, mut group, mut last, mut j) = (0u64, 0u64, Last::Nothing, i);
    while let Some(t) = tokens.get(j).map(String::as_str) {
        let after_scale = matches!(last, Last::Nothing | Last::Hundred | Last::Thousand);
        if let Some(n) = unit_word(t) {
            let ok = if n < 10 {
                after_scale || (last == Last::Tens)
            } else {
                after_scale
            };
            if !ok {
                break;
            }
            group += n;
            last = if n < 10 { Last::Digit } else { Last::Teen };
        } else if let Some(n) = tens_word(t).filter(|_| after_scale) {
            group += n;
            last = Last::Tens;
        } else if t == "hundred" && matches!(last, Last::Digit | Last::Teen | Last::Tens) {
            group *= 100;
            last = Last::Hundred;
        } else if t == "thousand" && !matches!(last, Last::Nothing | Last::Thousand) {
            total += group * 1000;
            group = 0;
            last = Last::Thousand;
        } else if t == "and"
            && matches!(last, Last::Hundred | Last::Thousand)
            && tokens
                .get(j + 1)
                .is_some_and(|n| unit_word(n).is_some() || tens_word(n).is_some())
        {
        } else {
            break;
        }
        j += 1;
    }
    let (fraction, taken) = spoken_fraction(tokens, j);
    if last == Last::Nothing && taken == 0 {
        return None;
    }
    Some(((total + group) as f64 + fraction, j + taken - i))
}

/// "point five" / "point 5": the fractional part and the tokens it took (0 when there is none).
fn spoken_fraction(tokens: &[String], j: usize) -> (f64, usize) {
    if tokens.get(j).map(String::as_str) != Some("point") {
        return (0.0, 0);
    }
    let mut digits = String::new();
    let mut k = j + 1;
    while let Some(t) = tokens.get(k) {
        match (digit_word(t), all_digits(t)) {
            (Some(d), _) => digits.push(char::from_digit(d, 10).unwrap_or('0')),
            (None, true) => digits.push_str(t),
            _ => break,
        }
        k += 1;
    }
    match format!("0.{digits}").parse::<f64>() {
        Ok(f) if !digits.is_empty() => (f, k - j),
        _ => (0.0, 0),
    }
}

/// A number at `tokens[i]`, in digits or in words, and how many tokens it took.
pub fn number_at(tokens: &[String], i: usize) -> Option<(f64, usize)> {
    let t = tokens.get(i)?;
    if let Some(n) = leading_number(t) {
        return Some((n, 1));
    }
    number_words(tokens, i)
}

fn month_at(t: &str) -> Option<u32> {
    const SHORT: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let t = if t == "sept" { "sep" } else { t };
    MONTHS
        .iter()
        .zip(SHORT)
        .position(|(full, short)| full.eq_ignore_ascii_case(t) || short == t)
        .map(|p| p as u32 + 1)
}

/// A day of the month: "4", "4th", "fourth", "four", "twenty first", "twenty-one".
fn day_at(tokens: &[String], i: usize) -> Option<(u32, usize)> {
    let t = tokens.get(i)?.as_str();
    let digits: String = t.chars().take_while(char::is_ascii_digit).collect();
    if !digits.is_empty() {
        let suffix = &t[digits.len()..];
        let ok = matches!(suffix, "" | "st" | "nd" | "rd" | "th");
        let day: u32 = digits.parse().ok()?;
        return (ok && (1..=31).contains(&day)).then_some((day, 1));
    }
    let small = |t: &str| {
        ORDINALS
            .iter()
            .position(|o| *o == t)
            .or_else(|| UNITS.iter().position(|u| *u == t))
            .map(|p| p as u32)
    };
    let tens = match t {
        "twenty" => Some(20),
        "thirty" => Some(30),
        "twentieth" => return Some((20, 1)),
        "thirtieth" => return Some((30, 1)),
        _ => None,
    };
    if let Some(tens) = tens {
        let unit = tokens
            .get(i + 1)
            .and_then(|n| small(n))
            .filter(|u| (1..10).contains(u));
        return match unit {
            Some(u) if tens + u <= 31 => Some((tens + u, 2)),
            _ => Some((tens, 1)),
        };
    }
    small(t).filter(|d| *d >= 1).map(|d| (d, 1))
}

/// A year: "1961", "nineteen sixty one", "nineteen oh five", "two thousand five", "twenty twelve".
fn year_at(tokens: &[String], i: usize) -> Option<(i32, usize)> {
    let t = tokens.get(i)?.as_str();
    if all_digits(t) && t.len() == 4 {
        return Some((t.parse().ok()?, 1));
    }
    let word = |k: usize| tokens.get(k).map(String::as_str);
    if t == "two" && word(i + 1) == Some("thousand") {
        let mut k = i + 2;
        if word(k) == Some("and") {
            k += 1;
        }
        return match number_words(tokens, k) {
            Some((n, used)) if n < 100.0 && n.fract() == 0.0 => {
                Some((2000 + n as i32, k + used - i))
            }
            _ => Some((2000, 2)),
        };
    }
    let century = unit_word(t)
        .filter(|n| *n >= 10)
        .or_else(|| (t == "twenty").then_some(20))? as i32;
    match word(i + 1)? {
        "hundred" => Some((century * 100, 2)),
        "oh" | "o" => {
            let d = digit_word(word(i + 2)?)? as i32;
            Some((century * 100 + d, 3))
        }
        next => {
            if let Some(n) = unit_word(next).filter(|n| *n >= 10) {
                return Some((century * 100 + n as i32, 2));
            }
            let tens = tens_word(next)? as i32;
            match word(i + 2).and_then(digit_word).filter(|d| *d > 0) {
                Some(d) => Some((century * 100 + tens + d as i32, 3)),
                None => Some((century * 100 + tens, 2)),
            }
        }
    }
}

/// A date starting at `tokens[i]`, and how many tokens it took.
pub fn date_at(tokens: &[String], i: usize) -> Option<(SaidDate, usize)> {
    let first = tokens.get(i)?;
    if let Some(d) = numeric_date(first) {
        let said = SaidDate {
            month: d.month,
            day: d.day,
            year: Some(d.year),
        };
        return Some((said, 1));
    }
    let skip = |k: usize, word: &str| {
        if tokens.get(k).is_some_and(|t| t == word) {
            k + 1
        } else {
            k
        }
    };
    // "March 4th 1961", "March the fourth, 1961".
    if let Some(month) = month_at(first) {
        let k = skip(i + 1, "the");
        let (day, used) = day_at(tokens, k)?;
        return Some(with_year(tokens, month, day, k + used, i));
    }
    // "4 March 1961", "the fourth of March nineteen sixty one".
    let k = skip(i, "the");
    let (day, used) = day_at(tokens, k)?;
    let k = skip(k + used, "of");
    let month = month_at(tokens.get(k)?)?;
    Some(with_year(tokens, month, day, k + 1, i))
}

fn with_year(tokens: &[String], month: u32, day: u32, k: usize, start: usize) -> (SaidDate, usize) {
    let k = if tokens.get(k).is_some_and(|t| t == "of" || t == "in") {
        k + 1
    } else {
        k
    };
    match year_at(tokens, k) {
        Some((year, used)) => (
            SaidDate {
                month,
                day,
                year: Some(year),
            },
            k + used - start,
        ),
        None => (
            SaidDate {
                month,
                day,
                year: None,
            },
            k - start,
        ),
    }
}

/// The first complete date (with its year) in `text`.
pub fn find_full_date(text: &str) -> Option<Date> {
    let tokens = tokens(text);
    (0..tokens.len()).find_map(|i| date_at(&tokens, i).and_then(|(d, _)| d.full()))
}

/// The digits a caller said, in order: "1 2 3 4", "1234", "one two three four", "12 34".
/// `None` when there are none, or when a word number ("twelve") makes the digits ambiguous.
pub fn said_digits(text: &str) -> Option<String> {
    let mut digits = String::new();
    for t in tokens(text) {
        if all_digits(&t) {
            digits.push_str(&t);
        } else if let Some(d) = digit_word(&t) {
            // "Oh, it's 1234": "oh" is a zero only among digits.
            let is_oh = d == 0 && t != "zero";
            if !(is_oh && digits.is_empty()) {
                digits.push(char::from_digit(d, 10)?);
            }
        } else if unit_word(&t).is_some() || tens_word(&t).is_some() || leading_number(&t).is_some()
        {
            return None;
        }
    }
    (!digits.is_empty()).then_some(digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> Option<Date> {
        Date::new(y, m, day)
    }

    #[test]
    fn dates_of_birth_in_common_spoken_forms() {
        let cases = [
            ("March 4th 1961", d(1961, 3, 4)),
            ("It's March 4, 1961.", d(1961, 3, 4)),
            ("3/4/1961", d(1961, 3, 4)),
            ("1961-03-04", d(1961, 3, 4)),
            ("the fourth of March nineteen sixty one", d(1961, 3, 4)),
            ("march the fourth, nineteen sixty-one", d(1961, 3, 4)),
            ("4 March 1961", d(1961, 3, 4)),
            ("July twenty-first, two thousand and five", d(2005, 7, 21)),
            ("Jan 30 nineteen oh five", d(1905, 1, 30)),
            ("February 30 1990", None),
            ("my birthday", None),
        ];
        for (text, want) in cases {
            assert_eq!(find_full_date(text), want, "{text}");
        }
    }

    #[test]
    fn numbers_in_digits_and_words() {
        let n = |s: &str| number_at(&tokens(s), 0);
        assert_eq!(n("13.5 g/dL"), Some((13.5, 1)));
        assert_eq!(n("thirteen point five"), Some((13.5, 3)));
        assert_eq!(n("one hundred and twenty six"), Some((126.0, 5)));
        assert_eq!(n("1,200"), Some((1200.0, 1)));
        assert_eq!(n("a1c"), None);
        assert_eq!(tokens("12-16, LDL"), ["12", "16", "ldl"]);
    }

    #[test]
    fn pins_spoken_as_digits() {
        assert_eq!(said_digits("1 2 3 4").as_deref(), Some("1234"));
        assert_eq!(
            said_digits("my pin is one two three four").as_deref(),
            Some("1234")
        );
        assert_eq!(said_digits("it's 12-34").as_deref(), Some("1234"));
        assert_eq!(said_digits("twelve thirty four"), None);
        assert_eq!(said_digits("I don't know"), None);
    }
}
