//! [`NoiseSecurity`]: the [`Security`] of secure links. Each connection runs the Noise handshake
//! `Noise_XX_25519_ChaChaPoly_BLAKE2s` (the `snow` crate) with both kernels' static keys, so both
//! sides authenticate; each side then looks the other's static key up in its [`AllowList`] and
//! refuses an unknown one before anything else is exchanged (the dialer refuses before it even
//! reveals its own key). The kernel the key is allowed as is what the transport then holds the
//! peer's `Hello` to ([`crate::check_hello`]).
//!
//! After the handshake every frame is sealed with the session's ChaCha20-Poly1305 keys under
//! Noise's implicit, incrementing nonces: a frame that was altered, replayed, reordered, dropped
//! from the middle or truncated fails to open, and the transport closes the connection before
//! anything in or after it reaches the node. A Noise message carries at most 65,535 bytes, so a
//! larger frame is sealed as consecutive full-size messages and a short last one.

use crate::identity::{AllowList, Identity, PublicKey};
use crate::rref::KernelId;
use crate::tcp::{FrameCipher, Handshake, Security};
use snow::params::NoiseParams;
use std::sync::Arc;

/// The Noise protocol name of secure links.
pub const NOISE_PROTOCOL: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";

/// Mixed into every handshake: a peer speaking another protocol (or version) fails it.
pub const PROLOGUE: &[u8] = b"ken secure link 1";

/// The largest Noise message.
const MAX_MESSAGE: usize = 65_535;
/// The authentication tag of each sealed message.
const TAG: usize = 16;
/// The most plaintext one sealed message carries.
const CHUNK: usize = MAX_MESSAGE - TAG;

/// Why a secure handshake or frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkSecurityError {
    /// The Noise machinery refused (a malformed or forged handshake message, an exhausted nonce).
    #[error("noise: {0}")]
    Noise(String),
    /// The peer authenticated with a key that is not in the allow-list.
    #[error("the peer's key {0} is not allowed")]
    UnknownKey(PublicKey),
    /// The handshake completed without the peer's static key (cannot happen with XX).
    #[error("the peer did not present a static key")]
    NoStaticKey,
    /// A handshake message arrived when it was ours to send, or after the handshake.
    #[error("handshake message out of turn")]
    OutOfTurn,
    /// A sealed frame too short to hold an authentication tag.
    #[error("sealed frame of {len} bytes is truncated")]
    Truncated {
        /// Its length.
        len: usize,
    },
    /// A sealed frame that does not authenticate: altered, replayed, reordered or truncated.
    #[error("frame failed authentication (altered, replayed, reordered or truncated)")]
    Tampered,
    /// The session was not established (the handshake did not finish).
    #[error("no session")]
    NoSession,
    /// An earlier frame failed to open: nothing more is opened on this session.
    #[error("an earlier frame failed to open")]
    ReceivingClosed,
}

fn noise(e: snow::Error) -> LinkSecurityError {
    LinkSecurityError::Noise(e.to_string())
}

/// The parsed [`NOISE_PROTOCOL`].
pub(crate) fn params() -> Result<NoiseParams, snow::Error> {
    NOISE_PROTOCOL.parse()
}

/// The length of a frame of `plain` bytes once sealed.
pub fn sealed_len(plain: usize) -> usize {
    plain + TAG * plain.div_ceil(CHUNK).max(1)
}

/// Mutually authenticated, encrypted connections for the kernel of `identity`, accepting the
/// peers of an [`AllowList`].
#[derive(Clone)]
pub struct NoiseSecurity {
    identity: Identity,
    allow: Arc<AllowList>,
}

impl std::fmt::Debug for NoiseSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseSecurity").field("public", &self.identity.public()).field("allowed", &self.allow.len()).finish()
    }
}

impl NoiseSecurity {
    /// Secure links for `identity`, with the peers `allow` lets in.
    pub fn new(identity: &Identity, allow: AllowList) -> Self {
        NoiseSecurity { identity: identity.clone(), allow: Arc::new(allow) }
    }

    /// This kernel's public key.
    pub fn public(&self) -> PublicKey {
        self.identity.public()
    }

    /// The peers accepted.
    pub fn allow_list(&self) -> &AllowList {
        &self.allow
    }

