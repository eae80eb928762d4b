//! Vireo's vhost-user backend: it speaks vhost-user on a Unix socket (message parsing and fd
//! passing from rust-vmm's `vhost` crate), maps the memory it is given through
//! `vireo-memory`, and runs each started queue on a worker thread over `vireo-queue`.
//!
//! # Invariants, and where each is enforced
//!
//! * **The reply is the barrier** (`backend.rs`): a message that retires memory (SET_MEM_TABLE,
//!   REM_MEM_REG, SET_LOG_BASE) returns from its handler, and so is answered, only after
//!   `GuestMemory` has quiesced every worker that could touch the retired mapping; a message that
//!   stops or moves a ring (GET_VRING_BASE, SET_VRING_ADDR, SET_VRING_NUM) first stops that
//!   ring's worker and joins it.
//! * **A worker never waits on the frontend** (`worker.rs`): it only polls its kick, stop and
//!   engine-completion fds and writes its call eventfd. A stopping worker drains its engine
//!   (every request in flight is completed into the used ring) before it hands the queue back.
//! * **In-flight I/O is a reader** (`device.rs`, `Engine`): an asynchronous request pins the
//!   regions its buffers are in until it is reaped, so an invalidation's reply waits for it.
//! * **A broken queue stops only itself**: its worker logs the error and idles until stopped.

#![warn(missing_docs)]

mod backend;
pub mod channel;
pub mod device;
mod device_state;
pub mod dispatch;
mod notify;
mod ring;
mod server;
mod worker;

pub use backend::VhostUserBackend;
pub use channel::{BackendChannel, ChannelError};
pub use device::{
    publish, Call, Device, DeviceRequest, Events, Interest, Pass, Progress, QueueHandler, Queues, Ring, ServeResult,
    DEFAULT_PROTOCOL_FEATURES,
};
pub use notify::{adopt_eventfd, EventNotifier, FdError, LogKick};
pub use server::{serve, Endpoint, ServeError, ServeOptions};
pub use vhost::vhost_user::message::VhostUserProtocolFeatures;
pub use worker::DEFAULT_POLL_MAX;
