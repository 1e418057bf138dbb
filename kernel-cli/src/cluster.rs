//! Cluster files: which vats a kernel runs, how, and where it keeps its store.
//!
//! ```toml
//! bootstrap = "alice"        # optional: this vat's `bootstrap(vats)` runs first, once
//! store = "cluster.store"    # optional, relative to this file (default: <file stem>.store beside it)
//! durability = "group"       # optional: "sync" | "group" (default) | "buffered"
//!
//! [[vat]]
//! name = "alice"
//! script = "alice.rhai"      # a rhai script, relative to this file ...
//! max_operations = 100000    # optional limits, scripts only (see ScriptLimits)
//! params = { rally = 3 }     # optional: what the vat's `params()` returns
//!
//! [[vat]]
//! name = "bob"
//! builtin = "ponger"         # ... or a built-in Rust vat
//! ```
//!
//! [`Cluster::load`] validates everything (syntax, unknown keys, types, vat names, files, script
//! compilation, limits, the bootstrap vat) before anything is written, and reports the first
//! problem as one line naming the file, the line and the key.

use crate::builtins::BUILTINS;
use crate::script::{Script, ScriptLimits};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// A cluster file that cannot be used. Every variant is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The file could not be read.
    #[error("{file}: cannot read the cluster file: {source}")]
    Read {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file (or a script it names) is wrong at a line.
    #[error("{file}:{line}: {key}: {message}")]
    Invalid {
        /// The file the line is in (the cluster file, or a script).
        file: String,
        /// 1-based line.
        line: usize,
        /// The key at fault (`vat "alice".script`, `bootstrap`, ...).
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// When the store syncs (kernel-store's [`kernel_store::Durability`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    /// Every crank on disk before its commit event.
    Sync,
    /// Group commit (many cranks per fsync; a crash may lose the last few cranks, never part of one).
    Group,
    /// Handed to the OS every crank, synced only at exit: survives a process crash, not power loss.
    Buffered,
}

impl DurabilityMode {
    /// The store setting.
    pub fn durability(self) -> kernel_store::Durability {
        match self {
            DurabilityMode::Sync => kernel_store::Durability::Sync,
            DurabilityMode::Group => kernel_store::Durability::GROUP,
            DurabilityMode::Buffered => kernel_store::Durability::Buffered,
        }
    }
}

/// How a vat is implemented.
#[derive(Debug, Clone)]
pub enum VatKind {
    /// A rhai script.
    Script {
        /// The file, as resolved from the cluster file.
        path: PathBuf,
        /// Its text.
        source: String,
        /// Compiled.
        script: Script,
        /// Its limits.
        limits: ScriptLimits,
    },
    /// A built-in Rust vat ([`crate::builtins`]).
    Builtin(String),
}

/// One vat of a cluster.
#[derive(Debug, Clone)]
pub struct VatSpec {
    /// Its unique name.
    pub name: String,
    /// Script or built-in.
    pub kind: VatKind,
    /// `params`, as a JSON object.
    pub params: serde_json::Value,
}

/// A validated cluster file.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The file it was read from.
    pub file: PathBuf,
    /// The vat whose `bootstrap(vats)` runs first.
    pub bootstrap: Option<String>,
    /// The store directory.
    pub store: PathBuf,
    /// When the store syncs.
    pub durability: DurabilityMode,
    /// The vats, in file order (which is the order of their endpoint ids).
    pub vats: Vec<VatSpec>,
    /// The `[network]` table and the `[[peer]]` entries, for `kernel serve`.
    pub network: Option<Network>,
}

/// Where a cluster listens and which peers it lets in (`kernel serve`).
#[derive(Debug, Clone)]
pub struct Network {
    /// This kernel's name on links (`[network] kernel`, default: the cluster file's stem).
    pub kernel: kernel_remote::KernelId,
    /// The address to listen on.
    pub listen: SocketAddr,
    /// The allowed peers, in file order.
    pub peers: Vec<PeerSpec>,
}

