//! Table tests of etcd's request checks and txn semantics.

use meridian_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use meridian_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use meridian_proto::etcdserverpb::request_op::Request as Op;
use meridian_proto::etcdserverpb::response_op::Response as OpResponse;
use meridian_proto::etcdserverpb::*;

use super::*;
use crate::mvcc::Mvcc;

fn put_op(k: &str, v: &str) -> RequestOp {
    RequestOp { request: Some(Op::RequestPut(PutRequest { key: k.into(), value: v.into(), ..Default::default() })) }
}
fn del_op(k: &str, end: &str) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
            key: k.into(),
            range_end: end.into(),
            ..Default::default()
        })),
    }
}
fn get_op(k: &str) -> RequestOp {
    RequestOp { request: Some(Op::RequestRange(RangeRequest { key: k.into(), ..Default::default() })) }
}
fn txn_op(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
    RequestOp { request: Some(Op::RequestTxn(TxnRequest { compare: vec![], success, failure })) }
}
fn cmp(key: &str, target: CompareTarget, result: CompareResult, union: TargetUnion) -> Compare {
    Compare {
        key: key.into(),
        target: target as i32,
        result: result as i32,
        target_union: Some(union),
        range_end: vec![],
    }
}

#[test]
fn txn_checks_match_etcd() {
    let table: Vec<(&str, TxnRequest, Option<Error>)> = vec![
        (
            "two puts of one key",
            TxnRequest { success: vec![put_op("a", "1"), put_op("a", "2")], ..Default::default() },
            Some(Error::DuplicateKey),
        ),
        (
            "put inside a deleted range",
            TxnRequest { success: vec![del_op("a", "c"), put_op("b", "1")], ..Default::default() },
            Some(Error::DuplicateKey),
        ),
        (
            "put and delete of a point",
            TxnRequest { success: vec![put_op("a", "1"), del_op("a", "")], ..Default::default() },
            Some(Error::DuplicateKey),
        ),
        (
            "two deletes overlap",
            TxnRequest { success: vec![del_op("a", "c"), del_op("b", "d")], ..Default::default() },
            None,
        ),
        (
            "same key in then and else of a nested txn",
            TxnRequest { success: vec![txn_op(vec![put_op("a", "1")], vec![put_op("a", "2")])], ..Default::default() },
            None,
        ),
        (
            "nested put collides with outer put",
            TxnRequest {
                success: vec![put_op("a", "1"), txn_op(vec![put_op("a", "2")], vec![])],
                ..Default::default()
            },
            Some(Error::DuplicateKey),
        ),
        (
            "success and failure are separate",
            TxnRequest { success: vec![put_op("a", "1")], failure: vec![put_op("a", "2")], ..Default::default() },
            None,
        ),
        (
            "empty key in a compare",
            TxnRequest {
                compare: vec![cmp("", CompareTarget::Version, CompareResult::Equal, TargetUnion::Version(0))],
                ..Default::default()
            },
            Some(Error::EmptyKey),
        ),
        ("empty key in an op", TxnRequest { success: vec![get_op("")], ..Default::default() }, Some(Error::EmptyKey)),
        (
            "an op with nothing in it",
            TxnRequest { success: vec![RequestOp { request: None }], ..Default::default() },
            Some(Error::KeyNotFound),
        ),
        (
            "too many ops",
            TxnRequest { success: (0..4).map(|i| put_op(&format!("k{i}"), "v")).collect(), ..Default::default() },
            Some(Error::TooManyOps),
        ),
    ];
    for (name, req, want) in table {
        let got = check_txn(&req, 3).err();
        assert_eq!(got.map(|e| e.to_string()), want.map(|e| e.to_string()), "{name}");
    }
}

fn store() -> (tempfile::TempDir, Mvcc) {
    let dir = tempfile::tempdir().unwrap();
    let db = fjall::Database::builder(dir.path()).open().unwrap();
    (dir, Mvcc::open(db, None).unwrap())
}

fn commit(m: &Mvcc) {
    let mut b = m.db_handle().batch();
    m.stage(&mut b);
    b.commit().unwrap();
    m.publish().unwrap();
}

fn write(m: &Mvcc, req: &TxnRequest) -> Result<TxnResponse> {
    let mut w = m.write();
    let r = txn(&mut w, req, &|_| true);
    w.end();
    commit(m);
    r
}