    /// A handshake as the dialer (`initiator`) or the acceptor, typed (see [`Security::begin`]).
    pub fn handshake(&self, initiator: bool) -> NoiseHandshake {
        let build = || {
            let builder = snow::Builder::new(params()?).local_private_key(self.identity.secret())?.prologue(PROLOGUE)?;
            if initiator {
                builder.build_initiator()
            } else {
                builder.build_responder()
            }
        };
        match build() {
            Ok(state) => NoiseHandshake { state: Some(state), allow: Arc::clone(&self.allow), peer: None, failed: None },
            Err(e) => NoiseHandshake { state: None, allow: Arc::clone(&self.allow), peer: None, failed: Some(noise(e)) },
        }
    }
}

impl Security for NoiseSecurity {
    fn begin(&self, initiator: bool) -> Box<dyn Handshake> {
        Box::new(self.handshake(initiator))
    }
}

/// One side of a connection's Noise handshake.
pub struct NoiseHandshake {
    state: Option<snow::HandshakeState>,
    allow: Arc<AllowList>,
    peer: Option<KernelId>,
    failed: Option<LinkSecurityError>,
}

impl std::fmt::Debug for NoiseHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseHandshake").field("peer", &self.peer).field("failed", &self.failed).finish_non_exhaustive()
    }
}

impl NoiseHandshake {
    /// [`Handshake::step`] with a typed error. After an error the handshake is dead.
    pub fn advance(&mut self, incoming: Option<&[u8]>) -> Result<(Option<Vec<u8>>, bool), LinkSecurityError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.advance_inner(incoming);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
            self.state = None;
        }
        r
    }

    fn advance_inner(&mut self, incoming: Option<&[u8]>) -> Result<(Option<Vec<u8>>, bool), LinkSecurityError> {
        let state = self.state.as_mut().ok_or(LinkSecurityError::NoSession)?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        if let Some(message) = incoming {
            if state.is_my_turn() || state.is_handshake_finished() {
                return Err(LinkSecurityError::OutOfTurn);
            }
            state.read_message(message, &mut buf).map_err(noise)?;
            if self.peer.is_none() {
                if let Some(key) = state.get_remote_static() {
                    let key = PublicKey::from_slice(key).ok_or(LinkSecurityError::NoStaticKey)?;
                    let kernel = self.allow.kernel_of(&key).ok_or(LinkSecurityError::UnknownKey(key))?;
                    self.peer = Some(kernel.clone());
                }
            }
        }
        if state.is_handshake_finished() {
            return self.finished(None);
        }
        if !state.is_my_turn() {
            return Ok((None, false));
        }
        let n = state.write_message(&[], &mut buf).map_err(noise)?;
        buf.truncate(n);
        if state.is_handshake_finished() {
            return self.finished(Some(buf));
        }
        Ok((Some(buf), false))
    }

    fn finished(&self, last: Option<Vec<u8>>) -> Result<(Option<Vec<u8>>, bool), LinkSecurityError> {
        if self.peer.is_none() {
            return Err(LinkSecurityError::NoStaticKey);
        }
        Ok((last, true))
    }

    /// The session cipher, once the handshake is complete.
    pub fn into_cipher(self) -> Result<NoiseCipher, LinkSecurityError> {
        let state = self.state.ok_or(LinkSecurityError::NoSession)?;
        if self.peer.is_none() {
            return Err(LinkSecurityError::NoStaticKey);
        }
        Ok(NoiseCipher { state: Some(state.into_transport_mode().map_err(noise)?), receiving: true })
    }
}

impl Handshake for NoiseHandshake {
    fn step(&mut self, incoming: Option<&[u8]>) -> Result<(Option<Vec<u8>>, bool), String> {
        self.advance(incoming).map_err(|e| e.to_string())
    }

    fn authenticated(&self) -> Option<KernelId> {
        self.peer.clone()
    }

    fn finish(self: Box<Self>) -> Box<dyn FrameCipher> {
        match self.into_cipher() {
            Ok(c) => Box::new(c),
            Err(_) => Box::new(NoiseCipher { state: None, receiving: false }),
        }
    }
}

/// The session of a secure link: seals and opens frames in order. A frame that fails to open
/// ends the receiving side (every later one fails too: a frame split over several Noise messages
/// may have consumed nonces); sealing is unaffected, so the reason the connection closes is the
/// reader's.
pub struct NoiseCipher {
    state: Option<snow::TransportState>,
    receiving: bool,
}

impl std::fmt::Debug for NoiseCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseCipher").field("session", &self.state.is_some()).field("receiving", &self.receiving).finish()
    }
}

