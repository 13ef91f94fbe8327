//! Patients and their lab results from HL7 FHIR R4 JSON Bundles (a file, or a folder of
//! `*.json` files).
//!
//! What is read, and where:
//! - `Patient`: `id`; `name[0]` (`text`, else `given` + `family`); `birthDate` (`YYYY-MM-DD`);
//!   the phone PIN in `identifier[]` with `system` [`PIN_SYSTEM`] and `value` of digits. These
//!   bundles are synthetic demo data: a real deployment would keep a hash, not the PIN.
//! - `Observation`: `id`; `status`; `code.coding[]` with system `http://loinc.org` (`code`,
//!   `display`), else `code.text`; `subject.reference` = `Patient/<id>`; `valueQuantity`
//!   (`value`, `unit` else `code`), required: only numeric results are supported;
//!   `referenceRange[0].low.value` / `.high.value`; `interpretation[0].coding[0].code`;
//!   `effectiveDateTime`.
//!
//! **Released** means `status` is `final`, `amended` or `corrected` (R4's kind of amended): the
//! lab has signed the result off. `registered`, `preliminary`, `cancelled`, `entered-in-error`
//! and `unknown` results are loaded but never read aloud nor put in the LLM's context.
//!
//! Other resource types are ignored. A malformed bundle fails with the file and the field path:
//! `entry[3].resource.valueQuantity.value: expected a number`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::spoken::Date;

/// `Patient.identifier.system` of the phone PIN.
pub const PIN_SYSTEM: &str = "urn:talkline:pin";
const LOINC_SYSTEM: &str = "http://loinc.org";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FhirError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: {field}: {message}", path.display())]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{}: no *.json bundles there", path.display())]
    Empty { path: PathBuf },
}

pub struct Patient {
    pub id: String,
    pub name: String,
    pub birth_date: Date,
    pub(super) pin: Option<String>,
}

// Written by hand so the date of birth and the PIN can never reach a log through `{:?}`.
impl std::fmt::Debug for Patient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Patient")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Patient {
    /// Whether `dob` and `pin` are this patient's. A patient without a PIN cannot be verified.
    pub fn verifies(&self, dob: Date, pin: &str) -> bool {
        self.birth_date == dob && self.pin.as_deref() == Some(pin)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub id: String,
    pub status: String,
    pub loinc: Option<String>,
    /// The lab's own name for the test (`display` or `code.text`).
    pub display: String,
    pub value: f64,
    pub unit: String,
    pub low: Option<f64>,
    pub high: Option<f64>,
    /// The lab's interpretation code (`N`, `H`, `L`, `HH`, `LL`, `A`, ...).
    pub interpretation: Option<String>,
    pub effective: Option<Date>,
}

impl Observation {
    /// See the module documentation.
    pub fn is_released(&self) -> bool {
        matches!(self.status.as_str(), "final" | "amended" | "corrected")
    }
}

/// One patient and all their results.
#[derive(Debug)]
pub struct PatientRecord {
    pub patient: Patient,
    pub observations: Vec<Observation>,
}

impl PatientRecord {
    pub fn released(&self) -> impl Iterator<Item = &Observation> {
        self.observations.iter().filter(|o| o.is_released())
    }
}

/// Every patient loaded, by id.
#[derive(Debug, Default)]
pub struct PatientStore {
    records: BTreeMap<String, PatientRecord>,
}

impl PatientStore {
    /// Loads a bundle file, or every `*.json` file of a folder (sorted by name).
    pub fn load(path: &Path) -> Result<Self, FhirError> {
        let mut store = PatientStore::default();
        store.add(path)?;
        Ok(store)
    }

