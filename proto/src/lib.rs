//! Protocol definitions for Meridian.
//!
//! This crate holds two groups of generated code:
//!
//! * The etcd v3 client wire protocol — packages `mvccpb`, `authpb`,
//!   `etcdserverpb`, `v3lockpb` and `v3electionpb`. The `.proto` files in `proto/` were written for Meridian
//!   but keep etcd v3.4's package, service, method, message and field names,
//!   field numbers and enum values exactly, so stock etcd clients (`etcdctl`,
//!   the `etcd-client` crate, ...) talk to Meridian unchanged.
//! * Meridian's own `meridian.v1` package: the member-to-member raft
//!   transport and the internal raft proposal / snapshot records.
//!
//! etcd's packages also get serde `Serialize`/`Deserialize` from pbjson, in
//! grpc-gateway's JSON (proto field names as written, 64-bit integers as
//! strings, bytes in base64): the member's JSON gateway speaks it.
//!
//! The build script parses the schema with `protox`, a pure-Rust protobuf
//! compiler, so building needs no system `protoc`; `tonic-prost-build` then
//! generates prost messages together with tonic clients and servers.

/// etcd key/value and event records (`mvccpb`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}

/// etcd users, roles and permissions (`authpb`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod authpb {
    tonic::include_proto!("authpb");
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}

/// etcd v3 gRPC services and their messages (`etcdserverpb`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}

/// etcd's lock service (`v3lockpb`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}

/// etcd's election service (`v3electionpb`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}

/// Meridian's own protocol (`meridian.*`).
pub mod meridian {
    /// Version 1 of Meridian's internal services and records (`meridian.v1`).
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("meridian.v1");
    }
}

#[cfg(test)]
mod tests {
    use super::etcdserverpb::{
        range_request::{SortOrder, SortTarget},
        PutRequest, RangeRequest, ResponseHeader,
    };
    use prost::Message;

    /// Each case: a message encoded with prost, and the exact bytes etcd v3.4
    /// produces for it. A key is `(field_number << 3) | wire_type`, with
    /// wire type 0 = varint and 2 = length-delimited.
    #[test]
    fn wire_facts_match_etcd() {
        let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
            (
                "PutRequest key=1 value=2 lease=3 prev_kv=4",
                PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), lease: 5, prev_kv: true, ..Default::default() }
                    .encode_to_vec(),
                vec![0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 5, 0x20, 1],
            ),
            (
                "PutRequest ignore_value=5 ignore_lease=6",
                PutRequest { ignore_value: true, ignore_lease: true, ..Default::default() }.encode_to_vec(),
                vec![0x28, 1, 0x30, 1],
            ),
            (
                "RangeRequest key=1 range_end=2 limit=3 revision=4 sort_order=5 sort_target=6",
                RangeRequest {
                    key: b"a".to_vec(),
                    range_end: b"b".to_vec(),
                    limit: 7,
                    revision: 9,
                    sort_order: SortOrder::Descend as i32,
                    sort_target: SortTarget::Mod as i32,
                    ..Default::default()
                }
                .encode_to_vec(),
                vec![0x0a, 1, b'a', 0x12, 1, b'b', 0x18, 7, 0x20, 9, 0x28, 2, 0x30, 3],
            ),
            (
                "RangeRequest serializable=7 keys_only=8 count_only=9",
                RangeRequest { serializable: true, keys_only: true, count_only: true, ..Default::default() }
                    .encode_to_vec(),
                vec![0x38, 1, 0x40, 1, 0x48, 1],
            ),
            (
                "RangeRequest min/max mod/create revision = 10..13",
                RangeRequest {
                    min_mod_revision: 1,
                    max_mod_revision: 2,
                    min_create_revision: 3,
                    max_create_revision: 4,
                    ..Default::default()
                }
                .encode_to_vec(),
                vec![0x50, 1, 0x58, 2, 0x60, 3, 0x68, 4],
            ),
            (
                "ResponseHeader cluster_id=1 member_id=2 revision=3 raft_term=4",
                ResponseHeader { cluster_id: 1, member_id: 2, revision: 3, raft_term: 4 }.encode_to_vec(),
                vec![0x08, 1, 0x10, 2, 0x18, 3, 0x20, 4],
            ),
        ];

        for (name, got, want) in cases {
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn compare_range_end_is_field_64() {
        use super::etcdserverpb::{compare, Compare};
        let cmp = Compare {
            target: compare::CompareTarget::Value as i32,
            target_union: Some(compare::TargetUnion::Value(b"x".to_vec())),
            range_end: b"z".to_vec(),
            ..Default::default()
        };
        // target=2 (varint 3), value=7 (bytes), range_end=64: key 64<<3|2 = 514
        // = varint [0x82, 0x04].
        assert_eq!(cmp.encode_to_vec(), vec![0x10, 3, 0x3a, 1, b'x', 0x82, 0x04, 1, b'z']);
    }

    #[test]
    fn watch_and_internal_types_resolve() {
        use super::etcdserverpb::{watch_request::RequestUnion, WatchCreateRequest, WatchRequest};
        use super::meridian::v1::{internal_request, InternalRequest};
        let req = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                fragment: true,
                ..Default::default()
            })),
        };
        // create_request=1 (len 2) containing fragment=8 -> 0x40 0x01.
        assert_eq!(req.encode_to_vec(), vec![0x0a, 2, 0x40, 1]);

        let internal = InternalRequest {
            id: 1,
            request: Some(internal_request::Request::Put(PutRequest::default())),
            traceparent: String::new(),
            auth: None,
        };
        assert_eq!(internal.encode_to_vec(), vec![0x08, 1, 0x12, 0]);
    }
}
