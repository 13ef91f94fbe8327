//! The audit log: JSON lines, one event per line, appended and flushed line by line, in a file
//! of its own. Patient identifiers and result ids are written here and nowhere else; the
//! application logs (`tracing`) carry only the call id and event categories.
//!
//! Events (`event` field): `verified`, `disclosure` (`result_ids`, `via`: `template` or `llm`),
//! `lockout`, `transfer` (`reason`), `guard_replacement` (`unsupported`: what the LLM wrote, or
//! `reason`: `medical-advice`). Every line has `time` (RFC 3339, UTC) and `call_id`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// An append-only JSON-lines file shared by every call of the process.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event. `fields` must be a JSON object; `time` and `event` are added.
    pub fn record(&self, event: &str, call_id: &str, fields: Value) -> std::io::Result<()> {
        let mut line = Map::new();
        line.insert("time".into(), json!(rfc3339_utc(SystemTime::now())));
        line.insert("event".into(), json!(event));
        line.insert("call_id".into(), json!(call_id));
        if let Value::Object(extra) = fields {
            line.extend(extra);
        }
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        // A poisoned lock only means another call panicked mid-write; the file is still usable.
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(text.as_bytes())?;
        file.flush()
    }
}

/// "2024-03-15T08:30:00.123Z".
pub fn rfc3339_utc(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_710_491_400_123);
        assert_eq!(rfc3339_utc(t), "2024-03-15T08:30:00.123Z");
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn events_are_appended_as_json_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).expect("opened");
        log.record("disclosure", "c1", json!({"result_ids": ["o1"]}))
            .expect("written");
        log.record("lockout", "c2", json!({})).expect("written");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "disclosure");
        assert_eq!(lines[0]["result_ids"][0], "o1");
        assert_eq!(lines[1]["call_id"], "c2");
    }
}
