//! etcd's KV semantics on top of the MVCC store: Range, Put, DeleteRange and
//! Txn, and the request checks etcd makes before a request reaches raft.
//!
//! The same code serves three callers: apply (on a [`WriteTxn`]), and
//! read-only requests served locally (on a [`ReadTxn`]). That is what keeps
//! a read-only txn served without raft identical to one that went through it.

use std::cmp::Ordering;

use meridian_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use meridian_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use meridian_proto::etcdserverpb::request_op::Request as Op;
use meridian_proto::etcdserverpb::response_op::Response as OpResponse;
use meridian_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use meridian_proto::mvccpb::KeyValue;

use crate::error::{Error, Result};
use crate::mvcc::{KeyRange, RangeOpts, RangeResult, ReadTxn, WriteTxn};

/// What a request executes against: a read view, or apply's write transaction.
pub trait View {
    /// The revision reads see (and the header revision of a read).
    fn rev(&self) -> i64;
    fn compacted(&self) -> i64;
    fn range(&self, range: &KeyRange, opts: RangeOpts) -> Result<RangeResult>;
    fn put(&mut self, key: &[u8], value: Vec<u8>, lease: i64) -> Result<i64>;
    fn delete_range(&mut self, range: &KeyRange) -> Result<Vec<KeyValue>>;
}

impl View for ReadTxn<'_> {
    fn rev(&self) -> i64 {
        ReadTxn::rev(self)
    }
    fn compacted(&self) -> i64 {
        ReadTxn::compacted(self)
    }
    fn range(&self, range: &KeyRange, opts: RangeOpts) -> Result<RangeResult> {
        ReadTxn::range(self, range, opts)
    }
    fn put(&mut self, _: &[u8], _: Vec<u8>, _: i64) -> Result<i64> {
        Err(Error::Internal("write in a read-only view".into()))
    }
    fn delete_range(&mut self, _: &KeyRange) -> Result<Vec<KeyValue>> {
        Err(Error::Internal("write in a read-only view".into()))
    }
}

impl View for WriteTxn<'_> {
    fn rev(&self) -> i64 {
        WriteTxn::rev(self)
    }
    fn compacted(&self) -> i64 {
        WriteTxn::compacted(self)
    }
    fn range(&self, range: &KeyRange, opts: RangeOpts) -> Result<RangeResult> {
        WriteTxn::range(self, range, opts)
    }
    fn put(&mut self, key: &[u8], value: Vec<u8>, lease: i64) -> Result<i64> {
        Ok(WriteTxn::put(self, key, value, lease))
    }
    fn delete_range(&mut self, range: &KeyRange) -> Result<Vec<KeyValue>> {
        WriteTxn::delete_range(self, range)
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader { revision, ..Default::default() })
}

