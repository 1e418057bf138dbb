//! The host side of a cluster: the store directory, attaching a cluster's vats to a kernel,
//! the first-run bootstrap, and one line per crank.
//!
//! A **store directory** (`kernel run --store DIR`, default beside the cluster file) holds:
//! - `kernel/`: the kernel store (kernel-store's fjall store);
//! - `cluster.toml` and `scripts/`: the cluster this store was last run with, written by every
//!   `kernel run` before it opens the store (see [`Cluster::write_snapshot`]). `kernel send`
//!   re-creates the vats from it, so the store directory alone is enough to talk to the cluster.

use crate::builtins;
use crate::cluster::{Cluster, VatKind, VatSpec, SNAPSHOT_FILE, SNAPSHOT_SCRIPTS};
use crate::codec;
use crate::script::{LogLine, LogSink, ScriptVat};
use kernel_core::{
    CapData, CrankInput, CrankOutcome, CrankReport, Endpoint, EndpointId, EndpointStatus, KObjectId, KPromiseId, KRef, Kernel, KernelError,
    PromiseState, Settlement, Store,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The kernel store inside a store directory.
pub const KERNEL_DIR: &str = "kernel";

/// Everything a store directory may hold (with the temporaries of an interrupted snapshot).
pub const STORE_DIR_ENTRIES: &[&str] = &[KERNEL_DIR, SNAPSHOT_FILE, SNAPSHOT_SCRIPTS, "cluster.tmp"];

/// Why a cluster cannot be attached to a store.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The kernel or its store failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The store and the cluster file disagree about the vats.
    #[error("{0}")]
    Mismatch(String),
}

/// The kernel store directory inside store directory `store`.
pub fn kernel_dir(store: &Path) -> PathBuf {
    store.join(KERNEL_DIR)
}

/// True if `store` holds a kernel store (created by `kernel run`).
pub fn is_store_dir(store: &Path) -> bool {
    kernel_dir(store).join(kernel_store::FORMAT_FILE).is_file()
}

/// The cluster file kept in store directory `store`.
pub fn snapshot_file(store: &Path) -> PathBuf {
    store.join(SNAPSHOT_FILE)
}

/// A fresh endpoint for `spec`, logging to `logs`.
pub fn endpoint_for(spec: &VatSpec, logs: &LogSink) -> Result<Box<dyn Endpoint>, HostError> {
    match &spec.kind {
        VatKind::Script { script, limits, .. } => {
            let params =
                codec::decode(&kernel_syscall::VatData::plain(spec.params.to_string())).try_cast::<rhai::Map>().unwrap_or_default();
            Ok(ScriptVat::new(&spec.name, script.clone(), *limits, params, LogSink::clone(logs)).endpoint())
        }
        VatKind::Builtin(name) => {
            builtins::builtin(name, &spec.params).ok_or_else(|| HostError::Mismatch(format!("no built-in vat {name:?}")))
        }
    }
}

/// A kernel with a cluster's vats attached.
pub struct Host<S: Store> {
    kernel: Kernel<S>,
    vats: Vats,
}

/// A cluster's vats attached to a kernel owned elsewhere (by a `kernel_remote::Node` in
/// `kernel serve`): their names and the log lines they write.
pub struct Vats {
    names: HashMap<EndpointId, String>,
    logs: LogSink,
}

/// What [`Host::attach`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A new store: the vats were added and the bootstrap message queued (if the cluster names
    /// a bootstrap vat) with this result promise.
    Bootstrapped(Option<KPromiseId>),
    /// A new store of a cluster with a `[network]` table, attached without its peers (`kernel
    /// run`): the vats were added, and the bootstrap waits for the first `kernel serve`.
    Deferred,
    /// An existing store: the vats were re-attached; it resumes after this many cranks.
    Resumed {
        /// Cranks committed before.
        cranks: u64,
        /// Items waiting in the run queue.
        queued: u64,
    },
}

/// The prefix of the endpoint names of peer links (`kernel_remote::link_endpoint_name`).
const LINK_PREFIX: &str = "ken:";