/// One `[[peer]]`: a kernel allowed to connect, known by its public key.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    /// Its name on links (its own `[network] kernel`).
    pub name: kernel_remote::KernelId,
    /// Its public key (what `kernel id` prints on its store).
    pub key: kernel_remote::PublicKey,
    /// Where to dial it; without one, this side waits for the peer to dial.
    pub address: Option<SocketAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    bootstrap: Option<Spanned<String>>,
    store: Option<Spanned<String>>,
    durability: Option<Spanned<DurabilityMode>>,
    #[serde(default)]
    vat: Vec<Spanned<RawVat>>,
    network: Option<Spanned<RawNetwork>>,
    #[serde(default)]
    peer: Vec<Spanned<RawPeer>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    kernel: Option<Spanned<String>>,
    listen: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Spanned<String>,
    key: Spanned<String>,
    address: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVat {
    name: Spanned<String>,
    script: Option<Spanned<String>>,
    builtin: Option<Spanned<String>>,
    max_operations: Option<Spanned<u64>>,
    max_string_size: Option<Spanned<u64>>,
    max_array_size: Option<Spanned<u64>>,
    max_map_size: Option<Spanned<u64>>,
    max_call_levels: Option<Spanned<u64>>,
    max_expr_depth: Option<Spanned<u64>>,
    params: Option<Spanned<toml::Table>>,
}

/// The deepest call nesting a cluster may allow (the interpreter recurses natively).
pub const MAX_CALL_LEVELS: u64 = 1_000;