    /// Adds a bundle file or a folder of them; a file already loaded is skipped.
    pub fn add(&mut self, path: &Path) -> Result<(), FhirError> {
        let io = |source| FhirError::Io {
            path: path.to_path_buf(),
            source,
        };
        let files = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(FhirError::Empty {
                    path: path.to_path_buf(),
                });
            }
            files
        } else {
            vec![path.to_path_buf()]
        };
        for file in files {
            self.add_file(&file)?;
        }
        Ok(())
    }

    fn add_file(&mut self, path: &Path) -> Result<(), FhirError> {
        let text = std::fs::read_to_string(path).map_err(|source| FhirError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.add_json(path, &text)
    }

    /// Adds one bundle from its JSON text; `path` only names it in errors. The entry point for
    /// untrusted bundle text, which the fuzz target `fhir` drives.
    pub fn add_json(&mut self, path: &Path, text: &str) -> Result<(), FhirError> {
        let json: Value = serde_json::from_str(text).map_err(|source| FhirError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let field_error = |e: FieldError| FhirError::Field {
            path: path.to_path_buf(),
            field: e.field,
            message: e.message,
        };
        let bundle = parse_bundle(&Node::root(&json)).map_err(field_error)?;
        self.merge(bundle).map_err(field_error)
    }

    fn merge(&mut self, bundle: Bundle) -> Result<(), FieldError> {
        for (field, patient) in bundle.patients {
            match self.records.get(&patient.id) {
                // The same patient from the same data (a file given twice) is not a conflict.
                Some(r)
                    if r.patient.birth_date == patient.birth_date
                        && r.patient.pin == patient.pin => {}
                Some(_) => {
                    return Err(FieldError::new(
                        &field,
                        "a different patient with this id was already loaded",
                    ))
                }
                None => {
                    let id = patient.id.clone();
                    let record = PatientRecord {
                        patient,
                        observations: Vec::new(),
                    };
                    self.records.insert(id, record);
                }
            }
        }
        for (field, subject, observation) in bundle.observations {
            let record = self.records.get_mut(&subject).ok_or_else(|| {
                FieldError::new(
                    &format!("{field}.subject.reference"),
                    "names no patient loaded so far",
                )
            })?;
            if !record.observations.iter().any(|o| o.id == observation.id) {
                record.observations.push(observation);
            }
        }
        Ok(())
    }

    pub fn get(&self, patient_id: &str) -> Option<&PatientRecord> {
        self.records.get(patient_id)
    }

    pub fn patients(&self) -> impl Iterator<Item = &PatientRecord> {
        self.records.values()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// The patient id of the single Patient in a bundle file (`talkline chat --patient FILE`).
pub fn patient_id_in(path: &Path) -> Result<String, FhirError> {
    let store = PatientStore::load(path)?;
    let mut ids = store.records.into_keys();
    match (ids.next(), ids.next()) {
        (Some(id), None) => Ok(id),
        _ => Err(FhirError::Field {
            path: path.to_path_buf(),
            field: "entry".into(),
            message: "expected exactly one Patient".into(),
        }),
    }
}

struct Bundle {
    patients: Vec<(String, Patient)>,
    observations: Vec<(String, String, Observation)>,
}

#[derive(Debug)]
struct FieldError {
    field: String,
    message: String,
}

impl FieldError {
    fn new(field: &str, message: &str) -> Self {
        FieldError {
            field: if field.is_empty() {
                "(root)".into()
            } else {
                field.to_string()
            },
            message: message.to_string(),
        }
    }
}

/// A JSON value with the path that led to it, so every error names its field.
struct Node<'a> {
    value: &'a Value,
    path: String,
}

impl<'a> Node<'a> {
    fn root(value: &'a Value) -> Self {
        Node {
            value,
            path: String::new(),
        }
    }

    fn error(&self, message: &str) -> FieldError {
        FieldError::new(&self.path, message)
    }

    fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn opt(&self, key: &str) -> Option<Node<'a>> {
        self.value
            .get(key)
            .filter(|v| !v.is_null())
            .map(|value| Node {
                value,
                path: self.child_path(key),
            })
    }

    fn get(&self, key: &str) -> Result<Node<'a>, FieldError> {
        self.opt(key)
            .ok_or_else(|| FieldError::new(&self.child_path(key), "missing"))
    }

    fn str(&self) -> Result<&'a str, FieldError> {
        self.value
            .as_str()
            .ok_or_else(|| self.error("expected a string"))
    }

    fn number(&self) -> Result<f64, FieldError> {
        self.value
            .as_f64()
            .ok_or_else(|| self.error("expected a number"))
    }

    fn items(&self) -> Result<Vec<Node<'a>>, FieldError> {
        let items = self
            .value
            .as_array()
            .ok_or_else(|| self.error("expected an array"))?;
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, value)| Node {
                value,
                path: format!("{}[{i}]", self.path),
            })
            .collect())
    }

    fn first(&self, key: &str) -> Result<Option<Node<'a>>, FieldError> {
        match self.opt(key) {
            Some(list) => Ok(list.items()?.into_iter().next()),
            None => Ok(None),
        }
    }
}

