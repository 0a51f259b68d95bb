//! etcd facts that a member and a gateway both need: the messages of the
//! refusals a gateway makes itself, and what class a request is.

use meridian_proto::etcdserverpb::request_op::Request as Op;
use meridian_proto::etcdserverpb::TxnRequest;

/// etcd's refusal when a member (or a gateway) cannot take more work:
/// `RESOURCE_EXHAUSTED`, which clientv3 does not retry.
pub const TOO_MANY_REQUESTS: &str = "etcdserver: too many requests";
/// etcd's refusal of a watch id already in use on the stream.
pub const DUPLICATE_WATCH_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";

/// The first key after every key with `prefix` (etcd's `--prefix` range end;
/// `\0`, every key, when no key follows).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// True if the txn only reads, on either branch, nested txns included.
pub fn txn_is_read_only(r: &TxnRequest) -> bool {
    r.success.iter().chain(&r.failure).all(|op| match &op.request {
        Some(Op::RequestRange(_)) | None => true,
        Some(Op::RequestTxn(t)) => txn_is_read_only(t),
        Some(Op::RequestPut(_)) | Some(Op::RequestDeleteRange(_)) => false,
    })
}

/// True if the txn only reads, and every read asks for serializable (etcd
/// then serves it without a read barrier).
pub fn txn_is_serializable(r: &TxnRequest) -> bool {
    r.success.iter().chain(&r.failure).all(|op| match &op.request {
        Some(Op::RequestRange(x)) => x.serializable,
        Some(Op::RequestTxn(t)) => txn_is_serializable(t),
        None => true,
        Some(Op::RequestPut(_)) | Some(Op::RequestDeleteRange(_)) => false,
    })
}

#[cfg(test)]
mod tests {
    use meridian_proto::etcdserverpb::{DeleteRangeRequest, PutRequest, RangeRequest, RequestOp};

    use super::*;

    fn op(r: Op) -> RequestOp {
        RequestOp { request: Some(r) }
    }

    #[test]
    fn txn_classes() {
        let range = |serializable| op(Op::RequestRange(RangeRequest { serializable, ..Default::default() }));
        let put = || op(Op::RequestPut(PutRequest::default()));
        let del = || op(Op::RequestDeleteRange(DeleteRangeRequest::default()));
        let nested = |t: TxnRequest| op(Op::RequestTxn(t));
        let txn =
            |success: Vec<RequestOp>, failure: Vec<RequestOp>| TxnRequest { success, failure, ..Default::default() };
        // (txn, read only, serializable)
        let table = vec![
            (txn(vec![], vec![]), true, true),
            (txn(vec![range(false)], vec![range(true)]), true, false),
            (txn(vec![range(true)], vec![range(true)]), true, true),
            (txn(vec![range(true), put()], vec![]), false, false),
            (txn(vec![], vec![del()]), false, false),
            (txn(vec![nested(txn(vec![], vec![put()]))], vec![]), false, false),
            (txn(vec![nested(txn(vec![range(true)], vec![]))], vec![]), true, true),
        ];
        for (t, read_only, serializable) in table {
            assert_eq!(txn_is_read_only(&t), read_only, "{t:?}");
            assert_eq!(txn_is_serializable(&t), serializable, "{t:?}");
        }
    }
}
