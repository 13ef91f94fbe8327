//! The guard on the LLM's answers: every number it says must be in the patient's record.
//!
//! The allowed numbers and dates are exactly those of the record text the LLM was given
//! ([`super::templates::context_line`]): values, range bounds and measurement dates. Nothing
//! else passes: not numbers from the caller's question (a caller asking "is 200 bad?" must not
//! hear "your glucose is 200"), not counts, not doses. A date passes only as a whole ("March 15,
//! 2024" or "March 15"), so a day or a year alone cannot smuggle a number through.
//!
//! Numbers are read in digits and in words ("thirteen point five"). The lone word "one" is not
//! a number here ("one of your results"); "one point five" and "twenty one" are. Digits glued
//! after letters are names, not numbers ("A1c", "B12").
//!
//! The guard also stops answers that give medical advice (a dose, stopping a medicine, a
//! diagnosis): those belong to a nurse; and answers that recite the record listing
//! ([`RECORD_HEADER`]), which small models do.

use super::spoken::{date_at, number_at, tokens, Date};

/// Why an answer may not be spoken.
#[derive(Debug, Clone, PartialEq)]
pub enum Violation {
    /// Numbers or dates that are not in the record, as written in the answer.
    Unsupported(Vec<String>),
    MedicalAdvice,
    /// The answer recites the record listing it was given (minimum necessary: a follow-up
    /// answers the question, it does not read the chart).
    RecordEcho,
}

/// The numbers and dates one patient's record allows.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    numbers: Vec<f64>,
    dates: Vec<Date>,
}

enum Mention {
    Number(f64),
    Date(super::spoken::SaidDate),
}

/// Numbers and dates in `text`, each with the words it was written as.
fn mentions(text: &str) -> Vec<(Mention, String)> {
    let tokens = tokens(text);
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if let Some((date, used)) = date_at(&tokens, i) {
            out.push((Mention::Date(date), tokens[i..i + used].join(" ")));
            i += used;
        } else if let Some((value, used)) = number_at(&tokens, i) {
            let lone_one = used == 1 && tokens[i] == "one";
            if !lone_one {
                out.push((Mention::Number(value), tokens[i..i + used].join(" ")));
            }
            i += used;
        } else {
            i += 1;
        }
    }
    out
}

const ADVICE: &[&str] = &[
    "stop taking",
    "start taking",
    "stop your",
    "increase your dose",
    "decrease your dose",
    "change your dose",
    "dosage",
    "you have diabetes",
    "you are diabetic",
    "you have cancer",
    "diagnos",
    "prescri",
];

/// The heading of the record in the LLM's context; an answer that repeats it is reciting.
pub const RECORD_HEADER: &str = "The patient's released results:";

impl Guard {
    /// The allowed numbers and dates: everything mentioned in the record text.
    pub fn from_record(record_text: &str) -> Self {
        let mut guard = Guard::default();
        for (mention, _) in mentions(record_text) {
            match mention {
                Mention::Number(n) => guard.numbers.push(n),
                Mention::Date(d) => guard.dates.extend(d.full()),
            }
        }
        guard
    }

    fn allows_number(&self, n: f64) -> bool {
        self.numbers
            .iter()
            .any(|a| (a - n).abs() <= 1e-9 * a.abs().max(1.0))
    }

    /// Checks an answer (or the part of it generated so far).
    pub fn check(&self, answer: &str) -> Result<(), Violation> {
        let lower = answer.to_lowercase();
        if ADVICE.iter().any(|a| lower.contains(a)) {
            return Err(Violation::MedicalAdvice);
        }
        if lower.contains("released results") {
            return Err(Violation::RecordEcho);
        }
        let unsupported: Vec<String> = mentions(answer)
            .into_iter()
            .filter(|(m, _)| match m {
                Mention::Number(n) => !self.allows_number(*n),
                Mention::Date(d) => !self.dates.iter().any(|r| d.matches(r)),
            })
            .map(|(_, written)| written)
            .collect();
        if unsupported.is_empty() {
            Ok(())
        } else {
            Err(Violation::Unsupported(unsupported))
        }
    }

    /// Whether `text` mentions `value` (to tell which results an answer disclosed).
    pub fn mentions_number(text: &str, value: f64) -> bool {
        mentions(text).iter().any(|(m, _)| matches!(m, Mention::Number(n) if (n - value).abs() <= 1e-9 * value.abs().max(1.0)))
    }
}

/// The caller's words for the LLM, with every number and date replaced ("[number]", "[date]"),
/// the lone "one" included: a PIN or a date of birth said again never reaches the LLM, and the
/// guard would not let the LLM repeat the caller's numbers anyway. Case and punctuation go too.
pub fn redact_numbers(text: &str) -> String {
    let tokens = tokens(text);
    let mut out: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if let Some((_, used)) = date_at(&tokens, i) {
            out.push("[date]");
            i += used;
        } else if let Some((_, used)) = number_at(&tokens, i) {
            out.push("[number]");
            i += used;
        } else {
            out.push(&tokens[i]);
            i += 1;
        }
    }
    let mut redacted = out.join(" ");
    if text.trim_end().ends_with('?') {
        redacted.push('?');
    }
    redacted
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORD: &str = "- glucose: 126 milligrams per deciliter; normal range 70 to 99; high, measured on March 15, 2024.\n\
                          - hemoglobin: 13.5 grams per deciliter; normal range 12 to 16; normal, measured on March 15, 2024.";

    #[test]
    fn numbers_from_the_record_pass() {
        let guard = Guard::from_record(RECORD);
        assert_eq!(
            guard.check("Your glucose of 126 is above 99, the top of the range."),
            Ok(())
        );
        assert_eq!(
            guard.check("Hemoglobin: thirteen point five, normal is twelve to sixteen."),
            Ok(())
        );
        assert_eq!(
            guard.check("It was measured on March 15, 2024. One of them is high."),
            Ok(())
        );
        assert_eq!(guard.check("Your A1c result is not in this list."), Ok(()));
    }

    #[test]
    fn invented_numbers_and_dates_are_caught() {
        let guard = Guard::from_record(RECORD);
        assert_eq!(
            guard.check("Your glucose is 140."),
            Err(Violation::Unsupported(vec!["140".into()]))
        );
        assert_eq!(
            guard.check("It should be under one hundred and ten."),
            Err(Violation::Unsupported(vec!["one hundred and ten".into()]))
        );
        assert_eq!(
            guard.check("Retest on March 16, 2024."),
            Err(Violation::Unsupported(vec!["march 16 2024".into()]))
        );
        // A day or a year alone is not a date from the record.
        assert!(guard.check("Come back in 15 days.").is_err());
        assert!(guard.check("That was in 2024.").is_err());
    }

    #[test]
    fn the_callers_numbers_never_reach_the_llm() {
        assert_eq!(
            redact_numbers("My PIN is one two three four, born 3/4/1961. Is 126 bad?"),
            "my pin is [number] [number] [number] [number] born [date] is [number] bad?"
        );
    }

    #[test]
    fn medical_advice_is_stopped() {
        let guard = Guard::from_record(RECORD);
        assert_eq!(
            guard.check("You should stop taking metformin."),
            Err(Violation::MedicalAdvice)
        );
    }
}