impl Vats {
    /// Attach `cluster`'s vats to `kernel`. A store that never ran gets the vats added (in file
    /// order) and the bootstrap message queued; a store that ran must hold exactly the
    /// cluster's vats (besides peer links), which are re-attached (no second bootstrap).
    ///
    /// A cluster with a `[network]` table bootstraps with `bootstrap(vats, peers)`, `peers`
    /// mapping each peer's name to its bootstrap object: `peers` are those objects (`kernel
    /// serve`); without them (`None`, `kernel run`) the bootstrap is left for the first serve.
    pub fn attach<S: Store>(
        kernel: &mut Kernel<S>,
        cluster: &Cluster,
        peers: Option<&[(String, KObjectId)]>,
    ) -> Result<(Vats, Start), HostError> {
        let fresh = kernel.cranks().0 == 0 && kernel.queue_len() == 0;
        let stored = kernel.endpoints()?;
        for (_, rec) in &stored {
            if !rec.name.starts_with(LINK_PREFIX) && !cluster.vats.iter().any(|v| v.name == rec.name) {
                return Err(HostError::Mismatch(format!(
                    "the store has a vat {:?} that {} does not name; the cluster's vats cannot change once it has run",
                    rec.name,
                    cluster.file.display()
                )));
            }
        }
        if !fresh {
            if let Some(v) = cluster.vats.iter().find(|v| !stored.iter().any(|(_, r)| r.name == v.name)) {
                return Err(HostError::Mismatch(format!(
                    "{} names a vat {:?} that the store does not have; the cluster's vats cannot change once it has run",
                    cluster.file.display(),
                    v.name
                )));
            }
        }
        let logs = LogSink::default();
        let mut names = HashMap::new();
        let mut eps = Vec::new();
        for spec in &cluster.vats {
            let ep = kernel.add_endpoint(&spec.name, endpoint_for(spec, &logs)?)?;
            names.insert(ep, spec.name.clone());
            eps.push((spec.name.clone(), ep));
        }
        let start = if !fresh {
            Start::Resumed { cranks: kernel.cranks().0, queued: kernel.queue_len() }
        } else if cluster.network.is_some() && peers.is_none() && cluster.bootstrap.is_some() {
            Start::Deferred
        } else {
            // Nothing has run, so no vat is terminated and every root is in its c-list.
            let roots = eps.iter().map(|(n, ep)| Ok((n.clone(), kernel.root(*ep)?))).collect::<Result<Vec<_>, KernelError>>()?;
            let mut answer = None;
            if let Some(b) = &cluster.bootstrap {
                let mut slots: Vec<KRef> = Vec::new();
                let mut vats = serde_json::Map::new();
                for (name, root) in &roots {
                    vats.insert(name.clone(), serde_json::json!({ "$slot": slots.len() }));
                    slots.push((*root).into());
                }
                let mut args = vec![serde_json::Value::Object(vats)];
                if let Some(peers) = peers {
                    let mut map = serde_json::Map::new();
                    for (name, root) in peers {
                        map.insert(name.clone(), serde_json::json!({ "$slot": slots.len() }));
                        slots.push((*root).into());
                    }
                    args.push(serde_json::Value::Object(map));
                }
                let body = serde_json::Value::Array(args).to_string();
                let args = CapData { body: body.into_bytes(), slots };
                let target =
                    roots.iter().find(|(n, _)| n == b).map(|(_, r)| *r).ok_or_else(|| HostError::Mismatch(format!("no vat {b:?}")))?;
                answer = Some(kernel.queue_message(target.into(), "bootstrap", args)?);
            }
            Start::Bootstrapped(answer)
        };
        Ok((Vats { names, logs }, start))
    }

    /// A vat's name.
    pub fn name(&self, ep: EndpointId) -> String {
        self.names.get(&ep).cloned().unwrap_or_else(|| ep.to_string())
    }

    /// Show endpoint `ep` (not a vat: a peer link) as `name` in crank lines.
    pub fn name_endpoint(&mut self, ep: EndpointId, name: String) {
        self.names.entry(ep).or_insert(name);
    }

    /// The vat named `name`.
    pub fn endpoint(&self, name: &str) -> Option<EndpointId> {
        self.names.iter().find(|(_, n)| *n == name).map(|(ep, _)| *ep)
    }

    /// The lines the vats logged since the last call.
    pub fn take_logs(&self) -> Vec<LogLine> {
        std::mem::take(&mut *self.logs.borrow_mut())
    }

