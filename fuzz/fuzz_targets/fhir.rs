//! FHIR R4 bundles into the patient store, then every released result through the sentences
//! that are spoken and put in the LLM's context, as the lab-results agent does.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use talkline_runtime::agent::lab_results::{fhir::PatientStore, templates};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut store = PatientStore::default();
    if store.add_json(Path::new("fuzz.json"), text).is_err() {
        return;
    }
    // The same bundle twice is not a conflict (a file given twice).
    assert!(store.add_json(Path::new("fuzz.json"), text).is_ok());
    for record in store.patients() {
        let released: Vec<_> = record.released().collect();
        let _ = templates::summary(&released);
        for o in &released {
            let _ = templates::result_sentence(o);
            let _ = templates::context_line(o);
            let _ = o.effective.map(|d| d.spoken());
        }
        let _ = record.patient.birth_date.spoken();
    }
});