impl NoiseCipher {
    /// Seal `plain` as the next frame.
    pub fn seal_frame(&mut self, plain: &[u8]) -> Result<Vec<u8>, LinkSecurityError> {
        let state = self.state.as_mut().ok_or(LinkSecurityError::NoSession)?;
        let mut out = vec![0u8; sealed_len(plain.len())];
        let mut at = 0;
        let mut chunks = plain.chunks(CHUNK);
        let first = chunks.next().unwrap_or(&[]);
        for chunk in std::iter::once(first).chain(chunks) {
            at += state.write_message(chunk, &mut out[at..]).map_err(noise)?;
        }
        out.truncate(at);
        Ok(out)
    }

    /// Open the next frame, refusing one that does not authenticate as exactly the next.
    pub fn open_frame(&mut self, sealed: &[u8]) -> Result<Vec<u8>, LinkSecurityError> {
        if !self.receiving {
            return Err(LinkSecurityError::ReceivingClosed);
        }
        let r = self.open_inner(sealed);
        if r.is_err() {
            self.receiving = false;
        }
        r
    }

    fn open_inner(&mut self, sealed: &[u8]) -> Result<Vec<u8>, LinkSecurityError> {
        let state = self.state.as_mut().ok_or(LinkSecurityError::NoSession)?;
        // Every message but the last is full; the last holds at least a tag.
        let tail = sealed.len() % MAX_MESSAGE;
        if sealed.len() < TAG || (tail != 0 && tail < TAG) {
            return Err(LinkSecurityError::Truncated { len: sealed.len() });
        }
        let mut out = vec![0u8; sealed.len()];
        let mut at = 0;
        for chunk in sealed.chunks(MAX_MESSAGE) {
            at += state.read_message(chunk, &mut out[at..]).map_err(|_| LinkSecurityError::Tampered)?;
        }
        out.truncate(at);
        Ok(out)
    }
}

impl FrameCipher for NoiseCipher {
    fn seal(&mut self, plain: Vec<u8>) -> Result<Vec<u8>, String> {
        self.seal_frame(&plain).map_err(|e| e.to_string())
    }

    fn open(&mut self, sealed: Vec<u8>) -> Result<Vec<u8>, String> {
        self.open_frame(&sealed).map_err(|e| e.to_string())
    }