#[test]
fn compares_follow_etcd() {
    let (_d, m) = store();
    write(&m, &TxnRequest { success: vec![put_op("a", "5"), put_op("b", "7")], ..Default::default() }).unwrap();
    let table = [
        (cmp("a", CompareTarget::Value, CompareResult::Equal, TargetUnion::Value(b"5".to_vec())), true),
        (cmp("a", CompareTarget::Value, CompareResult::Greater, TargetUnion::Value(b"4".to_vec())), true),
        (cmp("a", CompareTarget::Version, CompareResult::Equal, TargetUnion::Version(1)), true),
        (cmp("a", CompareTarget::Create, CompareResult::Equal, TargetUnion::CreateRevision(2)), true),
        (cmp("a", CompareTarget::Mod, CompareResult::Less, TargetUnion::ModRevision(3)), true),
        (cmp("a", CompareTarget::Lease, CompareResult::Equal, TargetUnion::Lease(0)), true),
        (cmp("zz", CompareTarget::Version, CompareResult::Equal, TargetUnion::Version(0)), true),
        (cmp("zz", CompareTarget::Create, CompareResult::Equal, TargetUnion::CreateRevision(0)), true),
        (cmp("zz", CompareTarget::Value, CompareResult::NotEqual, TargetUnion::Value(b"x".to_vec())), false),
        (
            Compare {
                range_end: b"c".to_vec(),
                ..cmp("a", CompareTarget::Value, CompareResult::Greater, TargetUnion::Value(b"4".to_vec()))
            },
            true,
        ),
        (
            Compare {
                range_end: b"c".to_vec(),
                ..cmp("a", CompareTarget::Value, CompareResult::Less, TargetUnion::Value(b"6".to_vec()))
            },
            false,
        ),
    ];
    for (c, want) in table {
        let req = TxnRequest { compare: vec![c.clone()], success: vec![get_op("a")], failure: vec![] };
        let resp = txn(&mut m.read(), &req, &|_| true).unwrap();
        assert_eq!(resp.succeeded, want, "{c:?}");
    }
}

#[test]
fn a_failing_txn_writes_nothing() {
    let (_d, m) = store();
    let req = TxnRequest {
        success: vec![
            put_op("a", "1"),
            RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: b"missing".to_vec(),
                    ignore_value: true,
                    ..Default::default()
                })),
            },
        ],
        ..Default::default()
    };
    assert!(matches!(write(&m, &req), Err(Error::KeyNotFound)));
    assert_eq!(m.marks().current, 1);
    assert_eq!(m.range(&crate::mvcc::KeyRange::new(b"a", b""), Default::default()).unwrap().count, 0);
}

#[test]
fn nested_txn_compares_see_the_state_before_the_txn() {
    let (_d, m) = store();
    let inner = TxnRequest {
        compare: vec![cmp("a", CompareTarget::Version, CompareResult::Equal, TargetUnion::Version(0))],
        success: vec![put_op("inner", "saw-no-a")],
        failure: vec![put_op("inner", "saw-a")],
    };
    let req = TxnRequest {
        success: vec![put_op("a", "1"), RequestOp { request: Some(Op::RequestTxn(inner)) }, get_op("a")],
        ..Default::default()
    };
    let resp = write(&m, &req).unwrap();
    assert_eq!(resp.header.unwrap().revision, 2);
    let Some(OpResponse::ResponseRange(r)) = &resp.responses[2].response else { panic!("range response") };
    assert_eq!(r.kvs[0].value, b"1", "reads in a txn see its earlier writes");
    let got = m.range(&crate::mvcc::KeyRange::new(b"inner", b""), Default::default()).unwrap();
    assert_eq!(got.kvs[0].value, b"saw-no-a");
}

#[test]
fn range_sorting_filters_and_limit() {
    let (_d, m) = store();
    for (k, v) in [("k1", "c"), ("k2", "a"), ("k3", "b")] {
        write(&m, &TxnRequest { success: vec![put_op(k, v)], ..Default::default() }).unwrap();
    }
    let keys = |r: RangeResponse| -> Vec<String> {
        r.kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect()
    };
    let base = RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() };
    let r = range(&m.read(), &RangeRequest { sort_target: SortTarget::Value as i32, ..base.clone() }).unwrap();
    assert_eq!(keys(r), ["k2", "k3", "k1"], "a non-key target sorts ascending by default");
    let r =
        range(&m.read(), &RangeRequest { sort_order: SortOrder::Descend as i32, limit: 2, ..base.clone() }).unwrap();
    assert_eq!((r.more, r.count), (true, 3));
    assert_eq!(keys(r), ["k3", "k2"]);
    let r = range(&m.read(), &RangeRequest { min_mod_revision: 3, keys_only: true, ..base.clone() }).unwrap();
    assert_eq!(r.count, 3, "count is taken before filters");
    assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
    assert_eq!(keys(r), ["k2", "k3"]);
    let r = range(&m.read(), &RangeRequest { limit: 3, ..base }).unwrap();
    assert!(!r.more, "no more when the limit is not reached");
}
