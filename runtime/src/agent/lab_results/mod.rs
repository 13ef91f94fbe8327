//! The lab-results line: a caller proves who they are, then hears their released results read
//! from the record by templates, asks follow-up questions the LLM answers from that record only
//! (every number checked by the guard), and is handed to a nurse for anything clinical or urgent.
//!
//! **The agent is built with every patient ([`LabResults`]), but copies out only the verified
//! caller's released results, and only after the gate has verified them. Nothing of the record
//! exists in the agent, the LLM context or the replies before that.** Disclosures, lockouts,
//! transfers and guard replacements go to the audit log; `tracing` gets the call id and event
//! categories only.

pub mod audit;
pub mod fhir;
pub mod gate;
pub mod guard;
pub mod scope;
pub mod spoken;
pub mod templates;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde_json::json;
use talkline_llm::Message;

use self::audit::AuditLog;
use self::fhir::{Observation, PatientStore};
use self::gate::{Gate, GateStep};
use self::guard::{Guard, Violation};
use self::scope::Scope;
use super::{Agent, AgentAction, LlmRequest, ReplyVerdict};
use crate::config::AgentConfig;

const GREETING: &str = "Hello, this is the lab results line.";
const VERIFIED: &str = "Thank you, you're verified.";
const ASK_WHAT: &str = "Would you like a summary, or is there a result you'd like to hear about?";
const NURSE: &str = "That's a question for a nurse. I'll connect you with a nurse now.";
const URGENT: &str = "That sounds urgent. If you are in danger, hang up and call 911. I'll connect you with a nurse now.";
const REFUSAL: &str = "I can't do that. I can only discuss the results of the person I have verified on this call, and only in the way I'm set up to.";
const NOT_RELEASED: &str = "I don't have a released result for that test. Your care team will contact you when one is ready.";
const SAFE_LINE: &str = "I'm sorry, I can't answer that reliably. I can read your results to you again, or connect you with a nurse.";
const GOODBYE: &str = "Thank you for calling. Goodbye.";

/// The system prompt of follow-up questions; the record follows it.
const FOLLOW_UP_PROMPT: &str = "You are a lab results assistant on a phone call with a patient. \
Answer the patient's question in one or two short, plain sentences, using only the results listed below. \
Do not give a diagnosis or advice about medication. If the answer is not in the results, say you don't know and offer to connect them with a nurse.";

/// Results an LLM answer may name values of; more is reading the chart out.
const MAX_RESULTS_PER_ANSWER: usize = 2;

/// Follow-up exchanges kept for the LLM (a question and an answer each).
const FOLLOW_UP_HISTORY: usize = 2;

/// What every lab-results call shares: all patients, the audit log and the settings.
#[derive(Debug)]
pub struct LabResults {
    store: PatientStore,
    audit: AuditLog,
    pin_digits: usize,
    max_failures: u32,
    max_reply_tokens: usize,
}

impl LabResults {
    pub fn new(
        store: PatientStore,
        audit: AuditLog,
        pin_digits: usize,
        max_failures: u32,
        max_reply_tokens: usize,
    ) -> Self {
        LabResults {
            store,
            audit,
            pin_digits,
            max_failures,
            max_reply_tokens,
        }
    }

    /// Loads `[agent.lab_results] patients` and opens its `audit_log`.
    pub fn from_config(agent: &AgentConfig) -> anyhow::Result<Self> {
        let c = &agent.lab_results;
        let store = PatientStore::load(&c.patients).context("[agent.lab_results] patients")?;
        Ok(Self::new(
            store,
            open_audit(&c.audit_log)?,
            c.pin_digits,
            c.max_failures,
            agent.max_reply_tokens,
        ))
    }

    pub fn store(&self) -> &PatientStore {
        &self.store
    }
}

pub fn open_audit(path: &Path) -> anyhow::Result<AuditLog> {
    AuditLog::open(path).with_context(|| format!("opening the audit log {}", path.display()))
}

/// The verified caller's released results: the only patient data an agent ever holds.
struct Verified {
    patient_id: String,
    results: Vec<Observation>,
    /// The record as the LLM sees it, one [`templates::context_line`] per result.
    record_text: String,
    guard: Guard,
}

/// What the last utterance may have disclosed, settled when the caller has heard it.
enum Pending {
    Nothing,
    /// Template sentences: (result id, the words after which it counts as disclosed).
    Template(Vec<(String, String)>),
    /// An LLM answer: results count as disclosed when their value was heard.
    Llm,
}

pub struct LabResultsAgent {
    shared: Arc<LabResults>,
    call_id: String,
    /// A call placed to (or known to be from) one patient: only their credentials verify.
    expected_patient: Option<String>,
    gate: Gate,
    verified: Option<Verified>,
    pending: Pending,
    /// Follow-up questions (numbers redacted) and the answers heard.
    follow_ups: Vec<Message>,
    guard_tripped: bool,
    ended: bool,
}