    fn max_sealed(&self, max_plain: usize) -> usize {
        sealed_len(max_plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::KEY_LEN;

    fn id(s: &str) -> KernelId {
        s.parse().expect("id")
    }

    fn pair(allow_a: &[(&str, &Identity)], allow_b: &[(&str, &Identity)]) -> (NoiseSecurity, NoiseSecurity, Identity, Identity) {
        let (a, b) = (Identity::from_secret([1; KEY_LEN]), Identity::from_secret([2; KEY_LEN]));
        let list = |l: &[(&str, &Identity)]| AllowList::from_pairs(l.iter().map(|(n, i)| (id(n), i.public()))).expect("list");
        (NoiseSecurity::new(&a, list(allow_a)), NoiseSecurity::new(&b, list(allow_b)), a, b)
    }

    /// Run a handshake between a dialer and an acceptor as the transport does.
    fn run(i: &mut NoiseHandshake, r: &mut NoiseHandshake) -> Result<(), LinkSecurityError> {
        let (mut to_r, mut to_i) = (None::<Vec<u8>>, None::<Vec<u8>>);
        let (mut i_done, mut r_done) = (false, false);
        let (m, d) = i.advance(None)?;
        to_r = m.or(to_r);
        i_done |= d;
        let (m, d) = r.advance(None)?;
        assert!(m.is_none() && !d);
        for _ in 0..4 {
            if let Some(m) = to_r.take() {
                let (out, d) = r.advance(Some(&m))?;
                to_i = out;
                r_done |= d;
            }
            if let Some(m) = to_i.take() {
                let (out, d) = i.advance(Some(&m))?;
                to_r = out;
                i_done |= d;
            }
        }
        assert!(i_done && r_done);
        Ok(())
    }

    #[test]
    fn allowed_peers_authenticate_each_other_and_talk() {
        let a = Identity::from_secret([1; KEY_LEN]);
        let b = Identity::from_secret([2; KEY_LEN]);
        let (sa, sb, _, _) = pair(&[("b", &b)], &[("a", &a)]);
        let (mut i, mut r) = (sa.handshake(true), sb.handshake(false));
        run(&mut i, &mut r).expect("handshake");
        assert_eq!(i.peer, Some(id("b")));
        assert_eq!(r.peer, Some(id("a")));
        let (mut ci, mut cr) = (i.into_cipher().expect("cipher"), r.into_cipher().expect("cipher"));
        for len in [0, 1, 100, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7] {
            let plain: Vec<u8> = (0..len).map(|n| n as u8).collect();
            let sealed = ci.seal_frame(&plain).expect("seal");
            assert_eq!(sealed.len(), sealed_len(len));
            // Ciphertext is random-looking: a byte or two of it equals the plaintext by chance
            // (a 1-byte frame failed this once in 256), eight or more do not.
            if len >= 8 {
                assert_ne!(&sealed[..len.min(16)], &plain[..len.min(16)], "sealed is not plain");
            }
            assert_eq!(cr.open_frame(&sealed).expect("open"), plain);
            let back = cr.seal_frame(&plain).expect("seal");
            assert_eq!(ci.open_frame(&back).expect("open"), plain);
        }
    }

    #[test]
    fn unknown_keys_are_refused_on_both_sides() {
        let a = Identity::from_secret([1; KEY_LEN]);
        let b = Identity::from_secret([2; KEY_LEN]);
        // b does not know a: the acceptor refuses on the last message.
        let (sa, sb, _, _) = pair(&[("b", &b)], &[]);
        let e = run(&mut sa.handshake(true), &mut sb.handshake(false)).expect_err("refused");
        assert_eq!(e, LinkSecurityError::UnknownKey(a.public()));
        // a does not know b: the dialer refuses before revealing its key.
        let (sa, sb, _, _) = pair(&[], &[("a", &a)]);
        let e = run(&mut sa.handshake(true), &mut sb.handshake(false)).expect_err("refused");
        assert_eq!(e, LinkSecurityError::UnknownKey(b.public()));
    }

    #[test]
    fn replayed_reordered_and_altered_frames_do_not_open() {
        let a = Identity::from_secret([1; KEY_LEN]);
        let b = Identity::from_secret([2; KEY_LEN]);
        let (sa, sb, _, _) = pair(&[("b", &b)], &[("a", &a)]);
        let (mut i, mut r) = (sa.handshake(true), sb.handshake(false));
        run(&mut i, &mut r).expect("handshake");
        let mut ci = i.into_cipher().expect("cipher");
        let fresh = |r: &NoiseSecurity, s: &NoiseSecurity| {
            let (mut i, mut rr) = (r.handshake(true), s.handshake(false));
            run(&mut i, &mut rr).expect("handshake");
            (i.into_cipher().expect("c"), rr.into_cipher().expect("c"))
        };
        let mut cr = r.into_cipher().expect("cipher");
        let one = ci.seal_frame(b"one").expect("seal");
        let two = ci.seal_frame(b"two").expect("seal");
        assert_eq!(cr.open_frame(&one).expect("open"), b"one");
        assert_eq!(cr.open_frame(&one), Err(LinkSecurityError::Tampered), "a replay fails");
        assert_eq!(cr.open_frame(&two), Err(LinkSecurityError::ReceivingClosed), "and receiving is over");
        let back = cr.seal_frame(b"still sealing").expect("sealing goes on");
        assert_eq!(ci.open_frame(&back).expect("open"), b"still sealing");
        // Reordered.
        let (mut ci, mut cr) = fresh(&sa, &sb);
        let one = ci.seal_frame(b"one").expect("seal");
        let two = ci.seal_frame(b"two").expect("seal");
        assert_eq!(cr.open_frame(&two), Err(LinkSecurityError::Tampered));
        drop(one);
        // Altered, every byte position.
        let (mut ci, _) = fresh(&sa, &sb);
        let sealed = ci.seal_frame(b"hello there").expect("seal");
        for at in 0..sealed.len() {
            let (mut ci, mut cr) = fresh(&sa, &sb);
            let mut s = ci.seal_frame(b"hello there").expect("seal");
            s[at] ^= 0x01;
            assert_eq!(cr.open_frame(&s), Err(LinkSecurityError::Tampered), "flip at {at}");
        }
        // Truncated.
        let (mut ci, mut cr) = fresh(&sa, &sb);
        let s = ci.seal_frame(&[7; 100]).expect("seal");
        assert!(cr.open_frame(&s[..s.len() - 1]).is_err());
        let (mut ci, mut cr) = fresh(&sa, &sb);
        let s = ci.seal_frame(&[7; 100]).expect("seal");
        assert_eq!(cr.open_frame(&s[..10]), Err(LinkSecurityError::Truncated { len: 10 }));
    }
}