fn line_of(src: &str, offset: usize) -> usize {
    src.as_bytes()[..offset.min(src.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// The key named on the line where `span` starts: the text before `=`, or a table header.
fn key_at(src: &str, span: &Range<usize>) -> String {
    let start = span.start.min(src.len());
    let line_start = src[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = src[line_start..].lines().next().unwrap_or("").trim();
    match line.split_once('=') {
        Some((k, _)) if !line.starts_with('[') => k.trim().to_owned(),
        _ if line.is_empty() => "(file)".to_owned(),
        _ => line.to_owned(),
    }
}

struct Checker<'a> {
    file: String,
    src: &'a str,
}

impl Checker<'_> {
    fn at(&self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) -> ClusterError {
        ClusterError::Invalid { file: self.file.clone(), line: line_of(self.src, span.start), key: key.into(), message: message.into() }
    }
}

fn limit(c: &Checker<'_>, vat: &str, key: &str, v: &Option<Spanned<u64>>, default: u64, max: u64) -> Result<u64, ClusterError> {
    match v {
        None => Ok(default),
        Some(s) if *s.get_ref() < 1 || *s.get_ref() > max => {
            let range = if max == u64::MAX { "at least 1".to_owned() } else { format!("between 1 and {max}") };
            Err(c.at(s.span(), format!("vat {vat:?}.{key}"), format!("must be {range}, not {}", s.get_ref())))
        }
        Some(s) => Ok(*s.get_ref()),
    }
}

fn network(c: &Checker<'_>, file: &Path, raw: &RawCluster) -> Result<Option<Network>, ClusterError> {
    let Some(net) = &raw.network else {
        if let Some(p) = raw.peer.first() {
            return Err(c.at(p.span(), "[[peer]]", "peers need a [network] table with `listen`"));
        }
        return Ok(None);
    };
    let net = net.get_ref();
    let kernel = match &net.kernel {
        Some(k) => k.get_ref().parse().map_err(|e| c.at(k.span(), "network.kernel", format!("{:?}: {e}", k.get_ref())))?,
        None => {
            let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            stem.parse().map_err(|e| {
                c.at(net.listen.span(), "network.kernel", format!("the file stem {stem:?} is no kernel name ({e}); set `kernel = \"...\"`"))
            })?
        }
    };
    let addr = |s: &Spanned<String>, key: &str| -> Result<SocketAddr, ClusterError> {
        s.get_ref().parse().map_err(|e| c.at(s.span(), key, format!("{:?} is not an address like \"127.0.0.1:7001\": {e}", s.get_ref())))
    };
    let listen = addr(&net.listen, "network.listen")?;
    let mut peers: Vec<PeerSpec> = Vec::with_capacity(raw.peer.len());
    for p in &raw.peer {
        let p = p.get_ref();
        let text = p.name.get_ref();
        let name: kernel_remote::KernelId =
            text.parse().map_err(|e| c.at(p.name.span(), "peer.name", format!("{text:?} is not a kernel name: {e}")))?;
        if name == kernel {
            return Err(c.at(p.name.span(), "peer.name", format!("{text:?} is this kernel's own name")));
        }
        if peers.iter().any(|q| q.name == name) {
            return Err(c.at(p.name.span(), "peer.name", format!("duplicate peer name {text:?}")));
        }
        let key: kernel_remote::PublicKey =
            p.key.get_ref().parse().map_err(|e| c.at(p.key.span(), format!("peer {text:?}.key"), format!("not a public key: {e}")))?;
        if let Some(q) = peers.iter().find(|q| q.key == key) {
            return Err(c.at(p.key.span(), format!("peer {text:?}.key"), format!("the same key as peer {:?}", q.name.to_string())));
        }
        let address = p.address.as_ref().map(|a| addr(a, &format!("peer {text:?}.address"))).transpose()?;
        peers.push(PeerSpec { name, key, address });
    }
    Ok(Some(Network { kernel, listen, peers }))
}

fn size(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl Cluster {
    /// Read and validate `file`. Nothing is written.
    pub fn load(file: &Path) -> Result<Cluster, ClusterError> {
        let shown = file.display().to_string();
        let src = std::fs::read_to_string(file).map_err(|source| ClusterError::Read { file: shown.clone(), source })?;
        let c = Checker { file: shown, src: &src };
        let raw: RawCluster = toml::from_str(&src).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let key = key_at(&src, &span);
            c.at(span, key, e.message().trim().replace('\n', " "))
        })?;
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        if raw.vat.is_empty() {
            return Err(c.at(0..0, "vat", "the cluster names no vat (add a [[vat]] table)"));
        }
        let mut names = HashSet::new();
        let mut vats = Vec::with_capacity(raw.vat.len());
        for v in &raw.vat {
            let span = v.span();
            let v = v.get_ref();
            let name = v.name.get_ref().clone();
            if name.is_empty() || !name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-') {
                return Err(c.at(v.name.span(), "vat.name", format!("{name:?} is not a vat name (letters, digits, '_' and '-')")));
            }
            if !names.insert(name.clone()) {
                return Err(c.at(v.name.span(), "vat.name", format!("duplicate vat name {name:?}")));
            }
            let params = match &v.params {
                None => serde_json::Value::Object(serde_json::Map::new()),
                Some(p) => serde_json::to_value(p.get_ref()).map_err(|e| c.at(p.span(), format!("vat {name:?}.params"), e.to_string()))?,
            };
            let limits = ScriptLimits::default();
            let limits = ScriptLimits {
                max_operations: limit(&c, &name, "max_operations", &v.max_operations, limits.max_operations, u64::MAX)?,
                max_string_size: size(limit(&c, &name, "max_string_size", &v.max_string_size, limits.max_string_size as u64, u64::MAX)?),
                max_array_size: size(limit(&c, &name, "max_array_size", &v.max_array_size, limits.max_array_size as u64, u64::MAX)?),
                max_map_size: size(limit(&c, &name, "max_map_size", &v.max_map_size, limits.max_map_size as u64, u64::MAX)?),
                max_call_levels: size(limit(
                    &c,
                    &name,
                    "max_call_levels",
                    &v.max_call_levels,
                    limits.max_call_levels as u64,
                    MAX_CALL_LEVELS,
                )?),
                max_expr_depth: size(limit(&c, &name, "max_expr_depth", &v.max_expr_depth, limits.max_expr_depth as u64, MAX_CALL_LEVELS)?),
            };
            let kind = match (&v.script, &v.builtin) {
                (Some(_), Some(b)) => {
                    return Err(c.at(b.span(), format!("vat {name:?}.builtin"), "a vat has a script or a builtin, not both"))
                }
                (None, None) => {
                    return Err(c.at(span, format!("vat {name:?}"), "the vat needs `script = \"file.rhai\"` or `builtin = \"name\"`"))
                }
                (None, Some(b)) => {
                    if !BUILTINS.contains(&b.get_ref().as_str()) {
                        return Err(c.at(
                            b.span(),
                            format!("vat {name:?}.builtin"),
                            format!("no built-in vat {:?} (there are: {})", b.get_ref(), BUILTINS.join(", ")),
                        ));
                    }
                    let script_only = [
                        ("max_operations", &v.max_operations),
                        ("max_string_size", &v.max_string_size),
                        ("max_array_size", &v.max_array_size),
                        ("max_map_size", &v.max_map_size),
                        ("max_call_levels", &v.max_call_levels),
                        ("max_expr_depth", &v.max_expr_depth),
                    ];
                    if let Some((key, Some(s))) = script_only.into_iter().find(|(_, s)| s.is_some()) {
                        return Err(c.at(s.span(), format!("vat {name:?}.{key}"), "limits apply to script vats only"));
                    }
                    VatKind::Builtin(b.get_ref().clone())
                }
                (Some(s), None) => {
                    let path = dir.join(s.get_ref());
                    let key = format!("vat {name:?}.script");
                    let source = std::fs::read_to_string(&path)
                        .map_err(|e| c.at(s.span(), key.clone(), format!("cannot read script {}: {e}", path.display())))?;
                    let script = Script::compile(&source, &limits).map_err(|e| ClusterError::Invalid {
                        file: path.display().to_string(),
                        line: e.line.unwrap_or(1),
                        key: key.clone(),
                        message: e.message,
                    })?;
                    VatKind::Script { path, source, script, limits }
                }
            };
            vats.push(VatSpec { name, kind, params });
        }
        let bootstrap = match &raw.bootstrap {
            None => None,
            Some(b) if names.contains(b.get_ref()) => Some(b.get_ref().clone()),
            Some(b) => return Err(c.at(b.span(), "bootstrap", format!("no vat is named {:?}", b.get_ref()))),
        };
        let store = match &raw.store {
            Some(s) if s.get_ref().is_empty() => return Err(c.at(s.span(), "store", "the store directory may not be empty")),
            Some(s) => dir.join(s.get_ref()),
            None => {
                let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "cluster".into());
                dir.join(format!("{stem}.store"))
            }
        };
        let durability = raw.durability.as_ref().map(|d| *d.get_ref()).unwrap_or(DurabilityMode::Group);
        let network = network(&c, file, &raw)?;
        Ok(Cluster { file: file.to_path_buf(), bootstrap, store, durability, vats, network })
    }

    /// Write this cluster into `dir` as a cluster file (`cluster.toml`, with `store = "."`) and
    /// the scripts it runs (`scripts/<vat>.rhai`), so that `kernel send` can re-create the vats
    /// from the store directory alone. Each file is written to a temporary name and renamed.
    pub fn write_snapshot(&self, dir: &Path) -> std::io::Result<()> {
        let scripts = dir.join(SNAPSHOT_SCRIPTS);
        std::fs::create_dir_all(&scripts)?;
        let mut out = String::from("# Written by `kernel run`: the cluster this store was last run with.\n");
        if let Some(b) = &self.bootstrap {
            out.push_str(&format!("bootstrap = {}\n", toml_str(b)));
        }
        out.push_str("store = \".\"\n");
        out.push_str(&format!("durability = {}\n", toml_str(&format!("{:?}", self.durability).to_lowercase())));
        for v in &self.vats {
            out.push_str(&format!("\n[[vat]]\nname = {}\n", toml_str(&v.name)));
            match &v.kind {
                VatKind::Builtin(b) => out.push_str(&format!("builtin = {}\n", toml_str(b))),
                VatKind::Script { source, limits, .. } => {
                    let rel = format!("{SNAPSHOT_SCRIPTS}/{}.rhai", v.name);
                    write_atomic(&dir.join(&rel), source.as_bytes())?;
                    out.push_str(&format!("script = {}\n", toml_str(&rel)));
                    out.push_str(&format!(
                        "max_operations = {}\nmax_string_size = {}\nmax_array_size = {}\nmax_map_size = {}\nmax_call_levels = {}\nmax_expr_depth = {}\n",
                        limits.max_operations,
                        limits.max_string_size,
                        limits.max_array_size,
                        limits.max_map_size,
                        limits.max_call_levels,
                        limits.max_expr_depth
                    ));
                }
            }
            if v.params.as_object().is_some_and(|m| !m.is_empty()) {
                let table: toml::Table = serde_json::from_value(v.params.clone()).map_err(std::io::Error::other)?;
                out.push_str(&format!("params = {}\n", toml::Value::Table(table)));
            }
        }
        write_atomic(&dir.join(SNAPSHOT_FILE), out.as_bytes())
    }
}

/// The cluster file a store directory keeps (see [`Cluster::write_snapshot`]).
pub const SNAPSHOT_FILE: &str = "cluster.toml";
/// The folder of scripts beside it.
pub const SNAPSHOT_SCRIPTS: &str = "scripts";

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_keys_are_found_from_spans() {
        let src = "a = 1\n[[vat]]\nname = \"x\"\n";
        assert_eq!(line_of(src, 0), 1);
        assert_eq!(line_of(src, src.find("name").unwrap_or(0)), 3);
        assert_eq!(key_at(src, &(src.find("\"x\"").unwrap_or(0)..0)), "name");
        assert_eq!(key_at(src, &(6..7)), "[[vat]]");
    }
}