    /// The transcript line of a crank: number, who got what, and how it ended.
    pub fn crank_line<S: Store>(&self, kernel: &Kernel<S>, r: &CrankReport) -> String {
        let what = match &r.input {
            CrankInput::Send { target, method, delivered_to: Some(ep) } => format!("{} <- {target}.{method}", self.name(*ep)),
            CrankInput::Send { target, method, delivered_to: None } => format!("kernel <- {target}.{method}{}", routed(kernel, *target)),
            CrankInput::Notify { endpoint, promise, delivered: true } => format!("{} <- notify {promise}", self.name(*endpoint)),
            CrankInput::Notify { endpoint, promise, delivered: false } => {
                format!("kernel: notify {promise} for {} dropped", self.name(*endpoint))
            }
            CrankInput::Gc { endpoint, action, delivered: true } => format!("{} <- {action}", self.name(*endpoint)),
            CrankInput::Gc { endpoint, action, delivered: false } => format!("kernel: {action} for {} skipped", self.name(*endpoint)),
        };
        let outcome = match &r.outcome {
            CrankOutcome::Committed if r.flushed > 0 => format!("committed, {} queued", r.flushed),
            CrankOutcome::Committed => "committed".to_owned(),
            CrankOutcome::Exited { endpoint, failure } => {
                format!("committed; {} exited{}", self.name(*endpoint), if *failure { " with failure" } else { "" })
            }
            CrankOutcome::Aborted { endpoint, fault } => format!("ABORTED: {fault}; {} terminated", self.name(*endpoint)),
        };
        format!("{:>5}  {what:<30} {outcome}", r.crank.0)
    }
}

/// Where the kernel put a send it did not deliver: queued on an unresolved promise, or its
/// result rejected.
fn routed<S: Store>(kernel: &Kernel<S>, target: KRef) -> String {
    let mut at = target;
    for _ in 0..64 {
        let KRef::Promise(kp) = at else { break };
        match kernel.promise(kp) {
            Ok(Some(PromiseState::Unresolved { .. })) => return format!(" (queued on {kp})"),
            Ok(Some(PromiseState::Settled(Settlement::Fulfilled(d)))) => match d.as_reference() {
                Some(next) => at = next,
                None => break,
            },
            _ => break,
        }
    }
    " (rejected)".to_owned()
}

impl<S: Store> Host<S> {
    /// Attach `cluster`'s vats to `kernel` (see [`Vats::attach`]; no peers).
    pub fn attach(mut kernel: Kernel<S>, cluster: &Cluster) -> Result<(Host<S>, Start), HostError> {
        let (vats, start) = Vats::attach(&mut kernel, cluster, None)?;
        Ok((Host { kernel, vats }, start))
    }

    /// The kernel.
    pub fn kernel(&self) -> &Kernel<S> {
        &self.kernel
    }

    /// The kernel, mutably (to queue messages).
    pub fn kernel_mut(&mut self) -> &mut Kernel<S> {
        &mut self.kernel
    }

    /// Close, giving back the kernel.
    pub fn into_kernel(self) -> Kernel<S> {
        self.kernel
    }

    /// A vat's name.
    pub fn name(&self, ep: EndpointId) -> String {
        self.vats.name(ep)
    }

    /// The vat named `name`.
    pub fn endpoint(&self, name: &str) -> Option<EndpointId> {
        self.vats.endpoint(name)
    }

    /// Run one crank; with it, the lines the vats logged during it.
    pub fn step(&mut self) -> Result<Option<(CrankReport, Vec<LogLine>)>, KernelError> {
        let report = self.kernel.step()?;
        let logs = self.vats.take_logs();
        Ok(report.map(|r| (r, logs)))
    }

    /// The transcript line of a crank: number, who got what, and how it ended.
    pub fn crank_line(&self, r: &CrankReport) -> String {
        self.vats.crank_line(&self.kernel, r)
    }

    /// Queue a `bringOutYourDead` for every live vat (immediate path).
    pub fn reap_all(&mut self) -> Result<(), KernelError> {
        let mut eps: Vec<EndpointId> = self.vats.names.keys().copied().collect();
        eps.sort();
        for ep in eps {
            if matches!(self.kernel.endpoint(ep)?.map(|r| r.status), Some(EndpointStatus::Live)) {
                self.kernel.reap(ep)?;
            }
        }
        Ok(())
    }

    /// The names of the terminated vats.
    pub fn terminated(&self) -> Result<Vec<String>, KernelError> {
        Ok(self
            .kernel
            .endpoints()?
            .into_iter()
            .filter(|(_, r)| matches!(r.status, EndpointStatus::Terminated { .. }))
            .map(|(_, r)| r.name)
            .collect())
    }
}
