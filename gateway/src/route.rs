//! Which region a request goes to: its RPC class, and for reads the
//! consistency it asks for in gRPC metadata (etcd's messages have no field
//! for it).

use std::time::Duration;

use meridian_wire::duration::parse_duration;
use tonic::metadata::MetadataMap;
use tonic::Status;

/// Asks a serializable read to be served within this staleness (a Go duration).
pub const MAX_STALENESS: &str = "x-meridian-max-staleness";
/// Asks a read to be served by a region that applied at least this revision.
pub const MIN_REVISION: &str = "x-meridian-min-revision";
/// Asks a write to be acknowledged only once this many secondary regions applied it.
pub const WAIT_REGIONS: &str = "x-meridian-wait-regions";
/// On every response: the region that served it, and its applied revision then.
pub const SERVED_BY: &str = "x-meridian-region";
pub const SERVED_AT: &str = "x-meridian-revision";

/// The classes requests are routed (and counted, and later limited) by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Put, DeleteRange, a Txn with any write, Compact: the primary's leader.
    Write,
    /// Every Lease RPC: the primary's leader.
    Lease,
    /// Range and read-only Txn.
    Read(Consistency),
    /// The nearest healthy region (revisions are the same everywhere).
    Watch,
    /// Status, HashKV, Alarm, ...: this gateway's region (they answer for it).
    Maintenance,
}

impl Class {
    pub fn label(self) -> &'static str {
        match self {
            Class::Write => "write",
            Class::Lease => "lease",
            Class::Read(Consistency::Linearizable) => "read_linearizable",
            Class::Read(Consistency::Bounded { .. }) => "read_serializable",
            Class::Watch => "watch",
            Class::Maintenance => "maintenance",
        }
    }
}

/// What a read may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// etcd's default: no state older than a write that completed before the read began.
    Linearizable,
    /// Serializable: a region within `max_staleness` that applied `min_revision`.
    Bounded { max_staleness: Duration, min_revision: i64 },
}

/// How many secondary regions a write waits for: the request's
/// `x-meridian-wait-regions`, else the gateway's default.
///
/// # Errors
///
/// `InvalidArgument` for a header that is not a count.
pub fn wait_regions(meta: &MetadataMap, default: usize) -> Result<usize, Status> {
    match meta.get(WAIT_REGIONS) {
        None => Ok(default),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Status::invalid_argument(format!("{WAIT_REGIONS} must be a count of regions"))),
    }
}

/// The consistency a read asks for: serializable reads are bounded by the
/// request's `x-meridian-max-staleness`, else the gateway's default.
///
/// # Errors
///
/// `InvalidArgument` for a header that does not parse.
pub fn consistency(serializable: bool, meta: &MetadataMap, default_staleness: Duration) -> Result<Consistency, Status> {
    let min_revision = match meta.get(MIN_REVISION) {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or_else(|| Status::invalid_argument(format!("{MIN_REVISION} must be a revision (an integer)")))?,
    };
    if !serializable {
        return Ok(Consistency::Linearizable);
    }
    let max_staleness = match meta.get(MAX_STALENESS) {
        None => default_staleness,
        Some(v) => v.to_str().ok().and_then(parse_duration).ok_or_else(|| {
            Status::invalid_argument(format!("{MAX_STALENESS} must be a Go duration such as 500ms or 5s"))
        })?,
    };
    Ok(Consistency::Bounded { max_staleness, min_revision })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_from_metadata() {
        let five = Duration::from_secs(5);
        let mut meta = MetadataMap::new();
        assert_eq!(consistency(false, &meta, five).unwrap(), Consistency::Linearizable);
        assert_eq!(
            consistency(true, &meta, five).unwrap(),
            Consistency::Bounded { max_staleness: five, min_revision: 0 }
        );
        meta.insert(MAX_STALENESS, "250ms".parse().unwrap());
        meta.insert(MIN_REVISION, "42".parse().unwrap());
        assert_eq!(
            consistency(true, &meta, five).unwrap(),
            Consistency::Bounded { max_staleness: Duration::from_millis(250), min_revision: 42 }
        );
        meta.insert(MAX_STALENESS, "soon".parse().unwrap());
        assert_eq!(consistency(true, &meta, five).unwrap_err().code(), tonic::Code::InvalidArgument);
        let mut meta = MetadataMap::new();
        meta.insert(MIN_REVISION, "x".parse().unwrap());
        assert_eq!(consistency(false, &meta, five).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