fn parse_bundle(root: &Node) -> Result<Bundle, FieldError> {
    if root.get("resourceType")?.str()? != "Bundle" {
        return Err(FieldError::new("resourceType", "expected \"Bundle\""));
    }
    let mut bundle = Bundle {
        patients: Vec::new(),
        observations: Vec::new(),
    };
    let Some(entries) = root.opt("entry") else {
        return Ok(bundle);
    };
    for entry in entries.items()? {
        let resource = entry.get("resource")?;
        match resource.get("resourceType")?.str()? {
            "Patient" => bundle
                .patients
                .push((resource.path.clone(), parse_patient(&resource)?)),
            "Observation" => {
                let (subject, observation) = parse_observation(&resource)?;
                bundle
                    .observations
                    .push((resource.path.clone(), subject, observation));
            }
            _ => {}
        }
    }
    Ok(bundle)
}

fn parse_patient(node: &Node) -> Result<Patient, FieldError> {
    let birth = node.get("birthDate")?;
    let birth_date = Date::parse_iso(birth.str()?)
        .filter(|_| birth.str().is_ok_and(|s| s.len() == 10))
        .ok_or_else(|| birth.error("expected a date YYYY-MM-DD"))?;
    Ok(Patient {
        id: node.get("id")?.str()?.to_string(),
        name: patient_name(node)?,
        birth_date,
        pin: patient_pin(node)?,
    })
}

fn patient_name(node: &Node) -> Result<String, FieldError> {
    let Some(name) = node.first("name")? else {
        return Ok(String::new());
    };
    if let Some(text) = name.opt("text") {
        return Ok(text.str()?.to_string());
    }
    let mut parts = Vec::new();
    if let Some(given) = name.opt("given") {
        for g in given.items()? {
            parts.push(g.str()?.to_string());
        }
    }
    if let Some(family) = name.opt("family") {
        parts.push(family.str()?.to_string());
    }
    Ok(parts.join(" "))
}

fn patient_pin(node: &Node) -> Result<Option<String>, FieldError> {
    let Some(identifiers) = node.opt("identifier") else {
        return Ok(None);
    };
    for identifier in identifiers.items()? {
        let is_pin = identifier
            .opt("system")
            .is_some_and(|s| s.value.as_str() == Some(PIN_SYSTEM));
        if is_pin {
            let value = identifier.get("value")?;
            let pin = value.str()?;
            if pin.is_empty() || !pin.bytes().all(|b| b.is_ascii_digit()) {
                return Err(value.error("expected a PIN of digits"));
            }
            return Ok(Some(pin.to_string()));
        }
    }
    Ok(None)
}

/// The Observation and the id of its patient.
fn parse_observation(node: &Node) -> Result<(String, Observation), FieldError> {
    let reference = node.get("subject")?.get("reference")?;
    let subject = reference
        .str()?
        .strip_prefix("Patient/")
        .ok_or_else(|| reference.error("expected \"Patient/<id>\""))?
        .to_string();
    let (loinc, display) = observation_code(&node.get("code")?)?;
    let quantity = node.get("valueQuantity")?;
    let unit = match quantity.opt("unit") {
        Some(u) => u.str()?.to_string(),
        None => quantity
            .opt("code")
            .map(|c| c.str())
            .transpose()?
            .unwrap_or("")
            .to_string(),
    };
    let (low, high) = reference_range(node)?;
    let effective = match node.opt("effectiveDateTime") {
        Some(e) => {
            Some(Date::parse_iso(e.str()?).ok_or_else(|| e.error("expected a FHIR dateTime"))?)
        }
        None => None,
    };
    let observation = Observation {
        id: node.get("id")?.str()?.to_string(),
        status: node.get("status")?.str()?.to_string(),
        loinc,
        display,
        value: quantity.get("value")?.number()?,
        unit,
        low,
        high,
        interpretation: interpretation(node)?,
        effective,
    };
    Ok((subject, observation))
}

