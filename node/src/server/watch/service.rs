//! etcd's Watch service: one bidirectional stream carries many watchers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use meridian_proto::etcdserverpb::watch_create_request::FilterType;
use meridian_proto::etcdserverpb::watch_request::RequestUnion;
use meridian_proto::etcdserverpb::watch_server::Watch;
use meridian_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use super::hub::{HeaderFn, Spec, WatchHub};
use crate::mvcc::KeyRange;
use crate::server::auth::store::AuthStore;

/// Responses queued per stream before its watchers count as slow and fall
/// back to catch-up from the store.
const STREAM_BUFFER: usize = 256;

pub struct WatchService {
    pub hub: WatchHub,
    pub header: HeaderFn,
    pub auth: Arc<AuthStore>,
    next_stream: AtomicU64,
}

impl WatchService {
    pub fn new(hub: WatchHub, header: HeaderFn, auth: Arc<AuthStore>) -> Self {
        Self { hub, header, auth, next_stream: AtomicU64::new(1) }
    }
}

/// Whether the stream's caller may watch what `c` names (READ over it), as
/// of now: etcd checks each create with the token the stream came with. A
/// refusal is no stream error but a created-and-canceled answer whose
/// reason is the gRPC status as Go prints it.
pub(crate) fn permitted(auth: &AuthStore, metadata: &MetadataMap, c: &WatchCreateRequest) -> Result<(), String> {
    if !auth.enabled() {
        return Ok(());
    }
    let key = if c.key.is_empty() { vec![0] } else { c.key.clone() };
    let state = auth.state();
    let checked = auth
        .info(metadata)
        .and_then(|who| state.check_fresh(&who).and_then(|()| state.check_range(&who.user, &key, &c.range_end)));
    checked.map_err(|e| {
        let status = Status::from(e);
        format!("rpc error: code = {:?} desc = {}", status.code(), status.message())
    })
}

/// etcd's normalization of a create request's keys: an empty key is the
/// smallest key, and a range end of `\0` means "every key from here".
pub(crate) fn spec_of(c: &WatchCreateRequest) -> Spec {
    let key = if c.key.is_empty() { vec![0] } else { c.key.clone() };
    let range = KeyRange::new(&key, &c.range_end);
    Spec {
        watch_id: c.watch_id,
        range,
        start_revision: c.start_revision,
        no_put: c.filters.contains(&(FilterType::Noput as i32)),
        no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
        prev_kv: c.prev_kv,
        progress_notify: c.progress_notify,
        fragment: c.fragment,
    }
}

/// The answer to a create: Created at the hub's revision, or canceled with
/// etcd's reason.
pub(crate) fn created_response(header: &HeaderFn, created: &Result<(i64, i64), String>) -> WatchResponse {
    match created {
        Ok((id, rev)) => {
            WatchResponse { header: Some(header(*rev)), watch_id: *id, created: true, ..Default::default() }
        }
        Err(reason) => WatchResponse {
            header: Some(header(0)),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason.clone(),
            ..Default::default()
        },
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(&self, req: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let metadata = req.metadata().clone();
        let mut inbound = req.into_inner();
        let auth = self.auth.clone();
        let (out, rx) = mpsc::channel(STREAM_BUFFER);
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let hub = self.hub.clone();
        let header = self.header.clone();
        hub.metrics().watch_streams.inc();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = out.closed() => break,
                };
                let Ok(Some(msg)) = msg else { break };
                let reply = match msg.request_union {
                    Some(RequestUnion::CreateRequest(c)) => {
                        let created = match permitted(&auth, &metadata, &c) {
                            Ok(()) => hub.create(stream, spec_of(&c), out.clone()),
                            Err(reason) => Err(reason),
                        };
                        let reply = created_response(&header, &created);
                        if let Ok((id, _)) = created {
                            if out.send(Ok(reply)).await.is_err() {
                                break;
                            }
                            hub.announce(stream, id);
                            continue;
                        }
                        reply
                    }
                    Some(RequestUnion::CancelRequest(c)) => match hub.cancel(stream, c.watch_id) {
                        Some(rev) => WatchResponse {
                            header: Some(header(rev)),
                            watch_id: c.watch_id,
                            canceled: true,
                            ..Default::default()
                        },
                        None => continue,
                    },
                    Some(RequestUnion::ProgressRequest(_)) => {
                        hub.progress(stream, out.clone());
                        continue;
                    }
                    None => continue,
                };
                if out.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
            hub.close(stream);
            hub.metrics().watch_streams.dec();
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
