//! Linearizable reads away from the primary. A read may be served by any
//! region that has applied the primary's committed revision as of a moment
//! after the read began: then it cannot miss a write that completed before
//! it. [`ReadIndex`] obtains that revision from the primary's leader (a
//! linearizable Mirror.Status: the leader's own ReadIndex, reading no key,
//! so it needs no user when auth is on), one request for the reads that
//! arrive together.

use std::sync::Arc;

use meridian_proto::meridian::v1::mirror_client::MirrorClient;
use meridian_proto::meridian::v1::MirrorStatusRequest;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tonic::Status;

use crate::regions::Regions;

type Waiter = oneshot::Sender<Result<i64, Status>>;

/// A read index the primary does not give within this fails (`Unavailable`,
/// which clients retry) rather than hold the reads.
const BARRIER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Default)]
struct Batch {
    /// A flush is spawned and has not taken the batch yet.
    scheduled: bool,
    next: Vec<Waiter>,
}

#[derive(Default)]
pub struct ReadIndex {
    batch: Mutex<Batch>,
}

impl ReadIndex {
    /// The primary's committed revision, read after this call began.
    ///
    /// Reads that arrive together share one request: the first schedules
    /// a flush, which yields once so the others can join, then takes the
    /// batch and asks. Flushes do not wait for each other, so a read waits
    /// one round trip, not the rest of an earlier one too.
    ///
    /// # Errors
    ///
    /// `Unavailable` with no primary, or the primary's own error.
    pub async fn revision(self: &Arc<Self>, regions: &Arc<Regions>) -> Result<i64, Status> {
        let (tx, rx) = oneshot::channel();
        let schedule = {
            let mut b = self.batch.lock();
            b.next.push(tx);
            !std::mem::replace(&mut b.scheduled, true)
        };
        if schedule {
            tokio::spawn(self.clone().flush(regions.clone()));
        }
        rx.await.unwrap_or_else(|_| Err(Status::unavailable("meridian: read index abandoned")))
    }

    async fn flush(self: Arc<Self>, regions: Arc<Regions>) {
        tokio::task::yield_now().await;
        let batch = {
            let mut b = self.batch.lock();
            b.scheduled = false;
            std::mem::take(&mut b.next)
        };
        // Every read in the batch began before this request is sent.
        let answer = barrier(&regions).await;
        for w in batch {
            let _ = w.send(answer.clone());
        }
    }
}

async fn barrier(regions: &Regions) -> Result<i64, Status> {
    let primary = regions.primary().ok_or_else(|| Status::unavailable(crate::proxy::NO_PRIMARY))?;
    // Mirror.Status after a read barrier reads no key, so it needs no
    // user: one read index serves every user's reads (it is a revision, no
    // data is shared).
    let probe = MirrorStatusRequest { linearizable: true };
    let mut client = MirrorClient::new(primary.region.channel().0);
    let resp = tokio::time::timeout(BARRIER_TIMEOUT, client.status(probe))
        .await
        .map_err(|_| Status::unavailable("meridian: the primary's leader did not answer the read index"))??;
    Ok(resp.get_ref().revision)
}