/// Executes a Range as etcd 3.4 does: `count` is taken before filters and
/// limit; sorting and the min/max filters need every key, so the limit is
/// applied after them; `more` says the limit cut the result.
pub fn range(view: &impl View, req: &RangeRequest) -> Result<RangeResponse> {
    let order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    let wanted = usize::try_from(req.limit).unwrap_or(0);
    let fetch = if order != SortOrder::None || filtered || wanted == 0 { 0 } else { wanted + 1 };
    let rr = view.range(
        &KeyRange::new(&req.key, &req.range_end),
        RangeOpts { rev: req.revision, limit: fetch, count_only: req.count_only },
    )?;
    let mut kvs = rr.kvs;
    if filtered {
        kvs.retain(|kv| {
            (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
                && (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
                && (req.max_create_revision == 0 || kv.create_revision <= req.max_create_revision)
                && (req.min_create_revision == 0 || kv.create_revision >= req.min_create_revision)
        });
    }
    // Results come sorted by key; any other target sorts ascending by default.
    let order = if target != SortTarget::Key && order == SortOrder::None { SortOrder::Ascend } else { order };
    if order != SortOrder::None {
        let cmp = |a: &KeyValue, b: &KeyValue| -> Ordering {
            match target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::Version => a.version.cmp(&b.version),
                SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                SortTarget::Value => a.value.cmp(&b.value),
            }
        };
        match order {
            SortOrder::Descend => kvs.sort_by(|a, b| cmp(b, a)),
            _ => kvs.sort_by(cmp),
        }
    }
    let mut more = false;
    if wanted > 0 && kvs.len() > wanted {
        kvs.truncate(wanted);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse { header: header(rr.rev), kvs, more, count: rr.count as i64 })
}

/// Whether a lease id names a live lease (the lessor answers in apply).
pub type LeaseCheck<'a> = &'a dyn Fn(i64) -> bool;

/// Executes a Put. `ignore_value`/`ignore_lease` keep the previous value or
/// lease, and need the key to exist; a lease must exist.
pub fn put(view: &mut impl View, req: &PutRequest, leases: LeaseCheck<'_>) -> Result<PutResponse> {
    if req.lease != 0 && !leases(req.lease) {
        return Err(Error::LeaseNotFound);
    }
    let prev = if req.prev_kv || req.ignore_value || req.ignore_lease {
        view.range(&KeyRange::Single(req.key.clone()), RangeOpts::default())?.kvs.into_iter().next()
    } else {
        None
    };
    if (req.ignore_value || req.ignore_lease) && prev.is_none() {
        return Err(Error::KeyNotFound);
    }
    let value = match (&prev, req.ignore_value) {
        (Some(p), true) => p.value.clone(),
        _ => req.value.clone(),
    };
    let lease = match (&prev, req.ignore_lease) {
        (Some(p), true) => p.lease,
        _ => req.lease,
    };
    let rev = view.put(&req.key, value, lease)?;
    Ok(PutResponse { header: header(rev), prev_kv: if req.prev_kv { prev } else { None } })
}

/// Executes a DeleteRange.
pub fn delete_range(view: &mut impl View, req: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
    let prev = view.delete_range(&KeyRange::new(&req.key, &req.range_end))?;
    Ok(DeleteRangeResponse {
        header: header(view.rev()),
        deleted: prev.len() as i64,
        prev_kvs: if req.prev_kv { prev } else { Vec::new() },
    })
}

/// Executes a Txn atomically: every compare of every nested txn on the
/// chosen path is evaluated first, against the state before the txn; then
/// every op on the path is checked; only then is anything written. So a txn
/// either applies whole or fails with nothing written.
pub fn txn(view: &mut impl View, req: &TxnRequest, leases: LeaseCheck<'_>) -> Result<TxnResponse> {
    let mut path = Vec::new();
    compare_path(view, req, &mut path)?;
    check_path(view, req, &path, &mut 0, leases)?;
    let mut resp = exec_txn(view, req, &path, &mut 0, leases)?;
    resp.header = header(view.rev());
    Ok(resp)
}

fn compare_path(view: &impl View, req: &TxnRequest, path: &mut Vec<bool>) -> Result<()> {
    let mut ok = true;
    for c in &req.compare {
        if !compare(view, c)? {
            ok = false;
            break;
        }
    }
    path.push(ok);
    for op in if ok { &req.success } else { &req.failure } {
        if let Some(Op::RequestTxn(inner)) = &op.request {
            compare_path(view, inner, path)?;
        }
    }
    Ok(())
}

fn check_path(view: &impl View, req: &TxnRequest, path: &[bool], at: &mut usize, leases: LeaseCheck<'_>) -> Result<()> {
    let ok = path[*at];
    *at += 1;
    for op in if ok { &req.success } else { &req.failure } {
        match &op.request {
            Some(Op::RequestRange(r)) if r.revision > 0 => {
                if r.revision > view.rev() {
                    return Err(Error::FutureRevision);
                }
                if r.revision < view.compacted() {
                    return Err(Error::Compacted);
                }
            }
            Some(Op::RequestPut(p)) if p.lease != 0 && !leases(p.lease) => return Err(Error::LeaseNotFound),
            Some(Op::RequestPut(p)) if p.ignore_value || p.ignore_lease => {
                let rr =
                    view.range(&KeyRange::Single(p.key.clone()), RangeOpts { count_only: true, ..Default::default() })?;
                if rr.count == 0 {
                    return Err(Error::KeyNotFound);
                }
            }
            Some(Op::RequestTxn(inner)) => check_path(view, inner, path, at, leases)?,
            _ => {}
        }
    }
    Ok(())
}

fn exec_txn(
    view: &mut impl View,
    req: &TxnRequest,
    path: &[bool],
    at: &mut usize,
    leases: LeaseCheck<'_>,
) -> Result<TxnResponse> {
    let succeeded = path[*at];
    *at += 1;
    let ops = if succeeded { &req.success } else { &req.failure };
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let response = match &op.request {
            Some(Op::RequestRange(r)) => OpResponse::ResponseRange(range(view, r)?),
            Some(Op::RequestPut(p)) => OpResponse::ResponsePut(put(view, p, leases)?),
            Some(Op::RequestDeleteRange(d)) => OpResponse::ResponseDeleteRange(delete_range(view, d)?),
            Some(Op::RequestTxn(t)) => {
                let mut inner = exec_txn(view, t, path, at, leases)?;
                inner.header = Some(ResponseHeader::default());
                OpResponse::ResponseTxn(inner)
            }
            None => return Err(Error::KeyNotFound),
        };
        responses.push(ResponseOp { response: Some(response) });
    }
    Ok(TxnResponse { header: None, succeeded, responses })
}