impl LabResultsAgent {
    /// An agent for one call. With `expected_patient`, only that patient's date of birth and
    /// PIN verify; without, the caller is the one patient whose date of birth and PIN both match.
    pub fn new(shared: Arc<LabResults>, call_id: &str, expected_patient: Option<String>) -> Self {
        let gate = Gate::new(shared.pin_digits, shared.max_failures);
        LabResultsAgent {
            shared,
            call_id: call_id.to_string(),
            expected_patient,
            gate,
            verified: None,
            pending: Pending::Nothing,
            follow_ups: Vec::new(),
            guard_tripped: false,
            ended: false,
        }
    }

    fn audit(&self, event: &str, fields: serde_json::Value) {
        if let Err(e) = self.shared.audit.record(event, &self.call_id, fields) {
            // The path is configuration, not patient data.
            tracing::error!(call_id = %self.call_id, audit_log = %self.shared.audit.path().display(), "audit log write failed: {e}");
        }
    }

    fn patient_id(&self) -> Option<&str> {
        self.verified.as_ref().map(|v| v.patient_id.as_str())
    }

    fn gate_step(&mut self, step: GateStep) -> AgentAction {
        match step {
            GateStep::Ask(text) => AgentAction::Say(text.to_string()),
            GateStep::Verified(patient_id) => self.on_verified(patient_id),
            GateStep::LockedOut(text) => {
                tracing::warn!(call_id = %self.call_id, "identity not verified: call locked out");
                self.audit("lockout", json!({ "failures": self.gate.failures(), "expected_patient_id": self.expected_patient }));
                self.ended = true;
                AgentAction::Hangup {
                    say: text.to_string(),
                }
            }
        }
    }

    fn on_verified(&mut self, patient_id: String) -> AgentAction {
        let Some(record) = self.shared.store.get(&patient_id) else {
            // The verify callback only returns ids from this store.
            self.ended = true;
            return AgentAction::Hangup {
                say: SAFE_LINE.into(),
            };
        };
        let results: Vec<Observation> = record.released().cloned().collect();
        let record_text: String = results
            .iter()
            .map(templates::context_line)
            .collect::<Vec<_>>()
            .join("\n");
        let guard = Guard::from_record(&record_text);
        tracing::info!(call_id = %self.call_id, "identity verified");
        self.audit("verified", json!({ "patient_id": patient_id }));
        let count = match results.len() {
            1 => "You have 1 released result.".to_string(),
            n => format!("You have {n} released results."),
        };
        self.verified = Some(Verified {
            patient_id,
            results,
            record_text,
            guard,
        });
        AgentAction::Say(format!("{VERIFIED} {count} {ASK_WHAT}"))
    }

    fn transfer(&mut self, scope: Scope, say: &str) -> AgentAction {
        tracing::info!(call_id = %self.call_id, reason = scope.reason(), "transfer to a nurse");
        self.audit(
            "transfer",
            json!({ "reason": scope.reason(), "patient_id": self.patient_id() }),
        );
        self.ended = true;
        AgentAction::Transfer {
            reason: scope.reason().to_string(),
            say: say.to_string(),
        }
    }

    /// A verified caller's question: a result by name, a summary, or a follow-up for the LLM.
    fn answer(&mut self, text: &str) -> AgentAction {
        let Some(verified) = &self.verified else {
            return AgentAction::Say(gate::ASK_DOB.into());
        };
        if is_goodbye(text) {
            self.ended = true;
            return AgentAction::Hangup {
                say: GOODBYE.into(),
            };
        }
        let released: Vec<&Observation> = verified.results.iter().collect();
        let asked = templates::asked_results(text, &released);
        if !asked.is_empty() {
            let pending = asked
                .iter()
                .map(|o| (o.id.clone(), templates::disclosure_marker(o)))
                .collect();
            let say = asked
                .iter()
                .map(|o| templates::result_sentence(o))
                .collect::<Vec<_>>()
                .join(" ");
            self.pending = Pending::Template(pending);
            return AgentAction::Say(say);
        }
        if asks_for_summary(text) {
            let say = templates::summary(&released);
            let marker = say.split(':').next().unwrap_or(&say).to_string();
            self.pending = Pending::Template(
                released
                    .iter()
                    .map(|o| (o.id.clone(), marker.clone()))
                    .collect(),
            );
            return AgentAction::Say(say);
        }
        if templates::names_a_known_test(text) {
            return AgentAction::Say(NOT_RELEASED.into());
        }
        self.ask_llm(text)
    }

