//! # kernel-remote
//!
//! Ken between kernels (DESIGN §8): a remote kernel is a kernel endpoint with its own c-list
//! ([`LinkEndpoint`], references printed as rrefs `ro±N` / `rp±N`). A delivery to it becomes a
//! [`WireMessage`] written, inside the crank, to the link's durable outbox under the next
//! per-peer sequence number. The host side ([`Node`]) transmits an entry only after the crank's
//! commit event and, when the store is asked to be durable, after the durable mark covers it;
//! it retransmits until acknowledged and never gives up. A receiving node applies each message
//! exactly once and in order, on the kernel's immediate path, in one transaction that also
//! records the highest sequence applied, and acknowledges only after that transaction is
//! durable.
//!
//! Transports sit behind [`Transport`]: [`sim::SimNet`], a deterministic simulated network used
//! by the simulation ([`sim::run_seed`], `cargo xtask sim`), and [`tcp::TcpTransport`] (tokio,
//! length-prefixed frames, a `Hello` handshake, a [`tcp::Handshake`] seam for authentication).
//!
//! Secure links: each kernel has an [`Identity`] (an x25519 key pair kept in its store
//! directory; the public key is its identity), and [`NoiseSecurity`] runs a mutually
//! authenticated Noise handshake whose peer key must be in an [`AllowList`] that binds it to one
//! [`KernelId`]; the `Hello` must name that kernel ([`check_hello`]), so Ken state keyed by
//! kernel id is reached only with the peer's key. [`InboundLimits`] bound what a peer can cost.
//!
//! ```
//! use kernel_core::{CapData, Kernel, MemStore, Settlement};
//! use kernel_remote::{sim::LoopbackPair, Node, RemoteConfig};
//! use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};
//! # use kernel_core::VRef;
//!
//! struct Echo;
//! impl Behavior for Echo {
//!     fn call(&mut self, _: &mut Cx<'_, '_, '_>, _: VRef, _: &str, args: VatData) -> Result<Answer, VatError> {
//!         Ok(Answer::Value(args))
//!     }
//! }
//!
//! let mut a = Node::new(Kernel::open(MemStore::new())?, "a".parse()?, RemoteConfig::default());
//! let mut b = Node::new(Kernel::open(MemStore::new())?, "b".parse()?, RemoteConfig::default());
//! let echo = b.kernel_mut().add_endpoint("echo", VatEndpoint::boxed(HelperVat::new(Echo)))?;
//! let echo_root = b.kernel().root(echo)?;
//! b.set_bootstrap(echo_root);
//! a.add_peer("b".parse()?)?;
//! b.add_peer("a".parse()?)?;
//! // A message to b's bootstrap object, sent from a.
//! let target = a.peer_root(&"b".parse()?)?;
//! let answer = a.kernel_mut().queue_message(target.into(), "echo", CapData::plain("42"))?;
//! let mut net = LoopbackPair::connected(&mut a, &mut b)?;
//! net.run_until_idle(&mut a, &mut b)?;
//! assert_eq!(a.kernel().settlement(answer)?, Some(Settlement::Fulfilled(CapData::plain("42"))));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod durable;
mod error;
mod hello;
mod identity;
mod limits;
mod link;
mod node;
mod noise;
mod rref;
pub mod sim;
pub mod tcp;
mod transport;
mod wire;

pub use durable::DurableStore;
pub use error::{ParseError, ProtocolError, RemoteError, WireError};
pub use hello::{check_hello, HelloError};
pub use identity::{AllowList, Identity, IdentityError, PublicKey, IDENTITY_FILE, IDENTITY_FORMAT, KEY_LEN};
pub use limits::{ConnectionGate, InboundLimits, TokenBucket};
pub use link::{apply_inbound, outbox_key, LinkEndpoint, APPLIED_KEY, NEXT_SEQ_KEY, OUTBOX_PREFIX};
pub use node::{link_endpoint_name, Node, NodeStats, PeerStatus, RemoteConfig, TurnLimits};
pub use noise::{sealed_len, LinkSecurityError, NoiseCipher, NoiseHandshake, NoiseSecurity, NOISE_PROTOCOL, PROLOGUE};
pub use rref::{KernelId, PeerSeq, RRef, MAX_KERNEL_ID_LEN};
pub use transport::{Transport, TransportEvent};
pub use wire::{Frame, WireData, WireMessage, WireResolution, DEFAULT_MAX_FRAME, WIRE_VERSION};
