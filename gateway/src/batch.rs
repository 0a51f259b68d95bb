//! Point reads to one region, gathered. While [`IN_FLIGHT`] reads to a
//! region are out, the next ones wait and leave together as one read-only
//! Txn, a Range per read (at most [`MAX_BATCH`]), which one member serves
//! with one call. Under load the member and the gateway pay one HTTP/2
//! request for many reads; a gateway with a free slot sends a read alone,
//! at once, so gathering adds no wait.
//!
//! Only serializable reads of one key are gathered, and only reads with
//! the same credentials. Each gets what it would alone: the Txn's ranges
//! are read at one revision, the answer's header (and so the revision the
//! gateway checks against a read's bound) is the Txn's. When the Txn
//! fails (a compacted revision, a key one user may not read, a member with
//! a lower `--max-txn-ops`), each read is sent again alone, so each gets
//! its own answer or error.

use std::collections::VecDeque;
use std::sync::Arc;

use meridian_proto::etcdserverpb::request_op::Request as Op;
use meridian_proto::etcdserverpb::response_op::Response as OpResponse;
use meridian_proto::etcdserverpb::{RangeRequest, RangeResponse, RequestOp, TxnRequest};
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tonic::metadata::MetadataMap;
use tonic::{Response, Status};

use crate::proxy::{forward, kv, CREDENTIALS};
use crate::regions::Region;

/// Reads out to a region at once before the next ones wait to be gathered.
pub const IN_FLIGHT: usize = 8;
/// Ranges in one Txn: under etcd's default `--max-txn-ops` (128).
pub const MAX_BATCH: usize = 64;

type Answer = Result<Response<RangeResponse>, Status>;

struct Waiting {
    /// The read's credentials, all it takes of the client's metadata.
    meta: MetadataMap,
    req: RangeRequest,
    tx: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct State {
    in_flight: usize,
    waiting: VecDeque<Waiting>,
}

/// One region's gathered reads.
pub struct Reads {
    state: Mutex<State>,
    /// Reads that left in a Txn with others, and those Txns.
    gathered: prometheus::IntCounter,
    batches: prometheus::IntCounter,
}

impl Reads {
    pub fn new(region: &str, metrics: &crate::metrics::Metrics) -> Self {
        Self {
            state: Mutex::default(),
            gathered: metrics.reads_gathered.with_label_values(&[region]),
            batches: metrics.read_batches.with_label_values(&[region]),
        }
    }

    /// `req` served by one of `region`'s members, alone or with others.
    pub async fn range(self: &Arc<Self>, region: &Arc<Region>, meta: &MetadataMap, req: RangeRequest) -> Answer {
        if !gatherable(&req) {
            return alone(region, meta, req).await;
        }
        let waiting = {
            let mut st = self.state.lock();
            if st.in_flight < IN_FLIGHT {
                st.in_flight += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                st.waiting.push_back(Waiting { meta: creds_only(meta), req: req.clone(), tx });
                Some(rx)
            }
        };
        match waiting {
            Some(rx) => rx.await.unwrap_or_else(|_| Err(Status::unavailable("meridian: a gathered read was dropped"))),
            None => {
                // The slot passes on when this read ends, even if its caller
                // stops waiting for it.
                let _slot = Slot { reads: self.clone(), region: region.clone() };
                alone(region, meta, req).await
            }
        }
    }

    /// A slot came free: the reads waiting (those with the first one's
    /// credentials) leave in it, or it is given back.
    fn release(self: &Arc<Self>, region: &Arc<Region>) {
        let batch = {
            let mut st = self.state.lock();
            // A caller that gave up waiting (its deadline passed) needs no answer.
            st.waiting.retain(|w| !w.tx.is_closed());
            let Some(first) = st.waiting.front() else {
                st.in_flight -= 1;
                return;
            };
            let creds = first.meta.clone();
            let mut batch = Vec::new();
            let mut rest = VecDeque::with_capacity(st.waiting.len());
            for w in st.waiting.drain(..) {
                if batch.len() < MAX_BATCH && same_creds(&w.meta, &creds) {
                    batch.push(w);
                } else {
                    rest.push_back(w);
                }
            }
            st.waiting = rest;
            batch
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime (the process is stopping): nothing will send them.
            self.state.lock().in_flight -= 1;
            return;
        };
        let (reads, region) = (self.clone(), region.clone());
        rt.spawn(async move {
            let _slot = Slot { reads: reads.clone(), region: region.clone() };
            reads.send(&region, batch).await;
        });
    }

    async fn send(&self, region: &Arc<Region>, batch: Vec<Waiting>) {
        if batch.len() == 1 {
            let w = batch.into_iter().next().expect("one read");
            let _ = w.tx.send(alone(region, &w.meta, w.req).await);
            return;
        }
        self.batches.inc();
        self.gathered.inc_by(batch.len() as u64);
        let txn = TxnRequest {
            success: batch.iter().map(|w| RequestOp { request: Some(Op::RequestRange(w.req.clone())) }).collect(),
            ..Default::default()
        };
        let answer = kv(region.read_channel()).txn(forward(&batch[0].meta, txn)).await;
        let responses: Vec<Option<RangeResponse>> = match answer {
            Ok(resp) if resp.get_ref().responses.len() == batch.len() => {
                let resp = resp.into_inner();
                let header = resp.header;
                resp.responses
                    .into_iter()
                    .map(|op| match op.response {
                        Some(OpResponse::ResponseRange(mut r)) => {
                            r.header = header;
                            Some(r)
                        }
                        _ => None,
                    })
                    .collect()
            }
            _ => vec![None; batch.len()],
        };
        let mut again = Vec::new();
        for (w, r) in batch.into_iter().zip(responses) {
            match r {
                Some(r) => {
                    let _ = w.tx.send(Ok(Response::new(r)));
                }
                None => again.push(w),
            }
        }
        // The Txn failed: each read alone, for its own answer.
        futures::future::join_all(again.into_iter().map(|w| async move {
            let _ = w.tx.send(alone(region, &w.meta, w.req).await);
        }))
        .await;
    }
}

/// A held slot of [`IN_FLIGHT`], passed on when dropped.
struct Slot {
    reads: Arc<Reads>,
    region: Arc<Region>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.reads.release(&self.region);
    }
}

async fn alone(region: &Region, meta: &MetadataMap, req: RangeRequest) -> Answer {
    kv(region.read_channel()).range(forward(meta, req)).await
}

/// A serializable read of one key, of the present or a past revision.
fn gatherable(req: &RangeRequest) -> bool {
    req.serializable && req.range_end.is_empty()
}

fn same_creds(a: &MetadataMap, b: &MetadataMap) -> bool {
    CREDENTIALS.iter().all(|k| a.get(*k) == b.get(*k))
}

fn creds_only(meta: &MetadataMap) -> MetadataMap {
    let mut out = MetadataMap::new();
    for k in CREDENTIALS {
        if let Some(v) = meta.get(k) {
            out.insert(k, v.clone());
        }
    }
    out
}