    fn ask_llm(&mut self, text: &str) -> AgentAction {
        let Some(verified) = &self.verified else {
            return AgentAction::Say(gate::ASK_DOB.into());
        };
        let system = format!(
            "{FOLLOW_UP_PROMPT}\n\n{}\n{}",
            guard::RECORD_HEADER,
            verified.record_text
        );
        let keep = self.follow_ups.len().saturating_sub(2 * FOLLOW_UP_HISTORY);
        self.follow_ups.drain(..keep);
        // The caller's own numbers (a PIN said again, a date of birth) never reach the LLM.
        self.follow_ups
            .push(Message::user(guard::redact_numbers(text)));
        let mut messages = vec![Message::system(system)];
        messages.extend(self.follow_ups.iter().cloned());
        self.pending = Pending::Llm;
        AgentAction::AskLlm(LlmRequest {
            messages,
            max_tokens: self.shared.max_reply_tokens,
        })
    }

    fn settle_disclosures(&mut self, heard: &str) {
        let Some(verified) = &self.verified else {
            return;
        };
        let (ids, via): (Vec<String>, &str) =
            match std::mem::replace(&mut self.pending, Pending::Nothing) {
                Pending::Nothing => return,
                Pending::Template(items) => (
                    items
                        .into_iter()
                        .filter(|(_, marker)| heard.contains(marker.as_str()))
                        .map(|(id, _)| id)
                        .collect(),
                    "template",
                ),
                Pending::Llm => (
                    verified
                        .results
                        .iter()
                        .filter(|o| Guard::mentions_number(heard, o.value))
                        .map(|o| o.id.clone())
                        .collect(),
                    "llm",
                ),
            };
        let mut ids = ids;
        ids.dedup();
        if !ids.is_empty() {
            let patient_id = verified.patient_id.clone();
            self.audit(
                "disclosure",
                json!({ "patient_id": patient_id, "result_ids": ids, "via": via }),
            );
        }
    }
}

