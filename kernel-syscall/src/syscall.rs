//! [`Syscall`]: the vref-level syscall handle a vat gets during a delivery. Every vref is
//! translated through the vat's c-list and every argument validated; anything illegal is
//! recorded as the crank's (sticky) verdict and returned as [`SyscallError::Illegal`].

use crate::data::VatData;
use kernel_core::{CapData, CrankContext, KPromiseId, KRef, Settlement, SyscallError, VRef};
use serde::{Deserialize, Serialize};

/// The longest vatstore key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// The largest vatstore value, in bytes.
pub const MAX_VALUE_LEN: usize = 1 << 20;

/// A vat's handle on the kernel for one delivery.
pub struct Syscall<'a, 's> {
    ctx: &'a mut CrankContext<'s>,
}

impl<'a, 's> Syscall<'a, 's> {
    /// Wrap the crank's context.
    pub fn new(ctx: &'a mut CrankContext<'s>) -> Self {
        Syscall { ctx }
    }

    /// True once this delivery can make no more syscalls (after an illegal one, or `exit`).
    pub fn is_finished(&self) -> bool {
        self.ctx.is_finished()
    }

    fn kref(&mut self, v: VRef) -> Result<KRef, SyscallError> {
        self.ctx.export(v)
    }

    fn promise(&mut self, v: VRef, role: &str) -> Result<KPromiseId, SyscallError> {
        if !v.is_promise() {
            return Err(self.ctx.illegal(format!("{role} {v} is not a promise")));
        }
        match self.kref(v)? {
            KRef::Promise(p) => Ok(p),
            KRef::Object(o) => Err(self.ctx.illegal(format!("{role} {v} maps to object {o}"))),
        }
    }

    fn data_in(&mut self, d: &VatData) -> Result<CapData, SyscallError> {
        let mut slots = Vec::with_capacity(d.slots.len());
        for v in &d.slots {
            slots.push(self.kref(*v)?);
        }
        Ok(CapData { body: d.body.clone(), slots })
    }

