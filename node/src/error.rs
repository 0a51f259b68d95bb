//! The node's one error type, and its mapping to etcd's gRPC codes and
//! message strings.
//!
//! Client libraries match on etcd's exact strings (the etcd Go client turns
//! them back into typed errors), so every client-facing variant's message is
//! etcd 3.4's, byte for byte. Internal variants (storage, raft) never reach a
//! client as such: they are reported as `Internal`/`Unavailable`.

use tonic::{Code, Status};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // -- Request errors: deterministic, returned to the client as etcd does. --
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// Past the transport limit; grpc-go's own wording, which etcd clients see.
    #[error("grpc: received message larger than max ({0} vs. {1})")]
    MessageTooLarge(usize, usize),
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    #[error("etcdserver: member ID already exist")]
    MemberExists,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    #[error("etcdserver: given member URLs are invalid")]
    MemberBadUrls,
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: too many learner members in cluster")]
    TooManyLearners,
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStartedMembers,
    #[error("etcdserver: rpc not supported for learner")]
    NotSupportedForLearner,
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserExists,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleExists,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    /// The auth store changed between the check of a request and its apply:
    /// the client authenticates again and retries.
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    /// Authenticate for a user added with no password. etcd 3.4 answers it
    /// with its internal error, code Unknown.
    #[error("auth: authentication failed, password was given for no password user")]
    NoPasswordUser,
    /// Authenticate on a member given a JWT public key only (code Unknown, as etcd's).
    #[error("auth: token signing attempted with verify-only key")]
    JwtVerifyOnly,
    /// A client write on a read-only secondary; names the primary's region.
    /// FAILED_PRECONDITION, a code etcd clients do not retry.
    #[error("meridian: read-only secondary of region {0:?}; send writes to the primary or a gateway")]
    ReadOnly(String),
    /// A mirror write refused by fencing (foreign source, stale epoch, not a secondary).
    #[error("meridian: {0}")]
    Fenced(String),
    /// A request kind some member's binary cannot apply yet (see `server::version`).
    #[error("meridian: cluster version {cluster} is too low for this request (needs {needed}); upgrade every member")]
    ClusterVersion { cluster: u32, needed: u32 },

    // -- Availability: the request may succeed if retried. --
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("etcdserver: unhealthy cluster")]
    Unhealthy,
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("etcdserver: not leader")]
    NotLeader,
    /// etcd has no gRPC mapping for it, so clients see code UNKNOWN.
    #[error("etcdserver: request timed out, leader transfer took too long")]
    LeaderTransferTimeout,
    /// A primary that does not hold the primary lease now (see
    /// `server::primary_lease`); retryable, since a new primary takes over.
    #[error("meridian: this primary does not hold the primary lease ({0}); retry, or write through a gateway")]
    NoPrimaryLease(String),
    /// Apply is too far behind commit; etcd's backpressure error.
    #[error("{}", meridian_wire::etcd::TOO_MANY_REQUESTS)]
    TooManyRequests,

    // -- Internal: never deterministic; in the apply path these crash the node. --
    #[error("storage: {0}")]
    Storage(#[from] fjall::Error),
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("config: {0}")]
    Config(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// The gRPC code etcd 3.4 uses for this error.
    pub fn code(&self) -> Code {
        use Error::*;
        match self {
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey | RequestTooLarge => {
                Code::InvalidArgument
            }
            MemberBadUrls | UserEmpty | RoleEmpty | AuthFailed | InvalidAuthMgmt | AuthOldRevision
            | PermissionNotGiven => Code::InvalidArgument,
            RootUserNotExist | RootRoleNotExist | UserExists | UserNotFound | RoleExists | RoleNotFound
            | RoleNotGranted | PermissionNotGranted | AuthNotEnabled => Code::FailedPrecondition,
            PermissionDenied => Code::PermissionDenied,
            InvalidAuthToken => Code::Unauthenticated,
            MemberExists
            | PeerUrlExists
            | MemberNotLearner
            | LearnerNotReady
            | TooManyLearners
            | NotEnoughStartedMembers => Code::FailedPrecondition,
            NotSupportedForLearner | Unhealthy => Code::Unavailable,
            MessageTooLarge(..) | NoSpace => Code::ResourceExhausted,
            Compacted | FutureRevision => Code::OutOfRange,
            LeaseNotFound | MemberNotFound => Code::NotFound,
            LeaseExists | NotLeader | BadLeaderTransferee | ReadOnly(_) | Fenced(_) | ClusterVersion { .. } => {
                Code::FailedPrecondition
            }
            TooManyRequests => Code::ResourceExhausted,
            LeaderTransferTimeout | NoPasswordUser | JwtVerifyOnly => Code::Unknown,
            LeaseTtlTooLarge => Code::OutOfRange,
            NoLeader | Timeout | LeaderChanged | Stopped | NoPrimaryLease(_) => Code::Unavailable,
            Config(_) => Code::InvalidArgument,
            Storage(_) | Corrupt(_) | Raft(_) | Io(_) | Internal(_) => Code::Internal,
        }
    }
}