fn observation_code(code: &Node) -> Result<(Option<String>, String), FieldError> {
    if let Some(codings) = code.opt("coding") {
        for coding in codings.items()? {
            if coding
                .opt("system")
                .is_some_and(|s| s.value.as_str() == Some(LOINC_SYSTEM))
            {
                let loinc = coding.get("code")?.str()?.to_string();
                let display = match (coding.opt("display"), code.opt("text")) {
                    (_, Some(text)) => text.str()?.to_string(),
                    (Some(display), None) => display.str()?.to_string(),
                    (None, None) => loinc.clone(),
                };
                return Ok((Some(loinc), display));
            }
        }
    }
    match code.opt("text") {
        Some(text) => Ok((None, text.str()?.to_string())),
        None => Err(code.error("expected a LOINC coding or a text")),
    }
}

fn reference_range(node: &Node) -> Result<(Option<f64>, Option<f64>), FieldError> {
    let Some(range) = node.first("referenceRange")? else {
        return Ok((None, None));
    };
    let bound = |key: &str| -> Result<Option<f64>, FieldError> {
        match range.opt(key) {
            Some(b) => Ok(Some(b.get("value")?.number()?)),
            None => Ok(None),
        }
    };
    Ok((bound("low")?, bound("high")?))
}

fn interpretation(node: &Node) -> Result<Option<String>, FieldError> {
    let Some(concept) = node.first("interpretation")? else {
        return Ok(None);
    };
    match concept.first("coding")? {
        Some(coding) => Ok(Some(coding.get("code")?.str()?.to_string())),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(json: &str) -> Result<PatientStore, FhirError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("b.json");
        std::fs::write(&path, json).expect("written");
        PatientStore::load(&path)
    }

    const PATIENT: &str = r#"{"resource": {"resourceType": "Patient", "id": "p1",
        "name": [{"given": ["Testy"], "family": "McTest"}], "birthDate": "1961-03-04",
        "identifier": [{"system": "urn:talkline:pin", "value": "1234"}]}}"#;

    fn observation(value: &str, status: &str) -> String {
        format!(
            r#"{{"resource": {{"resourceType": "Observation", "id": "o1", "status": "{status}",
            "code": {{"coding": [{{"system": "http://loinc.org", "code": "718-7", "display": "Hemoglobin"}}]}},
            "subject": {{"reference": "Patient/p1"}}, "effectiveDateTime": "2024-03-15T08:30:00Z",
            "valueQuantity": {{"value": {value}, "unit": "g/dL"}},
            "referenceRange": [{{"low": {{"value": 12}}, "high": {{"value": 16}}}}]}}}}"#
        )
    }

    #[test]
    fn a_bundle_with_a_patient_and_a_result() {
        let json = format!(
            r#"{{"resourceType": "Bundle", "entry": [{PATIENT}, {}]}}"#,
            observation("13.5", "final")
        );
        let store = load(&json).expect("valid bundle");
        let record = store.get("p1").expect("patient p1");
        assert_eq!(record.patient.name, "Testy McTest");
        assert!(record
            .patient
            .verifies(Date::new(1961, 3, 4).expect("date"), "1234"));
        let o = &record.observations[0];
        assert_eq!(
            (o.value, o.low, o.high, o.unit.as_str()),
            (13.5, Some(12.0), Some(16.0), "g/dL")
        );
        assert!(o.is_released());
    }

    #[test]
    fn malformed_fields_are_named_by_path() {
        let json = format!(
            r#"{{"resourceType": "Bundle", "entry": [{PATIENT}, {}]}}"#,
            observation("\"high\"", "final")
        );
        let err = load(&json).expect_err("a bad value").to_string();
        assert!(
            err.ends_with("entry[1].resource.valueQuantity.value: expected a number"),
            "{err}"
        );
        let err = load(r#"{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "id": "p", "birthDate": "4 March"}}]}"#)
            .expect_err("a bad date").to_string();
        assert!(
            err.ends_with("entry[0].resource.birthDate: expected a date YYYY-MM-DD"),
            "{err}"
        );
    }

    #[test]
    fn preliminary_results_are_not_released() {
        let json = format!(
            r#"{{"resourceType": "Bundle", "entry": [{PATIENT}, {}]}}"#,
            observation("13.5", "preliminary")
        );
        let store = load(&json).expect("valid bundle");
        assert_eq!(store.get("p1").expect("p1").released().count(), 0);
    }
}
