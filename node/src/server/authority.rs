//! The HTTP/2 `:authority` fix for etcd Go clients lives in the shared
//! [`meridian_wire::authority`], which the gateway uses too.

pub use meridian_wire::authority::*;
