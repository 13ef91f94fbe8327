//! The sentences that disclose results. Every value, unit and range spoken comes from the record
//! through these templates, never from the LLM. They are written for the TTS normalizer:
//! numbers as plain decimals ("13.5", "12", never "12.0"), units as words ("grams per
//! deciliter"), dates as "March 15, 2024", and test names it spells right ("LDL" becomes
//! "L D L").

use super::fhir::Observation;

/// How a result compares with its reference range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    Normal,
    High,
    Low,
    /// Abnormal without a direction (interpretation `A`).
    Abnormal,
    /// Neither an interpretation nor a range to compare with.
    Unknown,
}

impl Flag {
    /// The lab's interpretation first; otherwise the value against the range.
    pub fn of(o: &Observation) -> Flag {
        match o.interpretation.as_deref() {
            Some("N") => return Flag::Normal,
            Some("H" | "HH" | "HU" | ">") => return Flag::High,
            Some("L" | "LL" | "LU" | "<") => return Flag::Low,
            Some("A" | "AA") => return Flag::Abnormal,
            _ => {}
        }
        match (o.low, o.high) {
            (_, Some(high)) if o.value > high => Flag::High,
            (Some(low), _) if o.value < low => Flag::Low,
            (None, None) => Flag::Unknown,
            _ => Flag::Normal,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Flag::Normal => "normal",
            Flag::High => "high",
            Flag::Low => "low",
            Flag::Abnormal => "abnormal",
            Flag::Unknown => "without a range",
        }
    }
}

/// A test: its LOINC codes, the name we say, and the words callers use for it. A bare
/// "cholesterol" is listed under all three cholesterol tests, so it reads all of them.
struct Test {
    loinc: &'static [&'static str],
    name: &'static str,
    synonyms: &'static [&'static str],
}

const TESTS: &[Test] = &[
    Test {
        loinc: &["718-7"],
        name: "hemoglobin",
        synonyms: &["hemoglobin", "haemoglobin", "hb", "hgb"],
    },
    Test {
        loinc: &["2345-7", "2339-0"],
        name: "glucose",
        synonyms: &["glucose", "sugar", "blood sugar"],
    },
    Test {
        loinc: &["4548-4"],
        name: "hemoglobin A1c",
        synonyms: &[
            "a1c",
            "hba1c",
            "hemoglobin a1c",
            "average sugar",
            "average blood sugar",
        ],
    },
    Test {
        loinc: &["2093-3"],
        name: "total cholesterol",
        synonyms: &["cholesterol", "total cholesterol"],
    },
    Test {
        loinc: &["2089-1", "13457-7", "18262-6"],
        name: "LDL cholesterol",
        synonyms: &["cholesterol", "ldl", "ldl cholesterol", "bad cholesterol"],
    },
    Test {
        loinc: &["2085-9"],
        name: "HDL cholesterol",
        synonyms: &["cholesterol", "hdl", "hdl cholesterol", "good cholesterol"],
    },
    Test {
        loinc: &["2571-8"],
        name: "triglycerides",
        synonyms: &["triglycerides", "triglyceride", "fats"],
    },
    Test {
        loinc: &["2160-0"],
        name: "creatinine",
        synonyms: &["creatinine", "kidney", "kidneys"],
    },
    Test {
        loinc: &["2823-3"],
        name: "potassium",
        synonyms: &["potassium"],
    },
    Test {
        loinc: &["2951-2"],
        name: "sodium",
        synonyms: &["sodium", "salt"],
    },
    Test {
        loinc: &["6690-2"],
        name: "white blood cell count",
        synonyms: &[
            "white blood cells",
            "white blood cell",
            "white count",
            "wbc",
        ],
    },
    Test {
        loinc: &["777-3"],
        name: "platelet count",
        synonyms: &["platelets", "platelet", "platelet count"],
    },
    Test {
        loinc: &["3016-3"],
        name: "TSH",
        synonyms: &["tsh", "thyroid"],
    },
    Test {
        loinc: &["1742-6"],
        name: "ALT",
        synonyms: &["alt", "liver"],
    },
];

fn test_of(o: &Observation) -> Option<&'static Test> {
    let loinc = o.loinc.as_deref()?;
    TESTS.iter().find(|t| t.loinc.contains(&loinc))
}

/// The name we say for a result.
pub fn name(o: &Observation) -> String {
    test_of(o).map_or_else(|| o.display.to_lowercase(), |t| t.name.to_string())
}