    fn key(&mut self, key: &str) -> Result<(), SyscallError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(self.ctx.illegal(format!("vatstore key of {} bytes is outside the vat's space (1..={MAX_KEY_LEN})", key.len())));
        }
        Ok(())
    }

    /// `send(target, method, args, result?)`. `result` must be a promise the vat decides (a fresh
    /// `p+N` allocates one).
    pub fn send(&mut self, target: VRef, method: &str, args: &VatData, result: Option<VRef>) -> Result<(), SyscallError> {
        let t = self.kref(target)?;
        let args = self.data_in(args)?;
        let result = match result {
            Some(r) => Some(self.promise(r, "result")?),
            None => None,
        };
        self.ctx.send(t, method.to_owned(), args, result)
    }

    /// `subscribe(vpid)`: a `notify` comes after the promise settles.
    pub fn subscribe(&mut self, promise: VRef) -> Result<(), SyscallError> {
        let p = self.promise(promise, "subscribed")?;
        self.ctx.subscribe(p)
    }

    /// `resolve([(vpid, rejected, data)])`: each promise must be one this vat decides.
    pub fn resolve(&mut self, resolutions: &[(VRef, bool, VatData)]) -> Result<(), SyscallError> {
        let mut out = Vec::with_capacity(resolutions.len());
        for (v, rejected, data) in resolutions {
            let p = self.promise(*v, "resolved")?;
            let d = self.data_in(data)?;
            out.push((p, if *rejected { Settlement::Rejected(d) } else { Settlement::Fulfilled(d) }));
        }
        self.ctx.resolve(out)
    }

    /// `exit(failure, info)`: this delivery commits, then the vat is terminated.
    pub fn exit(&mut self, failure: bool, info: &VatData) -> Result<(), SyscallError> {
        let info = self.data_in(info)?;
        self.ctx.exit(failure, info)
    }

    fn known(&mut self, v: VRef, what: &str) -> Result<KRef, SyscallError> {
        match self.ctx.lookup(v)? {
            Some(k) => Ok(k),
            None => Err(self.ctx.illegal(format!("{what} of {v}, which is not in the vat's c-list"))),
        }
    }

    fn known_all(&mut self, vrefs: &[VRef], what: &str) -> Result<Vec<KRef>, SyscallError> {
        let mut out = Vec::with_capacity(vrefs.len());
        for v in vrefs {
            out.push(self.known(*v, what)?);
        }
        Ok(out)
    }

    /// `dropImports`: the vat no longer reaches these imports (`o-N`; or promises it holds but
    /// does not decide, which it forgets at once).
    pub fn drop_imports(&mut self, vrefs: &[VRef]) -> Result<(), SyscallError> {
        let krefs = self.known_all(vrefs, "dropImports")?;
        self.ctx.drop_imports(&krefs)
    }

    /// `retireImports`: the vat can no longer even recognise these dropped imports.
    pub fn retire_imports(&mut self, vrefs: &[VRef]) -> Result<(), SyscallError> {
        let krefs = self.known_all(vrefs, "retireImports")?;
        self.ctx.retire_imports(&krefs)
    }

    /// `retireExports`: the vat deleted these exports after being told `dropExports`.
    pub fn retire_exports(&mut self, vrefs: &[VRef]) -> Result<(), SyscallError> {
        let krefs = self.known_all(vrefs, "retireExports")?;
        self.ctx.retire_exports(&krefs)
    }

    /// `abandonExports`: the vat stops serving these exports.
    pub fn abandon_exports(&mut self, vrefs: &[VRef]) -> Result<(), SyscallError> {
        let krefs = self.known_all(vrefs, "abandonExports")?;
        self.ctx.abandon_exports(&krefs)
    }

    /// The imports the vat can still reach, and promises it holds without deciding them: what
    /// it may drop at `bringOutYourDead`.
    pub fn held_imports(&mut self) -> Result<Vec<VRef>, SyscallError> {
        self.ctx.held_imports()
    }

    /// `vatstore get`.
    pub fn vatstore_get(&mut self, key: &str) -> Result<Option<Vec<u8>>, SyscallError> {
        self.key(key)?;
        self.ctx.vatstore_get(key.as_bytes())
    }

    /// `vatstore set`.
    pub fn vatstore_set(&mut self, key: &str, value: &[u8]) -> Result<(), SyscallError> {
        self.key(key)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(self.ctx.illegal(format!("vatstore value of {} bytes exceeds {MAX_VALUE_LEN}", value.len())));
        }
        self.ctx.vatstore_set(key.as_bytes(), value.to_vec())
    }

    /// `vatstore delete`.
    pub fn vatstore_delete(&mut self, key: &str) -> Result<(), SyscallError> {
        self.key(key)?;
        self.ctx.vatstore_delete(key.as_bytes())
    }

    /// `vatstore next-key`: the first key after `after` (`""`: the first key).
    pub fn vatstore_next_key(&mut self, after: &str) -> Result<Option<String>, SyscallError> {
        if after.len() > MAX_KEY_LEN {
            return Err(self.ctx.illegal(format!("vatstore key of {} bytes is outside the vat's space", after.len())));
        }
        let after = (!after.is_empty()).then_some(after.as_bytes());
        Ok(self.ctx.vatstore_next_key(after)?.map(|k| String::from_utf8_lossy(&k).into_owned()))
    }

    /// Execute a syscall given in text form (vrefs as strings), as an untrusted caller such as
    /// a script or a fuzzer makes them: a malformed vref or an unknown kind is illegal.
    pub fn execute(&mut self, call: &RawSyscall) -> Result<Option<String>, SyscallError> {
        match call {
            RawSyscall::Send { target, method, args, result } => {
                let target = self.parse(target)?;
                let args = self.parse_data(args)?;
                let result = match result {
                    Some(r) => Some(self.parse(r)?),
                    None => None,
                };
                self.send(target, method, &args, result).map(|()| None)
            }
            RawSyscall::Subscribe { promise } => {
                let p = self.parse(promise)?;
                self.subscribe(p).map(|()| None)
            }
            RawSyscall::Resolve { resolutions } => {
                let mut parsed = Vec::with_capacity(resolutions.len());
                for (p, rejected, data) in resolutions {
                    parsed.push((self.parse(p)?, *rejected, self.parse_data(data)?));
                }
                self.resolve(&parsed).map(|()| None)
            }
            RawSyscall::Exit { failure, info } => {
                let info = self.parse_data(info)?;
                self.exit(*failure, &info).map(|()| None)
            }
            RawSyscall::VatstoreGet { key } => Ok(self.vatstore_get(key)?.map(|v| String::from_utf8_lossy(&v).into_owned())),
            RawSyscall::VatstoreSet { key, value } => self.vatstore_set(key, value.as_bytes()).map(|()| None),
            RawSyscall::VatstoreDelete { key } => self.vatstore_delete(key).map(|()| None),
            RawSyscall::VatstoreNextKey { after } => self.vatstore_next_key(after),
            RawSyscall::DropImports { vrefs } => {
                let v = self.parse_all(vrefs)?;
                self.drop_imports(&v).map(|()| None)
            }
            RawSyscall::RetireImports { vrefs } => {
                let v = self.parse_all(vrefs)?;
                self.retire_imports(&v).map(|()| None)
            }
            RawSyscall::RetireExports { vrefs } => {
                let v = self.parse_all(vrefs)?;
                self.retire_exports(&v).map(|()| None)
            }
            RawSyscall::AbandonExports { vrefs } => {
                let v = self.parse_all(vrefs)?;
                self.abandon_exports(&v).map(|()| None)
            }
            RawSyscall::Other { kind } => Err(self.ctx.illegal(format!("unknown syscall kind {kind:?}"))),
        }
    }

    /// Parse a vref from an untrusted caller; malformed text is an illegal syscall.
    pub fn parse(&mut self, text: &str) -> Result<VRef, SyscallError> {
        text.parse::<VRef>().map_err(|e| self.ctx.illegal(e.to_string()))
    }

    fn parse_all(&mut self, texts: &[String]) -> Result<Vec<VRef>, SyscallError> {
        let mut out = Vec::with_capacity(texts.len());
        for t in texts {
            out.push(self.parse(t)?);
        }
        Ok(out)
    }

    fn parse_data(&mut self, d: &RawData) -> Result<VatData, SyscallError> {
        let mut slots = Vec::with_capacity(d.slots.len());
        for s in &d.slots {
            slots.push(self.parse(s)?);
        }
        Ok(VatData { body: d.body.as_bytes().to_vec(), slots })
    }
}