fn padded(text: &str) -> String {
    let w: String = text
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '\'' {
                c
            } else {
                ' '
            }
        })
        .collect();
    format!(" {} ", w.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn is_goodbye(text: &str) -> bool {
    let w = padded(text);
    [
        " bye ",
        " goodbye ",
        " that's all ",
        " that is all ",
        " no thank you ",
        " nothing else ",
    ]
    .iter()
    .any(|p| w.contains(p))
}

fn asks_for_summary(text: &str) -> bool {
    let w = padded(text);
    [
        " results ",
        " result ",
        " summary ",
        " everything ",
        " all of them ",
        " anything abnormal ",
        " any problems ",
        " how did i do ",
        " overview ",
    ]
    .iter()
    .any(|p| w.contains(p))
}

impl Agent for LabResultsAgent {
    fn greeting(&mut self) -> Option<String> {
        Some(format!("{GREETING} {}", gate::ASK_DOB))
    }

    fn on_dtmf(&mut self, key: char) -> Option<AgentAction> {
        if self.ended {
            return None;
        }
        if self.verified.is_some() {
            // Zero, the operator key, reaches a nurse once the caller is verified.
            return (key == '0').then(|| self.transfer(Scope::Clinical, NURSE));
        }
        let (store, expected) = (&self.shared.store, self.expected_patient.as_deref());
        let verify = |dob, pin: &str| verify_caller(store, expected, dob, pin);
        let step = self.gate.on_dtmf(key, &verify)?;
        Some(self.gate_step(step))
    }

    fn on_user_turn(&mut self, text: &str) -> AgentAction {
        self.pending = Pending::Nothing;
        self.guard_tripped = false;
        if self.ended {
            return AgentAction::Hangup {
                say: GOODBYE.into(),
            };
        }
        match scope::classify(text) {
            Scope::Urgent => return self.transfer(Scope::Urgent, URGENT),
            Scope::Clinical => return self.transfer(Scope::Clinical, NURSE),
            Scope::Injection => {
                tracing::info!(call_id = %self.call_id, reason = Scope::Injection.reason(), "request refused");
                return AgentAction::Say(REFUSAL.into());
            }
            Scope::InScope => {}
        }
        if self.verified.is_some() {
            return self.answer(text);
        }
        let (store, expected) = (&self.shared.store, self.expected_patient.as_deref());
        let verify = |dob, pin: &str| verify_caller(store, expected, dob, pin);
        let step = self.gate.on_speech(text, &verify);
        self.gate_step(step)
    }

    fn check_reply(&mut self, text_so_far: &str) -> ReplyVerdict {
        let Some(verified) = &self.verified else {
            return ReplyVerdict::Replace(SAFE_LINE.into());
        };
        let recited = verified
            .results
            .iter()
            .filter(|o| Guard::mentions_number(text_so_far, o.value))
            .count();
        let violation = match verified.guard.check(text_so_far) {
            // Minimum necessary: a follow-up is about a result or two, not the whole chart.
            Ok(()) if recited > MAX_RESULTS_PER_ANSWER => Violation::RecordEcho,
            Ok(()) => return ReplyVerdict::Speak,
            Err(v) => v,
        };
        if !self.guard_tripped {
            self.guard_tripped = true;
            let detail = match violation {
                Violation::Unsupported(items) => json!({ "unsupported": items }),
                Violation::MedicalAdvice => json!({ "reason": "medical-advice" }),
                Violation::RecordEcho => json!({ "reason": "record-echo" }),
            };
            let mut fields =
                json!({ "patient_id": verified.patient_id, "rejected_text": text_so_far });
            if let (Some(f), serde_json::Value::Object(d)) = (fields.as_object_mut(), detail) {
                f.extend(d);
            }
            tracing::warn!(call_id = %self.call_id, "guard replaced an LLM answer");
            self.audit("guard_replacement", fields);
        }
        ReplyVerdict::Replace(SAFE_LINE.into())
    }

    fn on_reply_spoken(&mut self, heard_text: &str) {
        let was_llm = matches!(self.pending, Pending::Llm);
        self.settle_disclosures(heard_text);
        if was_llm {
            self.follow_ups.push(Message::assistant(heard_text));
        }
    }
}

/// The patient whose date of birth and PIN these are: the expected one, or else the only match.
fn verify_caller(
    store: &PatientStore,
    expected: Option<&str>,
    dob: spoken::Date,
    pin: &str,
) -> Option<String> {
    if let Some(id) = expected {
        return store
            .get(id)
            .filter(|r| r.patient.verifies(dob, pin))
            .map(|_| id.to_string());
    }
    let mut matches = store.patients().filter(|r| r.patient.verifies(dob, pin));
    match (matches.next(), matches.next()) {
        (Some(only), None) => Some(only.patient.id.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped synthetic patients, and the folder of the audit log (removed when dropped).
    fn examples() -> (Arc<LabResults>, tempfile::TempDir) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/patients");
        let store = PatientStore::load(&dir).expect("the shipped synthetic patients load");
        let audit_dir = tempfile::tempdir().expect("temp dir");
        let audit = AuditLog::open(&audit_dir.path().join("audit.jsonl")).expect("audit log");
        (Arc::new(LabResults::new(store, audit, 4, 3, 60)), audit_dir)
    }

    fn audit_events(shared: &LabResults) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(shared.audit.path()).expect("audit log readable");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    fn verified_ada(shared: &Arc<LabResults>) -> LabResultsAgent {
        let mut agent = LabResultsAgent::new(shared.clone(), "call-1", None);
        agent.on_user_turn("March 4th, 1961");
        let action = agent.on_user_turn("1 2 3 4");
        assert!(
            matches!(&action, AgentAction::Say(s) if s.starts_with(VERIFIED)),
            "{action:?}"
        );
        agent
    }

    #[test]
    fn the_llm_sees_only_the_verified_patients_released_results() {
        let (shared, _audit_dir) = examples();
        let mut agent = verified_ada(&shared);
        let AgentAction::AskLlm(request) =
            agent.on_user_turn("What does that mean? My PIN is 1234.")
        else {
            panic!("a follow-up goes to the LLM");
        };
        let context: String = request
            .messages
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            context.contains("glucose: 126 milligrams per deciliter"),
            "{context}"
        );
        for absent in [
            "5.9",
            "potassium",
            "10.9",
            "238",
            "Bruno",
            "Cleo",
            "1234",
            "1961",
            "Ada",
        ] {
            assert!(
                !context.contains(absent),
                "{absent} in the LLM context: {context}"
            );
        }
    }

    #[test]
    fn a_number_the_llm_invents_is_replaced_and_audited() {
        let (shared, _audit_dir) = examples();
        let mut agent = verified_ada(&shared);
        agent.on_user_turn("Is that bad?");
        assert_eq!(
            agent.check_reply("Your glucose of 126 is high."),
            ReplyVerdict::Speak
        );
        let verdict = agent.check_reply("Your glucose of 126 is high. It should be under 140.");
        assert_eq!(verdict, ReplyVerdict::Replace(SAFE_LINE.into()));
        agent.on_reply_spoken(&format!("Your glucose of 126 is high. {SAFE_LINE}"));
        let events = audit_events(&shared);
        let guard = events
            .iter()
            .find(|e| e["event"] == "guard_replacement")
            .expect("a guard event");
        assert_eq!(guard["unsupported"], serde_json::json!(["140"]));
        let disclosure = events
            .iter()
            .find(|e| e["event"] == "disclosure")
            .expect("a disclosure");
        assert_eq!(disclosure["result_ids"], serde_json::json!(["ada-glucose"]));
        assert_eq!(disclosure["via"], "llm");
    }
}