/// "13.5", "12", "0.25": the shortest decimal that reads back as the value.
pub fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Units as words (singular, plural); unknown units are passed to the TTS normalizer as they are.
const UNIT_WORDS: &[(&str, &str, &str)] = &[
    ("g/dL", "gram per deciliter", "grams per deciliter"),
    (
        "mg/dL",
        "milligram per deciliter",
        "milligrams per deciliter",
    ),
    ("mmol/L", "millimole per liter", "millimoles per liter"),
    (
        "mEq/L",
        "milliequivalent per liter",
        "milliequivalents per liter",
    ),
    ("%", "percent", "percent"),
    ("U/L", "unit per liter", "units per liter"),
    (
        "mIU/L",
        "milli international unit per liter",
        "milli international units per liter",
    ),
    (
        "uIU/mL",
        "micro international unit per milliliter",
        "micro international units per milliliter",
    ),
    (
        "10*3/uL",
        "thousand per microliter",
        "thousand per microliter",
    ),
    ("K/uL", "thousand per microliter", "thousand per microliter"),
    ("10*9/L", "billion per liter", "billion per liter"),
];

pub fn unit_words(unit: &str, value: f64) -> String {
    UNIT_WORDS.iter().find(|(u, _, _)| *u == unit).map_or_else(
        || unit.to_string(),
        |(_, one, many)| if value == 1.0 { *one } else { *many }.to_string(),
    )
}

fn quantity(o: &Observation) -> String {
    let unit = unit_words(&o.unit, o.value);
    if unit.is_empty() {
        number(o.value)
    } else {
        format!("{} {unit}", number(o.value))
    }
}

/// "12 to 16", "below 200", "at least 40".
fn range(o: &Observation) -> Option<String> {
    match (o.low, o.high) {
        (Some(low), Some(high)) => Some(format!("{} to {}", number(low), number(high))),
        (None, Some(high)) => Some(format!("up to {}", number(high))),
        (Some(low), None) => Some(format!("at least {}", number(low))),
        (None, None) => None,
    }
}

/// The start of a result's sentence: once the caller has heard it, the value is disclosed.
pub fn disclosure_marker(o: &Observation) -> String {
    format!("Your {} is {}", name(o), number(o.value))
}

/// One result in one sentence, its range and what the lab made of it.
pub fn result_sentence(o: &Observation) -> String {
    let head = format!("Your {} is {}", name(o), quantity(o));
    match (Flag::of(o), range(o)) {
        (Flag::Normal, Some(r)) => format!("{head}; the normal range is {r}, so it is normal."),
        (Flag::High, Some(r)) => format!("{head}, which is above the normal range of {r}."),
        (Flag::Low, Some(r)) => format!("{head}, which is below the normal range of {r}."),
        (Flag::Abnormal, Some(r)) => {
            format!("{head}; the normal range is {r}, and the lab marked it as abnormal.")
        }
        (Flag::Normal, None) => format!("{head}, which the lab marked as normal."),
        (Flag::High | Flag::Low | Flag::Abnormal, None) => {
            format!("{head}, which the lab marked as {}.", Flag::of(o).word())
        }
        (Flag::Unknown, _) => format!("{head}. The lab gave no normal range for it."),
    }
}

/// "You have 4 results: 3 normal and 1 high, your glucose."
pub fn summary(results: &[&Observation]) -> String {
    if results.is_empty() {
        return "You have no released results at the moment.".into();
    }
    let count = |flag: Flag| results.iter().filter(|o| Flag::of(o) == flag).count();
    let mut parts = Vec::new();
    for flag in [
        Flag::Normal,
        Flag::High,
        Flag::Low,
        Flag::Abnormal,
        Flag::Unknown,
    ] {
        let n = count(flag);
        if n == 0 {
            continue;
        }
        let mut part = format!("{n} {}", flag.word());
        if flag != Flag::Normal {
            let names: Vec<String> = results
                .iter()
                .filter(|o| Flag::of(o) == flag)
                .map(|o| name(o))
                .collect();
            part.push_str(&format!(", your {}", join_and(&names)));
        }
        parts.push(part);
    }
    let noun = if results.len() == 1 {
        "result"
    } else {
        "results"
    };
    format!(
        "You have {} {noun}: {}. Ask me about any of them.",
        results.len(),
        parts.join("; ")
    )
}

fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// The record line the LLM sees for a result (and the guard takes its allowed numbers from).
pub fn context_line(o: &Observation) -> String {
    let range = range(o).map_or_else(
        || "no normal range given".into(),
        |r| format!("normal range {r}"),
    );
    let date = o
        .effective
        .map_or_else(String::new, |d| format!(", measured on {}", d.spoken()));
    format!(
        "- {}: {}; {range}; {}{date}.",
        name(o),
        quantity(o),
        Flag::of(o).word()
    )
}

