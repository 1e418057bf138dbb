//! Hostile bytes against the secure link, fed straight to the code a connection runs (no
//! sockets): random garbage, truncated and bit-flipped sealed frames to the session cipher and
//! the reader's frame check ([`receive_frame`]), garbage handshake messages to both sides of the
//! Noise handshake, and garbage plaintext to the frame decoder and the `Hello` check. Nothing
//! panics; nothing garbage reaches the node; and a node that is handed whatever survives applies
//! nothing (10,000+ cases in all).

use kernel_core::{Kernel, MemStore};
use kernel_remote::tcp::receive_frame;
use kernel_remote::{
    check_hello, AllowList, Frame, Identity, KernelId, Node, NoiseCipher, NoiseHandshake, NoiseSecurity, PeerSeq, RemoteConfig, Transport,
    TransportEvent, WireData, WireMessage, KEY_LEN,
};
use proptest::prelude::*;
use std::cell::RefCell;

const MAX: usize = 1 << 20;

fn id(s: &str) -> KernelId {
    s.parse().expect("kernel id")
}

fn securities() -> (NoiseSecurity, NoiseSecurity) {
    let (a, b) = (Identity::from_secret([1; KEY_LEN]), Identity::from_secret([2; KEY_LEN]));
    let sa = NoiseSecurity::new(&a, AllowList::from_pairs([(id("b"), b.public())]).expect("list"));
    let sb = NoiseSecurity::new(&b, AllowList::from_pairs([(id("a"), a.public())]).expect("list"));
    (sa, sb)
}

/// A fresh session: (dialer's cipher, acceptor's cipher).
fn session(sa: &NoiseSecurity, sb: &NoiseSecurity) -> (NoiseCipher, NoiseCipher) {
    let (mut i, mut r) = (sa.handshake(true), sb.handshake(false));
    let (m1, _) = i.advance(None).expect("m1");
    assert_eq!(r.advance(None).expect("wait"), (None, false));
    let (m2, _) = r.advance(m1.as_deref()).expect("m2");
    let (m3, done) = i.advance(m2.as_deref()).expect("m3");
    assert!(done);
    assert!(r.advance(m3.as_deref()).expect("done").1);
    (i.into_cipher().expect("cipher"), r.into_cipher().expect("cipher"))
}

/// The handshake messages of one good run, to corrupt.
fn transcript(sa: &NoiseSecurity, sb: &NoiseSecurity) -> Vec<Vec<u8>> {
    let (mut i, mut r) = (sa.handshake(true), sb.handshake(false));
    let m1 = i.advance(None).expect("m1").0.expect("m1");
    let _ = r.advance(None);
    let m2 = r.advance(Some(&m1)).expect("m2").0.expect("m2");
    let m3 = i.advance(Some(&m2)).expect("m3").0.expect("m3");
    vec![m1, m2, m3]
}

/// A transport that records what the node does and delivers nothing.
#[derive(Default)]
struct Sink {
    closed: Vec<String>,
}

impl Transport for Sink {
    fn send(&mut self, _: &KernelId, _: Vec<u8>) {}
    fn close(&mut self, _: &KernelId, reason: &str) {
        self.closed.push(reason.to_owned());
    }
    fn poll_event(&mut self) -> Option<TransportEvent> {
        None
    }
}

fn node() -> Node<MemStore> {
    let mut node = Node::new(Kernel::open(MemStore::new()).expect("open"), id("b"), RemoteConfig::default());
    node.add_peer(id("a")).expect("peer");
    node
}

fn data_frame(seq: u64) -> Vec<u8> {
    let message =
        WireMessage::Deliver { target: "ro-0".parse().expect("rref"), method: "m".into(), args: WireData::default(), result: None };
    Frame::Data { seq: PeerSeq(seq), message: message.encode().expect("encode") }.encode().expect("frame")
}

thread_local! {
    static SESSION: RefCell<Option<(NoiseSecurity, NoiseSecurity)>> = const { RefCell::new(None) };
}

fn with_securities<R>(f: impl FnOnce(&NoiseSecurity, &NoiseSecurity) -> R) -> R {
    SESSION.with(|s| {
        let mut s = s.borrow_mut();
        let (a, b) = s.get_or_insert_with(securities);
        f(a, b)
    })
}