impl Error {
    /// Whether every replica applying the same entry to the same state gets
    /// this same error. Apply answers such errors to the client and moves
    /// on; any other error from apply (I/O, a failed store) means this
    /// replica's state is no longer known, so the member must stop rather
    /// than skip the entry. Listed variant by variant, so a new variant has
    /// to be classified here.
    pub fn is_deterministic(&self) -> bool {
        use Error::*;
        match self {
            EmptyKey
            | KeyNotFound
            | ValueProvided
            | LeaseProvided
            | TooManyOps
            | DuplicateKey
            | RequestTooLarge
            | MessageTooLarge(..)
            | Compacted
            | FutureRevision
            | NoSpace
            | LeaseNotFound
            | LeaseExists
            | LeaseTtlTooLarge
            | MemberNotFound
            | MemberExists
            | PeerUrlExists
            | MemberBadUrls
            | MemberNotLearner
            | TooManyLearners
            | NotEnoughStartedMembers
            | RootUserNotExist
            | RootRoleNotExist
            | UserExists
            | UserEmpty
            | UserNotFound
            | RoleExists
            | RoleNotFound
            | RoleEmpty
            | AuthFailed
            | PermissionDenied
            | RoleNotGranted
            | PermissionNotGranted
            | AuthNotEnabled
            | InvalidAuthToken
            | InvalidAuthMgmt
            | AuthOldRevision
            | PermissionNotGiven
            | NoPasswordUser
            | JwtVerifyOnly
            | BadLeaderTransferee
            | ReadOnly(_)
            | Fenced(_)
            | ClusterVersion { .. } => true,
            NoLeader
            | Timeout
            | LeaderChanged
            | Stopped
            | NotLeader
            | LeaderTransferTimeout
            | LearnerNotReady
            | NotSupportedForLearner
            | Unhealthy
            | TooManyRequests
            | NoPrimaryLease(_) => false,
            Storage(_) | Corrupt(_) | Raft(_) | Config(_) | Io(_) | Internal(_) => false,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clients match on these exact pairs; a change here breaks them.
    #[test]
    fn wire_mapping_matches_etcd() {
        let table = [
            (Error::EmptyKey, Code::InvalidArgument, "etcdserver: key is not provided"),
            (Error::TooManyOps, Code::InvalidArgument, "etcdserver: too many operations in txn request"),
            (Error::DuplicateKey, Code::InvalidArgument, "etcdserver: duplicate key given in txn request"),
            (Error::RequestTooLarge, Code::InvalidArgument, "etcdserver: request is too large"),
            (Error::Compacted, Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted"),
            (Error::FutureRevision, Code::OutOfRange, "etcdserver: mvcc: required revision is a future revision"),
            (Error::NoSpace, Code::ResourceExhausted, "etcdserver: mvcc: database space exceeded"),
            (Error::NoLeader, Code::Unavailable, "etcdserver: no leader"),
            (Error::LeaseNotFound, Code::NotFound, "etcdserver: requested lease not found"),
            (Error::LeaseExists, Code::FailedPrecondition, "etcdserver: lease already exists"),
            (
                Error::ReadOnly("us-east".into()),
                Code::FailedPrecondition,
                "meridian: read-only secondary of region \"us-east\"; send writes to the primary or a gateway",
            ),
            (Error::LeaseTtlTooLarge, Code::OutOfRange, "etcdserver: too large lease TTL"),
            (Error::NotLeader, Code::FailedPrecondition, "etcdserver: not leader"),
            (Error::BadLeaderTransferee, Code::FailedPrecondition, "etcdserver: bad leader transferee"),
            (
                Error::LeaderTransferTimeout,
                Code::Unknown,
                "etcdserver: request timed out, leader transfer took too long",
            ),
            (Error::MessageTooLarge(3, 2), Code::ResourceExhausted, "grpc: received message larger than max (3 vs. 2)"),
            (Error::TooManyRequests, Code::ResourceExhausted, "etcdserver: too many requests"),
            (Error::MemberNotFound, Code::NotFound, "etcdserver: member not found"),
            (Error::PeerUrlExists, Code::FailedPrecondition, "etcdserver: Peer URLs already exists"),
            (Error::MemberExists, Code::FailedPrecondition, "etcdserver: member ID already exist"),
            (Error::MemberBadUrls, Code::InvalidArgument, "etcdserver: given member URLs are invalid"),
            (Error::MemberNotLearner, Code::FailedPrecondition, "etcdserver: can only promote a learner member"),
            (
                Error::LearnerNotReady,
                Code::FailedPrecondition,
                "etcdserver: can only promote a learner member which is in sync with leader",
            ),
            (Error::TooManyLearners, Code::FailedPrecondition, "etcdserver: too many learner members in cluster"),
            (Error::NotSupportedForLearner, Code::Unavailable, "etcdserver: rpc not supported for learner"),
            (Error::Unhealthy, Code::Unavailable, "etcdserver: unhealthy cluster"),
            (Error::RootUserNotExist, Code::FailedPrecondition, "etcdserver: root user does not exist"),
            (Error::UserEmpty, Code::InvalidArgument, "etcdserver: user name is empty"),
            (
                Error::AuthFailed,
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
            (Error::PermissionDenied, Code::PermissionDenied, "etcdserver: permission denied"),
            (Error::InvalidAuthToken, Code::Unauthenticated, "etcdserver: invalid auth token"),
            (Error::AuthNotEnabled, Code::FailedPrecondition, "etcdserver: authentication is not enabled"),
        ];
        for (err, code, msg) in table {
            let status = Status::from(err);
            assert_eq!((status.code(), status.message()), (code, msg));
        }
    }

    /// Apply stops the member on exactly the errors that are not
    /// deterministic; the gRPC code is not what decides it.
    #[test]
    fn deterministic_errors_are_told_apart() {
        let answered = [Error::NoSpace, Error::Compacted, Error::LeaseNotFound, Error::Fenced("x".into())];
        for e in answered {
            assert!(e.is_deterministic(), "{e}");
        }
        let fatal = [
            Error::Io(std::io::Error::other("disk")),
            Error::Corrupt("x".into()),
            Error::Internal("x".into()),
            // Same gRPC code as a client error, still fatal in apply.
            Error::Config("x".into()),
        ];
        for e in fatal {
            assert!(!e.is_deterministic(), "{e}");
        }
    }
}
