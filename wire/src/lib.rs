//! The engine-free pieces that every Meridian process (node, mirror,
//! gateway, lab) needs, with no storage or raft in them.
//!
//! - [`url`]: member URLs and endpoint lists, parsed once into [`url::Url`];
//! - [`token`]: the mirror token that `Mirror.Apply` carries;
//! - [`duration`]: Go durations (`10m`, `500ms`);
//! - [`etcd`]: etcd's refusal messages and request classes a gateway needs too;
//! - [`lineage`]: where two clusters' histories part, and when a
//!   secondary may follow a new primary without a copy;
//! - [`region`]: connections to every member of one region's cluster, and
//!   the probe that finds its leader (gateway and mirror);
//! - [`delay`]: a TCP proxy that injects latency between regions;
//! - [`progress`]: a bar on a terminal, log lines otherwise, for long work;
//! - [`telemetry`]: logging, and OpenTelemetry traces across processes;
//! - [`tls`]: rustls for listeners and for clients of `https://` URLs;
//! - [`authority`]: lets etcd Go clients' schemed HTTP/2 `:authority` through
//!   a client port (members and gateways).
//! - [`coalesce`]: gathers a connection's writes into fewer syscalls (every
//!   connection a member or gateway accepts, and every one [`tls::ClientTls`]
//!   dials).

pub mod authority;
pub mod coalesce;
pub mod delay;
pub mod duration;
pub mod etcd;
pub mod lineage;
pub mod progress;
pub mod region;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod url;
