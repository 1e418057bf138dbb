//! A kernel's long-term identity on the network: an x25519 static key pair ([`Identity`]) kept in
//! its store directory, whose public half ([`PublicKey`], 64 lowercase hex digits) names the
//! kernel to its peers; and the [`AllowList`] binding each peer's [`KernelId`] to the one key
//! that may speak for it.
//!
//! The key file (`ken-identity.key` in the store directory) is text, written once and never
//! rewritten:
//!
//! ```text
//! ken-identity 1
//! secret <64 hex digits>
//! public <64 hex digits>
//! ```
//!
//! It is created with owner-only permissions (0600) under a temporary name, synced, and linked
//! into place without replacing an existing one, so two processes starting at once end up with
//! the same key. A key file that others may read or write, that is not a regular file, or whose
//! public line does not match its secret is refused with an [`IdentityError`] rather than used.

use crate::rref::KernelId;
use serde::{Deserialize, Serialize};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The name of the key file in a store directory.
pub const IDENTITY_FILE: &str = "ken-identity.key";

/// The key file format this build writes and reads.
pub const IDENTITY_FORMAT: u32 = 1;

const MAGIC: &str = "ken-identity";

/// Length of an x25519 key, public or secret.
pub const KEY_LEN: usize = 32;

/// A key file, key text or allow-list entry that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading, creating or syncing the key file failed.
    #[error("{path}: {doing}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        doing: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// [`Identity::load_or_create`] was given a directory that holds no kernel store.
    #[error("{dir}: not a kernel store (no {record}); open the store first, then its identity")]
    NotAStore {
        /// The directory.
        dir: PathBuf,
        /// The store's format record that is missing.
        record: &'static str,
    },
    /// The key file may be read or written by others than its owner.
    #[error("{path}: the key file has permissions {mode:04o}; it must be readable by its owner only (chmod 600)")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file is not a regular file (a symlink, a directory...).
    #[error("{path}: the key file is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The key file does not hold a key this build reads.
    #[error("{path}: corrupt key file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Text that is not a public key.
    #[error("malformed public key {text:?}: expected {} hex digits", KEY_LEN * 2)]
    BadKey {
        /// The offending text.
        text: String,
    },
    /// Key generation failed (no randomness).
    #[error("generating a key pair: {0}")]
    Generate(String),
    /// Two allow-list entries name the same key: a key speaks for one kernel only.
    #[error("key {key} is allowed for both {first} and {second}")]
    DuplicateKey {
        /// The key.
        key: PublicKey,
        /// The kernel it was first allowed for.
        first: KernelId,
        /// The kernel it was allowed for again.
        second: KernelId,
    },
    /// Two allow-list entries for one kernel with different keys.
    #[error("kernel {kernel} is allowed with two keys, {first} and {second}")]
    DuplicateKernel {
        /// The kernel.
        kernel: KernelId,
        /// Its first key.
        first: PublicKey,
        /// Its second key.
        second: PublicKey,
    },
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn unhex(text: &str) -> Option<[u8; KEY_LEN]> {
    let t = text.as_bytes();
    if t.len() != KEY_LEN * 2 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = [0u8; KEY_LEN];
    for (o, pair) in out.iter_mut().zip(t.chunks_exact(2)) {
        *o = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// A kernel's public key: its identity on the network. Text: 64 lowercase hex digits (upper case
/// is accepted when parsing).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// The key from its raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        PublicKey(bytes)
    }

    /// The key from a slice, if it has the right length (e.g. a Noise remote static key).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; KEY_LEN]>::try_from(bytes).ok().map(PublicKey)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key's text as a kernel id, for clusters that name each kernel by its key (64 hex
    /// digits fit [`crate::MAX_KERNEL_ID_LEN`]).
    pub fn to_kernel_id(&self) -> KernelId {
        KernelId::try_from(self.to_string()).unwrap_or_else(|_| unreachable!("64 hex digits are a valid kernel id"))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        unhex(s).map(PublicKey).ok_or_else(|| IdentityError::BadKey { text: s.to_owned() })
    }
}