/// CapData in text form: a body and vrefs as strings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RawData {
    /// The body.
    pub body: String,
    /// The slots, as vref text.
    pub slots: Vec<String>,
}

/// A syscall in text form, as an untrusted vat (a script, a fuzzer) makes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RawSyscall {
    /// `send`.
    Send {
        /// Target vref.
        target: String,
        /// Method.
        method: String,
        /// Arguments.
        args: RawData,
        /// Result vref.
        result: Option<String>,
    },
    /// `subscribe`.
    Subscribe {
        /// Promise vref.
        promise: String,
    },
    /// `resolve`.
    Resolve {
        /// `(vpid, rejected, data)`.
        resolutions: Vec<(String, bool, RawData)>,
    },
    /// `exit`.
    Exit {
        /// Failure?
        failure: bool,
        /// Reason.
        info: RawData,
    },
    /// `vatstore get`.
    VatstoreGet {
        /// Key.
        key: String,
    },
    /// `vatstore set`.
    VatstoreSet {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// `vatstore delete`.
    VatstoreDelete {
        /// Key.
        key: String,
    },
    /// `vatstore next-key`.
    VatstoreNextKey {
        /// Start after this key.
        after: String,
    },
    /// `dropImports`.
    DropImports {
        /// The imports.
        vrefs: Vec<String>,
    },
    /// `retireImports`.
    RetireImports {
        /// The imports.
        vrefs: Vec<String>,
    },
    /// `retireExports`.
    RetireExports {
        /// The exports.
        vrefs: Vec<String>,
    },
    /// `abandonExports`.
    AbandonExports {
        /// The exports.
        vrefs: Vec<String>,
    },
    /// A kind the kernel does not know: always illegal.
    Other {
        /// What the caller called it.
        kind: String,
    },
}