/// One compare; over a range, every key in it must satisfy it. A missing key
/// compares as version/revisions/lease 0, but never satisfies a VALUE compare.
fn compare(view: &impl View, c: &Compare) -> Result<bool> {
    let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
    let rr = match view.range(&KeyRange::new(&c.key, &c.range_end), RangeOpts::default()) {
        Ok(rr) => rr,
        Err(Error::Compacted | Error::FutureRevision) => return Ok(false),
        Err(e) => return Err(e),
    };
    if rr.kvs.is_empty() {
        return Ok(target != CompareTarget::Value && compare_kv(c, target, &KeyValue::default()));
    }
    Ok(rr.kvs.iter().all(|kv| compare_kv(c, target, kv)))
}

fn compare_kv(c: &Compare, target: CompareTarget, kv: &KeyValue) -> bool {
    let int = |v: Option<i64>| v.unwrap_or(0);
    let ord = match (target, &c.target_union) {
        (CompareTarget::Value, Some(TargetUnion::Value(v))) => kv.value.as_slice().cmp(v.as_slice()),
        (CompareTarget::Value, _) => kv.value.as_slice().cmp(&[]),
        (CompareTarget::Version, u) => {
            kv.version.cmp(&int(if let Some(TargetUnion::Version(v)) = u { Some(*v) } else { None }))
        }
        (CompareTarget::Create, u) => {
            kv.create_revision.cmp(&int(if let Some(TargetUnion::CreateRevision(v)) = u { Some(*v) } else { None }))
        }
        (CompareTarget::Mod, u) => {
            kv.mod_revision.cmp(&int(if let Some(TargetUnion::ModRevision(v)) = u { Some(*v) } else { None }))
        }
        (CompareTarget::Lease, u) => {
            kv.lease.cmp(&int(if let Some(TargetUnion::Lease(v)) = u { Some(*v) } else { None }))
        }
    };
    match CompareResult::try_from(c.result).unwrap_or(CompareResult::Equal) {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
        CompareResult::NotEqual => ord != Ordering::Equal,
    }
}

// ---- Checks made before a request is proposed (etcd's v3rpc checks). ----

pub fn check_range(r: &RangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

/// etcd's txn checks: op count, empty keys, malformed ops, and no key
/// written twice (or both written and deleted) on any one path.
pub fn check_txn(r: &TxnRequest, max_ops: usize) -> Result<()> {
    check_txn_ops(r, max_ops)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn check_txn_ops(r: &TxnRequest, max_ops: usize) -> Result<()> {
    let ops = r.compare.len().max(r.success.len()).max(r.failure.len());
    if ops > max_ops {
        return Err(Error::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::EmptyKey);
    }
    for op in r.success.iter().chain(&r.failure) {
        match &op.request {
            Some(Op::RequestRange(x)) => check_range(x)?,
            Some(Op::RequestPut(x)) => check_put(x)?,
            Some(Op::RequestDeleteRange(x)) => check_delete(x)?,
            Some(Op::RequestTxn(x)) => check_txn_ops(x, max_ops)?,
            None => return Err(Error::KeyNotFound),
        }
    }
    Ok(())
}

/// Returns the keys put and the ranges deleted by `ops` (both branches of
/// nested txns), failing on an overlap that one execution could hit.
fn check_intervals(ops: &[RequestOp]) -> Result<(Vec<Vec<u8>>, Vec<KeyRange>)> {
    let mut dels: Vec<KeyRange> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Op::RequestDeleteRange(d)) => Some(KeyRange::new(&d.key, &d.range_end)),
            _ => None,
        })
        .collect();
    let deleted = |dels: &[KeyRange], k: &[u8]| dels.iter().any(|d| d.contains(k));
    let mut puts: Vec<Vec<u8>> = Vec::new();
    for op in ops {
        let Some(Op::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(Error::DuplicateKey);
            }
        }
        for k in &puts_else {
            // Then and else never both run: a key in both is fine.
            if (puts.contains(k) && !puts_then.contains(k)) || deleted(&dels, k) {
                return Err(Error::DuplicateKey);
            }
        }
        puts.extend(puts_then);
        puts.extend(puts_else);
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(Op::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || deleted(&dels, &p.key) {
            return Err(Error::DuplicateKey);
        }
        puts.push(p.key.clone());
    }
    Ok((puts, dels))
}

pub use meridian_wire::etcd::{txn_is_read_only, txn_is_serializable};

/// True if the txn writes anything on any branch (what the space quota counts).
pub fn txn_has_put(r: &TxnRequest) -> bool {
    r.success.iter().chain(&r.failure).any(|op| match &op.request {
        Some(Op::RequestPut(_)) => true,
        Some(Op::RequestTxn(t)) => txn_has_put(t),
        _ => false,
    })
}

#[cfg(test)]
mod tests;