impl TryFrom<String> for PublicKey {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PublicKey> for String {
    fn from(k: PublicKey) -> String {
        k.to_string()
    }
}

/// The public key of an x25519 secret.
fn public_of(secret: &[u8; KEY_LEN]) -> PublicKey {
    let mut public = [0u8; KEY_LEN];
    if let Some(mut dh) = DefaultResolver.resolve_dh(&snow::params::DHChoice::Curve25519) {
        dh.set(secret);
        public.copy_from_slice(dh.pubkey());
    }
    PublicKey(public)
}

/// A kernel's static key pair. `Debug` never shows the secret.
#[derive(Clone)]
pub struct Identity {
    secret: [u8; KEY_LEN],
    public: PublicKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("public", &self.public).finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh key pair from the operating system's randomness.
    pub fn generate() -> Result<Identity, IdentityError> {
        let params = crate::noise::params().map_err(|e| IdentityError::Generate(e.to_string()))?;
        let pair = snow::Builder::new(params).generate_keypair().map_err(|e| IdentityError::Generate(e.to_string()))?;
        let secret = <[u8; KEY_LEN]>::try_from(pair.private.as_slice()).map_err(|_| IdentityError::Generate("wrong key length".into()))?;
        Ok(Identity::from_secret(secret))
    }

    /// The key pair of a given secret (tests and simulations derive keys from a seed).
    pub fn from_secret(secret: [u8; KEY_LEN]) -> Identity {
        Identity { public: public_of(&secret), secret }
    }

    /// The public key: this kernel's identity.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The public key as text, as `kernel id STORE` prints it and allow-lists name it.
    pub fn public_text(&self) -> String {
        self.public.to_string()
    }

    pub(crate) fn secret(&self) -> &[u8; KEY_LEN] {
        &self.secret
    }

    /// The identity of the kernel whose store is `store_dir`: read from its key file, or created
    /// there on first start. The store must exist already (open it first: kernel-store refuses
    /// to create a store in a directory holding other files).
    pub fn load_or_create(store_dir: &Path) -> Result<Identity, IdentityError> {
        let record = kernel_store::FORMAT_FILE;
        if !store_dir.join(record).is_file() {
            return Err(IdentityError::NotAStore { dir: store_dir.to_path_buf(), record });
        }
        Identity::load_or_create_file(&store_dir.join(IDENTITY_FILE))
    }

    /// The identity kept in the key file `path`, created (with its directory) if absent.
    pub fn load_or_create_file(path: &Path) -> Result<Identity, IdentityError> {
        match Identity::load(path) {
            Err(IdentityError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let io = |doing, source| IdentityError::Io { path: path.to_path_buf(), doing, source };
        fs::create_dir_all(dir).map_err(|e| IdentityError::Io { path: dir.to_path_buf(), doing: "creating the directory", source: e })?;
        let identity = Identity::generate()?;
        let mut temp = path.as_os_str().to_owned();
        temp.push(format!(".tmp-{}", std::process::id()));
        let temp = PathBuf::from(temp);
        let _ = fs::remove_file(&temp); // a leftover of an interrupted creation by a process of the same id
        let text = format!("{MAGIC} {IDENTITY_FORMAT}\nsecret {}\npublic {}\n", hex(&identity.secret), identity.public);
        let written = create_private(&temp)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
            .map_err(|e| io("writing a new key file", e));
        // Link, never rename: an identity another process created meanwhile is kept, not replaced.
        let linked = written.and_then(|()| match fs::hard_link(&temp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io("linking the new key file into place", e)),
        });
        let _ = fs::remove_file(&temp);
        if !linked? {
            return Identity::load(path);
        }
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| IdentityError::Io {
            path: dir.to_path_buf(),
            doing: "syncing the directory",
            source: e,
        })?;
        log::info!("created the kernel identity {} in {}", identity.public, path.display());
        Ok(identity)
    }

    /// Read the key file `path`, refusing one with loose permissions or that does not parse.
    pub fn load(path: &Path) -> Result<Identity, IdentityError> {
        let io = |doing, source| IdentityError::Io { path: path.to_path_buf(), doing, source };
        let meta = fs::symlink_metadata(path).map_err(|e| io("reading the key file", e))?;
        if !meta.file_type().is_file() {
            return Err(IdentityError::NotAFile { path: path.to_path_buf() });
        }
        check_private(path, &meta)?;
        let bytes = fs::read(path).map_err(|e| io("reading the key file", e))?;
        parse_key_file(&bytes).map_err(|reason| IdentityError::Corrupt { path: path.to_path_buf(), reason })
    }
}

#[cfg(unix)]
fn create_private(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

#[cfg(not(unix))]
fn create_private(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new().write(true).create_new(true).open(path)
}

#[cfg(unix)]
fn check_private(path: &Path, meta: &fs::Metadata) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions { path: path.to_path_buf(), mode });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path, _meta: &fs::Metadata) -> Result<(), IdentityError> {
    Ok(())
}

