//! The identity gate: nothing about results is reachable until the caller has given a date of
//! birth and a PIN that match the record. Sans-I/O: it is told what the caller said or keyed and
//! answers what to say next; the credential check is passed in, so the gate never sees a record.
//!
//! The gate never says which of the two was wrong (that would let a caller find a date of birth
//! first and a PIN next), and it asks for both again after a mismatch. Turns it cannot read (no
//! date, no digits) are asked again without counting as failures; `max_failures` mismatches
//! lock the call out.

use super::spoken::{find_full_date, said_digits, Date};

pub const ASK_DOB: &str = "Before I can share anything, I need to confirm who you are. Please tell me your date of birth.";
const DOB_AGAIN: &str =
    "I didn't catch a date. Please say your date of birth with the month, the day and the year.";
const ASK_PIN: &str = "Thank you. Now please say your PIN one digit at a time, or key it in followed by the pound key.";
const PIN_AGAIN: &str =
    "I didn't catch your PIN. Please say its digits one at a time, or key them in.";
const PIN_GO_ON: &str = "Please go on with the rest of your PIN.";
const MISMATCH: &str = "I'm sorry, that doesn't match our records. Let's try again. Please tell me your date of birth.";
pub const LOCKED_OUT: &str = "I'm sorry, I couldn't verify your identity, so I can't share any results on this call. Please contact your clinic directly. Goodbye.";

