//! What a peer sends to the raft transport: a `RaftBatch` whose messages, and the entries inside
//! them, are decoded before raft sees them, and the first chunk of a snapshot stream. Any bytes
//! must decode or be refused, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_node::raft::transport::{decode_messages, decode_snapshot_message};
use meridian_proto::meridian::v1::{InternalRequest, RaftBatch, SnapshotChunk};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = RaftBatch::decode(data) {
        if let Ok(messages) = decode_messages(&batch) {
            for m in messages {
                for e in m.get_entries() {
                    let _ = InternalRequest::decode(e.get_data());
                }
            }
        }
    }
    if let Ok(first) = SnapshotChunk::decode(data) {
        let _ = decode_snapshot_message(&first);
    }
    let _ = InternalRequest::decode(data);
});