/// Decode a key file's bytes.
fn parse_key_file(bytes: &[u8]) -> Result<Identity, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?;
    let mut lines = text.lines();
    match lines.next().and_then(|l| l.strip_prefix(MAGIC)).and_then(|l| l.strip_prefix(' ')) {
        Some(v) if v == IDENTITY_FORMAT.to_string() => {}
        Some(v) => return Err(format!("format {v:?}, this build reads {IDENTITY_FORMAT}")),
        None => return Err(format!("the first line is not `{MAGIC} {IDENTITY_FORMAT}`")),
    }
    let mut field = |name: &str| {
        lines
            .next()
            .and_then(|l| l.strip_prefix(name))
            .and_then(|l| l.strip_prefix(' '))
            .and_then(unhex)
            .ok_or_else(|| format!("no `{name} <{} hex digits>` line", KEY_LEN * 2))
    };
    let secret = field("secret")?;
    let public = PublicKey(field("public")?);
    if let Some(extra) = lines.find(|l| !l.is_empty()) {
        return Err(format!("unexpected line {extra:?}"));
    }
    let identity = Identity::from_secret(secret);
    if identity.public != public {
        return Err(format!("the public key {public} is not the secret's ({})", identity.public));
    }
    Ok(identity)
}

/// The peers a kernel accepts, each bound to the one key that may speak for it. A connection
/// whose authenticated key is not here is refused; one whose `Hello` names another kernel than
/// its key's entry is refused too, so Ken state (keyed by [`KernelId`]) is reached only with
/// the peer's key, wherever it connects from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    by_key: HashMap<PublicKey, KernelId>,
    by_kernel: HashMap<KernelId, PublicKey>,
}

impl AllowList {
    /// An empty list (refuses everyone).
    pub fn new() -> Self {
        AllowList::default()
    }

    /// Allow `kernel`, authenticated by `key`. A key speaks for one kernel, a kernel has one key.
    pub fn allow(&mut self, kernel: KernelId, key: PublicKey) -> Result<(), IdentityError> {
        if let Some(first) = self.by_key.get(&key) {
            if *first == kernel {
                return Ok(());
            }
            return Err(IdentityError::DuplicateKey { key, first: first.clone(), second: kernel });
        }
        if let Some(first) = self.by_kernel.get(&kernel) {
            return Err(IdentityError::DuplicateKernel { kernel, first: *first, second: key });
        }
        self.by_key.insert(key, kernel.clone());
        self.by_kernel.insert(kernel, key);
        Ok(())
    }