/// Words of `text` with single spaces around, for whole-word matching.
fn padded_words(text: &str) -> String {
    let words: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    format!(
        " {} ",
        words.split_whitespace().collect::<Vec<_>>().join(" ")
    )
}

/// The results a question asks about, by name or synonym. Where one match lies inside a longer
/// one ("cholesterol" in "LDL cholesterol"), only the longer one counts.
pub fn asked_results<'a>(question: &str, results: &[&'a Observation]) -> Vec<&'a Observation> {
    let q = padded_words(question);
    let spans: Vec<Option<(usize, usize)>> = results
        .iter()
        .map(|o| {
            let own_name = o.display.to_lowercase();
            let synonyms = test_of(o).map_or(&[][..], |t| t.synonyms);
            synonyms
                .iter()
                .map(|s| s.to_string())
                .chain([own_name])
                .filter_map(|s| q.find(&format!(" {s} ")).map(|at| (at, at + s.len() + 2)))
                .max_by_key(|(a, b)| b - a)
        })
        .collect();
    let inside_longer = |(a, b): (usize, usize)| {
        spans
            .iter()
            .flatten()
            .any(|&(c, d)| c <= a && b <= d && (d - c) > (b - a))
    };
    results
        .iter()
        .zip(&spans)
        .filter(|(_, span)| span.is_some_and(|s| !inside_longer(s)))
        .map(|(o, _)| *o)
        .collect()
}

/// Whether a question names a test we do not have released (so we say so, not guess).
pub fn names_a_known_test(question: &str) -> bool {
    let q = padded_words(question);
    TESTS
        .iter()
        .flat_map(|t| t.synonyms)
        .any(|s| q.contains(&format!(" {s} ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::lab_results::spoken::Date;
    use talkline_tts::normalize::normalize;

    fn obs(
        loinc: &str,
        display: &str,
        value: f64,
        unit: &str,
        low: Option<f64>,
        high: Option<f64>,
    ) -> Observation {
        Observation {
            id: format!("o-{loinc}"),
            status: "final".into(),
            loinc: Some(loinc.into()),
            display: display.into(),
            value,
            unit: unit.into(),
            low,
            high,
            interpretation: None,
            effective: Date::new(2024, 3, 15),
        }
    }

    #[test]
    fn normal_and_abnormal_sentences_read_right() {
        let hb = obs("718-7", "Hemoglobin", 13.5, "g/dL", Some(12.0), Some(16.0));
        let s = result_sentence(&hb);
        assert_eq!(s, "Your hemoglobin is 13.5 grams per deciliter; the normal range is 12 to 16, so it is normal.");
        assert_eq!(
            normalize(&s).spoken,
            "Your hemoglobin is thirteen point five grams per deciliter; the normal range is twelve to sixteen, so it is normal."
        );
        let glucose = obs("2345-7", "Glucose", 126.0, "mg/dL", Some(70.0), Some(99.0));
        let s = result_sentence(&glucose);
        assert_eq!(s, "Your glucose is 126 milligrams per deciliter, which is above the normal range of 70 to 99.");
        assert!(normalize(&s).spoken.contains("one hundred twenty six milligrams per deciliter, which is above the normal range of seventy to ninety nine"));
    }

    #[test]
    fn questions_find_their_results_by_synonym() {
        let glucose = obs("2345-7", "Glucose", 126.0, "mg/dL", Some(70.0), Some(99.0));
        let ldl = obs(
            "2089-1",
            "LDL Cholesterol",
            90.0,
            "mg/dL",
            None,
            Some(100.0),
        );
        let total = obs("2093-3", "Cholesterol", 180.0, "mg/dL", None, Some(200.0));
        let all = [&glucose, &ldl, &total];
        let ids = |q: &str| {
            asked_results(q, &all)
                .iter()
                .map(|o| o.id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("How's my sugar?"), ["o-2345-7"]);
        assert_eq!(ids("and my cholesterol"), ["o-2089-1", "o-2093-3"]);
        assert_eq!(ids("what about the LDL cholesterol"), ["o-2089-1"]);
        assert!(ids("how are you").is_empty());
    }

    #[test]
    fn summary_counts_and_names_the_abnormal() {
        let glucose = obs("2345-7", "Glucose", 126.0, "mg/dL", Some(70.0), Some(99.0));
        let hb = obs("718-7", "Hemoglobin", 13.5, "g/dL", Some(12.0), Some(16.0));
        assert_eq!(
            summary(&[&hb, &glucose]),
            "You have 2 results: 1 normal; 1 high, your glucose. Ask me about any of them."
        );
    }
}
