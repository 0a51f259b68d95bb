//! A client for the members of one region's cluster: a few HTTP/2
//! connections to every member, and a probe (Maintenance.Status on each)
//! that finds the leader, the members that answer and the round trip.
//! The gateway keeps one per region and probes it continuously; the mirror
//! probes its source and target once per session and sends to their leaders.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use meridian_proto::etcdserverpb::StatusRequest;
use parking_lot::RwLock;
use tonic::transport::{Channel, Endpoint};

use crate::tls::ClientTls;

/// One member endpoint of a region.
pub struct Member {
    pub url: String,
    endpoint: Endpoint,
    tls: ClientTls,
    channels: RwLock<Vec<Channel>>,
    turn: AtomicUsize,
    /// Probes in a row that got no answer within their timeout.
    silent: AtomicUsize,
}

/// Probes in a row without an answer before a member is dialed anew: one
/// slow answer on a busy machine keeps its warm connection (new ones cost
/// a handshake, which a loaded machine may not finish in a probe's time).
const SILENT_PROBES_TO_REDIAL: usize = 3;

impl Member {
    fn new(url: &str, endpoint: Endpoint, connections: usize, tls: &ClientTls) -> Self {
        let channels = dial(&endpoint, tls, connections.max(1));
        Self {
            url: url.to_string(),
            endpoint,
            tls: tls.clone(),
            channels: RwLock::new(channels),
            turn: AtomicUsize::new(0),
            silent: AtomicUsize::new(0),
        }
    }

    /// One of the member's connections, in turn: requests from many callers
    /// share them, and one connection's stream bookkeeping is a point of
    /// contention.
    pub fn channel(&self) -> Channel {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let channels = self.channels.read();
        channels[turn % channels.len()].clone()
    }

    /// New connections in place of the member's current ones, for the calls
    /// that start from now on (calls under way finish on the old ones). A
    /// connection whose bytes stopped moving (a peer gone silent, a link
    /// that holds traffic back) would otherwise serve no call until HTTP/2
    /// keepalive gives up on it, 20 s later.
    fn redial(&self) {
        let mut channels = self.channels.write();
        *channels = dial(&self.endpoint, &self.tls, channels.len());
    }
}

/// `n` lazy connections to `endpoint`.
fn dial(endpoint: &Endpoint, tls: &ClientTls, n: usize) -> Vec<Channel> {
    (0..n).map(|_| tls.channel(endpoint)).collect()
}

/// What the last probe saw of the members.
#[derive(Clone, Debug, Default)]
pub struct MemberView {
    /// The leader's member id, 0 when no member named one.
    pub leader_id: u64,
    /// The leader's index in [`RegionClient::members`], when it answered.
    pub leader_index: Option<usize>,
    /// Members that answered, by index.
    pub answering: Vec<usize>,
    /// The highest revision a member reported.
    pub revision: i64,
    /// The fastest answer's round trip.
    pub min_rtt: Option<Duration>,
    /// The last member that failed, and why.
    pub error: Option<String>,
    /// A member did not answer within the probe's timeout (as opposed to
    /// refusing the connection or failing the call).
    pub timed_out: bool,
}

impl MemberView {
    /// A leader is known and at least one member answered.
    pub fn has_leader(&self) -> bool {
        self.leader_id != 0 && !self.answering.is_empty()
    }
}

pub struct RegionClient {
    pub members: Vec<Member>,
    view: RwLock<Arc<MemberView>>,
    /// Turns for [`RegionClient::read_channel`].
    next_reader: AtomicUsize,
}

impl RegionClient {
    /// Lazy connections (`connections` per member): nothing is dialed
    /// until the first call. `https://` members are dialed with `tls`.
    ///
    /// # Errors
    ///
    /// A URL tonic cannot use.
    pub fn new(urls: &[String], connections: usize, tls: &ClientTls) -> Result<Self, tonic::transport::Error> {
        let members = urls
            .iter()
            .map(|url| {
                let endpoint = Endpoint::from_shared(url.clone())?
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(10));
                Ok(Member::new(url, endpoint, connections, tls))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { members, view: RwLock::new(Arc::default()), next_reader: AtomicUsize::new(0) })
    }