/// What the gate decided after a turn or a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateStep {
    /// Say this and wait for the caller.
    Ask(&'static str),
    /// Verified: this patient id.
    Verified(String),
    /// Too many failures: say this and hang up.
    LockedOut(&'static str),
}

enum State {
    AwaitingDob,
    AwaitingPin { dob: Date },
    Verified(String),
    LockedOut,
}

pub struct Gate {
    state: State,
    failures: u32,
    max_failures: u32,
    pin_digits: usize,
    /// DTMF digits keyed so far.
    keyed: String,
    /// Digits of a PIN said over several turns: callers pause between digits, and a pause long
    /// enough to end the turn must not cost them an attempt.
    spoken: String,
}

// By hand: the date of birth and the keyed digits must never reach a log through `{:?}`.
impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

/// Checks a date of birth and a PIN; the verified patient's id when they match.
pub type Verify<'a> = &'a dyn Fn(Date, &str) -> Option<String>;

/// Digits of a date of birth keyed as MMDDYYYY.
const DOB_KEYED_DIGITS: usize = 8;

impl Gate {
    pub fn new(pin_digits: usize, max_failures: u32) -> Self {
        Gate {
            state: State::AwaitingDob,
            failures: 0,
            max_failures: max_failures.max(1),
            pin_digits: pin_digits.max(1),
            keyed: String::new(),
            spoken: String::new(),
        }
    }

    pub fn verified_patient(&self) -> Option<&str> {
        match &self.state {
            State::Verified(id) => Some(id),
            _ => None,
        }
    }

    pub fn is_locked_out(&self) -> bool {
        matches!(self.state, State::LockedOut)
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A spoken turn while the caller is not yet verified.
    pub fn on_speech(&mut self, text: &str, verify: Verify) -> GateStep {
        self.keyed.clear();
        match self.state {
            State::AwaitingDob => match find_full_date(text) {
                Some(dob) => self.got_dob(dob),
                None => GateStep::Ask(DOB_AGAIN),
            },
            State::AwaitingPin { dob } => match said_digits(text) {
                Some(digits) => {
                    self.spoken.push_str(&digits);
                    if self.spoken.len() < self.pin_digits {
                        return GateStep::Ask(PIN_GO_ON);
                    }
                    let pin = std::mem::take(&mut self.spoken);
                    self.attempt(dob, &pin, verify)
                }
                // "That's it": a PIN shorter than `pin_digits` is complete.
                None if !self.spoken.is_empty() => {
                    let pin = std::mem::take(&mut self.spoken);
                    self.attempt(dob, &pin, verify)
                }
                None => GateStep::Ask(PIN_AGAIN),
            },
            State::Verified(ref id) => GateStep::Verified(id.clone()),
            State::LockedOut => GateStep::LockedOut(LOCKED_OUT),
        }
    }

    /// A DTMF key: `0`-`9` add a digit, `#` submits, `*` starts over. A PIN is also submitted
    /// once it has `pin_digits` digits, a date of birth (MMDDYYYY) once it has eight.
    pub fn on_dtmf(&mut self, key: char, verify: Verify) -> Option<GateStep> {
        match key {
            '*' => {
                self.keyed.clear();
                return None;
            }
            '0'..='9' => self.keyed.push(key),
            '#' => {}
            _ => return None,
        }
        let submit = key == '#';
        match self.state {
            State::AwaitingDob if submit || self.keyed.len() == DOB_KEYED_DIGITS => {
                let keyed = std::mem::take(&mut self.keyed);
                Some(match keyed_date(&keyed) {
                    Some(dob) => self.got_dob(dob),
                    None => GateStep::Ask(DOB_AGAIN),
                })
            }
            State::AwaitingPin { dob } if submit || self.keyed.len() == self.pin_digits => {
                let pin = std::mem::take(&mut self.keyed);
                Some(if pin.is_empty() {
                    GateStep::Ask(PIN_AGAIN)
                } else {
                    self.attempt(dob, &pin, verify)
                })
            }
            _ => None,
        }
    }

    fn got_dob(&mut self, dob: Date) -> GateStep {
        self.state = State::AwaitingPin { dob };
        GateStep::Ask(ASK_PIN)
    }

    fn attempt(&mut self, dob: Date, pin: &str, verify: Verify) -> GateStep {
        self.spoken.clear();
        if let Some(id) = verify(dob, pin) {
            self.state = State::Verified(id.clone());
            return GateStep::Verified(id);
        }
        self.failures += 1;
        if self.failures >= self.max_failures {
            self.state = State::LockedOut;
            GateStep::LockedOut(LOCKED_OUT)
        } else {
            self.state = State::AwaitingDob;
            GateStep::Ask(MISMATCH)
        }
    }
}

fn keyed_date(digits: &str) -> Option<Date> {
    if digits.len() != DOB_KEYED_DIGITS {
        return None;
    }
    let n = |r: std::ops::Range<usize>| digits.get(r)?.parse::<u32>().ok();
    Date::new(n(4..8)? as i32, n(0..2)?, n(2..4)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(dob: Date, pin: &str) -> Option<String> {
        (dob == Date::new(1961, 3, 4)? && pin == "1234").then(|| "p1".to_string())
    }

    #[test]
    fn date_of_birth_then_spoken_pin_verifies() {
        let mut gate = Gate::new(4, 3);
        assert_eq!(
            gate.on_speech("It's March 4th, 1961", &verify),
            GateStep::Ask(ASK_PIN)
        );
        assert_eq!(
            gate.on_speech("one two three four", &verify),
            GateStep::Verified("p1".into())
        );
        assert_eq!(gate.verified_patient(), Some("p1"));
    }

    #[test]
    fn a_pin_said_over_several_turns_is_one_attempt() {
        let mut gate = Gate::new(4, 3);
        gate.on_speech("March 4 1961", &verify);
        assert_eq!(gate.on_speech("1, 2,", &verify), GateStep::Ask(PIN_GO_ON));
        assert_eq!(
            gate.on_speech("3, 4.", &verify),
            GateStep::Verified("p1".into())
        );
        // A shorter PIN ends when the caller says so; a wrong one counts once.
        let mut gate = Gate::new(4, 3);
        gate.on_speech("March 4 1961", &verify);
        assert_eq!(
            gate.on_speech("one two three", &verify),
            GateStep::Ask(PIN_GO_ON)
        );
        assert_eq!(
            gate.on_speech("That's it.", &verify),
            GateStep::Ask(MISMATCH)
        );
        assert_eq!(gate.failures(), 1);
    }

    #[test]
    fn keyed_pin_submits_at_pound_or_at_length() {
        let mut gate = Gate::new(4, 3);
        gate.on_speech("3/4/1961", &verify);
        for k in "123".chars() {
            assert_eq!(gate.on_dtmf(k, &verify), None);
        }
        assert_eq!(
            gate.on_dtmf('4', &verify),
            Some(GateStep::Verified("p1".into()))
        );
        let mut gate = Gate::new(6, 3);
        gate.on_speech("3/4/1961", &verify);
        for k in "1234".chars() {
            gate.on_dtmf(k, &verify);
        }
        assert_eq!(
            gate.on_dtmf('#', &verify),
            Some(GateStep::Verified("p1".into()))
        );
    }

    #[test]
    fn three_mismatches_lock_out_and_stay_locked() {
        let mut gate = Gate::new(4, 3);
        for _ in 0..2 {
            gate.on_speech("March 4 1961", &verify);
            assert_eq!(gate.on_speech("1 1 1 1", &verify), GateStep::Ask(MISMATCH));
        }
        // A wrong date of birth with the right PIN fails the same way.
        gate.on_speech("March 5 1961", &verify);
        assert_eq!(
            gate.on_speech("1 2 3 4", &verify),
            GateStep::LockedOut(LOCKED_OUT)
        );
        gate.on_speech("March 4 1961", &verify);
        assert_eq!(
            gate.on_speech("1 2 3 4", &verify),
            GateStep::LockedOut(LOCKED_OUT)
        );
        assert!(gate.is_locked_out());
    }

    #[test]
    fn unreadable_turns_do_not_count() {
        let mut gate = Gate::new(4, 3);
        assert_eq!(gate.on_speech("hello?", &verify), GateStep::Ask(DOB_AGAIN));
        gate.on_speech("March 4 1961", &verify);
        assert_eq!(
            gate.on_speech("I forgot it", &verify),
            GateStep::Ask(PIN_AGAIN)
        );
        assert_eq!(gate.failures(), 0);
    }
}