    /// The list of `(kernel, key)` pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (KernelId, PublicKey)>) -> Result<Self, IdentityError> {
        let mut list = AllowList::new();
        for (kernel, key) in pairs {
            list.allow(kernel, key)?;
        }
        Ok(list)
    }

    /// The kernel `key` speaks for, if allowed.
    pub fn kernel_of(&self, key: &PublicKey) -> Option<&KernelId> {
        self.by_key.get(key)
    }

    /// The key allowed for `kernel`.
    pub fn key_of(&self, kernel: &KernelId) -> Option<&PublicKey> {
        self.by_kernel.get(kernel)
    }

    /// How many peers are allowed.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True if no peer is allowed.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The entries, in kernel id order.
    pub fn entries(&self) -> Vec<(KernelId, PublicKey)> {
        let mut v: Vec<_> = self.by_kernel.iter().map(|(k, p)| (k.clone(), *p)).collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_keys_round_trip_as_text() {
        let id = Identity::from_secret([7; KEY_LEN]);
        let text = id.public_text();
        assert_eq!(text.len(), 64);
        assert!(text.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(text.parse::<PublicKey>().expect("parse"), id.public());
        assert_eq!(text.to_uppercase().parse::<PublicKey>().expect("parse"), id.public());
        assert_eq!(id.public().to_kernel_id().as_str(), text);
        for bad in ["", "00", &text[1..], &format!("{text}0"), &text.replacen(&text[..1], "g", 1)] {
            assert!(matches!(bad.parse::<PublicKey>(), Err(IdentityError::BadKey { .. })), "{bad:?}");
        }
        assert!(!format!("{id:?}").contains(&hex(&[7; KEY_LEN])), "Debug must not show the secret");
    }

    #[test]
    fn the_public_key_is_derived_from_the_secret() {
        // RFC 7748 section 6.1 test vector (Alice).
        let secret = unhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a").expect("hex");
        let public = Identity::from_secret(secret).public_text();
        assert_eq!(public, "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
    }

    #[test]
    fn a_key_file_is_created_once_with_owner_only_permissions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join(IDENTITY_FILE);
        let first = Identity::load_or_create_file(&path).expect("create");
        let again = Identity::load_or_create_file(&path).expect("load");
        assert_eq!(first.public(), again.public());
        assert_eq!(first.secret, again.secret);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let leftovers: Vec<_> = fs::read_dir(path.parent().expect("dir")).expect("list").collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(IDENTITY_FILE);
        Identity::load_or_create_file(&path).expect("create");
        for mode in [0o644, 0o640, 0o602, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
            match Identity::load_or_create_file(&path) {
                Err(IdentityError::Permissions { mode: m, .. }) => assert_eq!(m, mode),
                other => panic!("mode {mode:o}: {other:?}"),
            }
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).expect("chmod");
        Identity::load(&path).expect("0400 is owner-only");
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        assert!(matches!(Identity::load(&link), Err(IdentityError::NotAFile { .. })));
    }

    #[test]
    fn a_corrupt_key_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(IDENTITY_FILE);
        let good = Identity::from_secret([9; KEY_LEN]);
        let other = Identity::from_secret([10; KEY_LEN]);
        let s = hex(&good.secret);
        let p = good.public_text();
        let cases = [
            String::new(),
            "garbage".into(),
            format!("ken-identity 2\nsecret {s}\npublic {p}\n"),
            format!("ken-identity 1\nsecret {}\npublic {p}\n", &s[2..]),
            format!("ken-identity 1\nsecret {s}\npublic {}\n", other.public_text()),
            format!("ken-identity 1\nsecret {s}\n"),
            format!("ken-identity 1\nsecret {s}\npublic {p}\nmore\n"),
        ];
        for text in cases {
            let _ = fs::remove_file(&path);
            create_private(&path).and_then(|mut f| f.write_all(text.as_bytes())).expect("write");
            match Identity::load_or_create_file(&path) {
                Err(IdentityError::Corrupt { .. }) => {}
                other => panic!("{text:?}: {other:?}"),
            }
            assert_eq!(fs::read_to_string(&path).expect("read"), text, "a corrupt key file is never replaced");
        }
        let _ = fs::remove_file(&path);
        let text = format!("ken-identity 1\nsecret {s}\npublic {p}\n");
        create_private(&path).and_then(|mut f| f.write_all(text.as_bytes())).expect("write");
        assert_eq!(Identity::load(&path).expect("load").public(), good.public());
    }

    #[test]
    fn the_identity_lives_in_a_store_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(Identity::load_or_create(dir.path()), Err(IdentityError::NotAStore { .. })));
        let store =
            kernel_store::FjallStore::open(dir.path(), kernel_store::StoreOptions::new(kernel_store::Durability::Sync)).expect("store");
        let id = Identity::load_or_create(dir.path()).expect("create");
        drop(store);
        // The store reopens with the key file beside it, and the key is the same.
        let store =
            kernel_store::FjallStore::open(dir.path(), kernel_store::StoreOptions::new(kernel_store::Durability::Sync)).expect("reopen");
        assert_eq!(Identity::load_or_create(dir.path()).expect("load").public(), id.public());
        drop(store);
    }

    #[test]
    fn an_allow_list_binds_one_key_to_one_kernel() {
        let (a, b) = (Identity::from_secret([1; KEY_LEN]).public(), Identity::from_secret([2; KEY_LEN]).public());
        let ka: KernelId = "a".parse().expect("id");
        let kb: KernelId = "b".parse().expect("id");
        let mut list = AllowList::from_pairs([(ka.clone(), a), (kb.clone(), b)]).expect("list");
        assert_eq!(list.kernel_of(&a), Some(&ka));
        assert_eq!(list.key_of(&kb), Some(&b));
        list.allow(ka.clone(), a).expect("the same entry again is fine");
        assert!(matches!(list.allow("c".parse().expect("id"), a), Err(IdentityError::DuplicateKey { .. })));
        assert!(matches!(list.allow(ka, Identity::from_secret([3; KEY_LEN]).public()), Err(IdentityError::DuplicateKernel { .. })));
        assert_eq!(list.len(), 2);
    }
}