    /// A client whose first probe found an answering member.
    ///
    /// # Errors
    ///
    /// A bad URL, or no member answered within `timeout` (the message names
    /// the last failure).
    pub async fn connect(urls: &[String], timeout: Duration, tls: &ClientTls) -> Result<Self, String> {
        let client = Self::new(urls, 1, tls).map_err(|e| e.to_string())?;
        let view = client.probe(timeout).await;
        if view.answering.is_empty() {
            return Err(view.error.clone().unwrap_or_else(|| "no endpoints".into()));
        }
        Ok(client)
    }

    /// Status on every member at once; the answers become the client's view.
    pub async fn probe(&self, timeout: Duration) -> Arc<MemberView> {
        let calls = self.members.iter().map(|m| async move {
            let started = Instant::now();
            let mut client = MaintenanceClient::new(m.channel());
            match tokio::time::timeout(timeout, client.status(StatusRequest {})).await {
                Ok(Ok(resp)) => Ok((resp.into_inner(), started.elapsed())),
                Ok(Err(status)) => Err((false, status.message().to_string())),
                Err(_) => Err((true, format!("no answer within {timeout:?}"))),
            }
        });
        let answers = futures::future::join_all(calls).await;
        let mut view = MemberView::default();
        for (i, a) in answers.into_iter().enumerate() {
            match a {
                Ok((status, rtt)) => {
                    self.members[i].silent.store(0, Ordering::Relaxed);
                    view.answering.push(i);
                    view.min_rtt = Some(view.min_rtt.map_or(rtt, |m| m.min(rtt)));
                    let member = status.header.as_ref().map_or(0, |h| h.member_id);
                    view.revision = view.revision.max(status.header.as_ref().map_or(0, |h| h.revision));
                    if status.leader != 0 {
                        view.leader_id = status.leader;
                        if member == status.leader {
                            view.leader_index = Some(i);
                        }
                    }
                }
                Err((timed_out, e)) => {
                    view.timed_out |= timed_out;
                    view.error = Some(format!("{}: {e}", self.members[i].url));
                    let m = &self.members[i];
                    if !timed_out {
                        m.silent.store(0, Ordering::Relaxed);
                    } else if m.silent.fetch_add(1, Ordering::Relaxed) + 1 >= SILENT_PROBES_TO_REDIAL {
                        // The next probe, and every call after it, dial anew.
                        tracing::info!(url = %m.url, "no answer to {SILENT_PROBES_TO_REDIAL} probes: dialing the member again");
                        m.silent.store(0, Ordering::Relaxed);
                        m.redial();
                    }
                }
            }
        }
        let view = Arc::new(view);
        *self.view.write() = view.clone();
        view
    }

    pub fn view(&self) -> Arc<MemberView> {
        self.view.read().clone()
    }

    /// The member to send to: the leader when known, else the first member
    /// that answered the last probe, else the first.
    pub fn channel(&self) -> (Channel, &str) {
        let i = self.preferred();
        (self.members[i].channel(), &self.members[i].url)
    }

    /// Index of the member [`RegionClient::channel`] sends to.
    pub fn preferred(&self) -> usize {
        let v = self.view.read();
        v.leader_index.or_else(|| v.answering.first().copied()).unwrap_or(0)
    }

    /// A member to read from: the members that answered the last probe in
    /// turn (a read's answer carries its own revision, so any member that
    /// has what the read needs may serve it).
    pub fn read_channel(&self) -> Channel {
        let v = self.view.read();
        if v.answering.is_empty() {
            return self.members[v.leader_index.unwrap_or(0)].channel();
        }
        let turn = self.next_reader.fetch_add(1, Ordering::Relaxed);
        self.members[v.answering[turn % v.answering.len()]].channel()
    }
}