proptest! {
    // Each case runs a Noise handshake (about a millisecond): 3,500 of them.
    #![proptest_config(ProptestConfig { cases: 1_200, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random bytes as a sealed frame: refused by the reader, never handed on.
    #[test]
    fn garbage_sealed_frames_never_open(garbage in prop::collection::vec(any::<u8>(), 0..300)) {
        with_securities(|sa, sb| {
            let (_, mut cr) = session(sa, sb);
            prop_assert!(receive_frame(&mut cr, garbage, MAX).is_err());
            Ok(())
        })?;
    }

    /// A genuine sealed frame, truncated or with bytes flipped or appended: refused.
    #[test]
    fn truncated_or_altered_frames_never_open(
        len in 1usize..200,
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        extra in prop::collection::vec(any::<u8>(), 0..4),
        mode in 0u8..3,
    ) {
        with_securities(|sa, sb| {
            let (mut ci, mut cr) = session(sa, sb);
            let plain = data_frame(len as u64);
            let sealed = ci.seal_frame(&plain).expect("seal");
            let bad = match mode {
                0 => sealed[..cut.index(sealed.len())].to_vec(),
                1 => {
                    let mut s = sealed.clone();
                    s.extend_from_slice(&extra);
                    for (at, x) in &flips {
                        s[at.index(sealed.len())] ^= x;
                    }
                    if s == sealed {
                        s.push(0);
                    }
                    s
                }
                _ => {
                    let mut s = sealed.clone();
                    s.extend_from_slice(&extra);
                    if s == sealed {
                        s[0] ^= 1;
                    }
                    s
                }
            };
            prop_assert!(receive_frame(&mut cr, bad, MAX).is_err());
            // The session is over: even the genuine frame is refused now.
            prop_assert!(receive_frame(&mut cr, sealed, MAX).is_err());
            Ok(())
        })?;
    }

    /// Garbage in place of any handshake message, or any of them corrupted: the handshake fails
    /// or (for the first message, which is only an ephemeral key) goes on to fail later; no side
    /// ever completes with an authenticated peer it did not talk to.
    #[test]
    fn corrupted_handshakes_never_authenticate(
        which in 0usize..3,
        garbage in prop::collection::vec(any::<u8>(), 0..200),
        replace in any::<bool>(),
        at in any::<prop::sample::Index>(),
        x in 1u8..=255,
    ) {
        with_securities(|sa, sb| {
            let mut msgs = transcript(sa, sb);
            if replace {
                msgs[which] = garbage;
            } else {
                let n = msgs[which].len();
                msgs[which][at.index(n)] ^= x;
            }
            let (mut i, mut r): (NoiseHandshake, NoiseHandshake) = (sa.handshake(true), sb.handshake(false));
            let _ = i.advance(None);
            let _ = r.advance(None);
            // The acceptor reads m1 (maybe corrupted), the dialer m2, the acceptor m3: each side
            // is fed the recorded messages, as a man in the middle would replay them.
            let r1 = r.advance(Some(&msgs[0]));
            let r2 = i.advance(Some(&msgs[1]));
            let r3 = r.advance(Some(&msgs[2]));
            let dialer_done = matches!(r2, Ok((_, true)));
            let acceptor_done = r1.is_ok() && matches!(r3, Ok((_, true)));
            // The recorded m2 and m3 belong to another session (other ephemerals): neither side
            // may complete on them.
            prop_assert!(!dialer_done, "dialer completed on a replayed transcript");
            prop_assert!(!acceptor_done, "acceptor completed on a replayed transcript");
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Garbage plaintext (what a peer could send if the cipher let anything through): the frame
    /// decoder, the `Hello` check and the node refuse it or take a well-formed frame; they never
    /// panic, and the node applies a message only from a frame that is a well-formed `Data`.
    #[test]
    fn garbage_plaintext_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200), prefix in 0u8..3) {
        let mut bytes = bytes;
        match prefix {
            0 => {}
            1 => bytes.insert(0, kernel_remote::WIRE_VERSION),
            // A Data frame with sequence 1 around garbage: the message decoder's turn.
            _ => {
                let mut f = vec![kernel_remote::WIRE_VERSION, 1, 1];
                f.push(u8::try_from(bytes.len().min(127)).unwrap_or(127));
                f.extend_from_slice(&bytes[..bytes.len().min(127)]);
                bytes = f;
            }
        }
        let decoded = Frame::decode(&bytes, MAX);
        let hello = check_hello(&id("b"), None, Some(&id("a")), &bytes, MAX);
        if let Ok(k) = hello {
            prop_assert_eq!(k, id("a"));
            let is_hello = matches!(decoded, Ok(Frame::Hello { .. }));
            prop_assert!(is_hello, "a hello the check accepts decodes as a hello");
        }
        NODE.with(|n| {
            let mut n = n.borrow_mut();
            let (node, sink) = n.get_or_insert_with(|| (node(), Sink::default()));
            let before = node.stats().applied;
            node.handle(std::time::Duration::ZERO, TransportEvent::Frame(id("a"), bytes.clone()), sink).expect("handle");
            node.apply_received(sink).expect("apply");
            if node.stats().applied > before {
                let well_formed = matches!(&decoded, Ok(Frame::Data { message, .. }) if WireMessage::decode(message).is_ok());
                prop_assert!(well_formed, "applied {:?}", bytes);
            }
            Ok(())
        })?;
    }
}

thread_local! {
    static NODE: RefCell<Option<(Node<MemStore>, Sink)>> = const { RefCell::new(None) };
}

/// A node that is handed every frame the reader lets through applies nothing: the reader lets
/// nothing garbage through.
#[test]
fn a_node_behind_the_reader_applies_nothing_from_garbage() {
    let (sa, sb) = securities();
    let mut node = node();
    let mut sink = Sink::default();
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() });
    let cell = RefCell::new((&mut node, &mut sink));
    runner
        .run(&prop::collection::vec(any::<u8>(), 0..300), |garbage| {
            let (_, mut cr) = session(&sa, &sb);
            let mut c = cell.borrow_mut();
            let (node, sink) = &mut *c;
            if let Ok(frame) = receive_frame(&mut cr, garbage, MAX) {
                node.handle(std::time::Duration::ZERO, TransportEvent::Frame(id("a"), frame), &mut **sink).expect("handle");
            }
            node.apply_received(&mut **sink).expect("apply");
            prop_assert_eq!(node.stats().applied, 0);
            prop_assert_eq!(node.status()[0].applied, PeerSeq(0));
            Ok(())
        })
        .expect("property");
}
