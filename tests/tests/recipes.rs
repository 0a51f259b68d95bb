//! etcd's Lock and Election gRPC services through the etcd-client crate, one script run against
//! real etcd 3.4 and against Meridian: the keys they make, who waits for whom, what Observe
//! streams, and the errors, compared side by side. Also Defragment's answer, which etcd sends
//! without a header.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use etcd_client::{Client, GetOptions, LeaderKey, LockOptions, ProclaimOptions, ResignOptions};
use meridian_tests::{Cluster, ClusterOpts, EtcdCluster, GatewayProcess};
use tokio_stream::StreamExt;

/// An error as a client sees it: code and message.
fn error_of<T>(r: std::result::Result<T, etcd_client::Error>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(etcd_client::Error::GRpcStatus(s)) => format!("{:?}: {}", s.code(), s.message()),
        Err(e) => format!("other: {e}"),
    }
}

/// Whether `f` is still waiting after `wait`.
async fn still_waiting<T>(f: &mut tokio::task::JoinHandle<T>, wait: Duration) -> bool {
    tokio::time::timeout(wait, f).await.is_err()
}

/// Runs the script against one server; returns what a user would compare.
/// Lock and election names start with `ns`, so runs on one cluster do not meet.
async fn script(endpoint: String, ns: &str) -> Result<Vec<String>> {
    let connect = || Client::connect([endpoint.clone()], None);
    let (l, z, e) = (format!("{ns}L"), format!("{ns}Z"), format!("{ns}E"));
    let (l_dir, z_dir) = (format!("{l}/"), format!("{z}/"));
    let mut c = connect().await?;
    let mut seen = Vec::new();

    // Locks: the key is name/<lease hex>; a second holder waits until the first unlocks.
    let la = c.lease_grant(10, None).await?.id();
    let lb = c.lease_grant(10, None).await?.id();
    let a = c.lock(l.as_str(), Some(LockOptions::new().with_lease(la))).await?;
    ensure!(a.key() == format!("{l}/{la:x}").as_bytes(), "lock key {:?}", String::from_utf8_lossy(a.key()));
    let mut c2 = connect().await?;
    let l2 = l.clone();
    let mut b = tokio::spawn(async move { c2.lock(l2, Some(LockOptions::new().with_lease(lb))).await });
    ensure!(still_waiting(&mut b, Duration::from_millis(700)).await, "a second lock did not wait");
    let keys = c.get(l_dir.as_str(), Some(GetOptions::new().with_prefix().with_keys_only())).await?;
    seen.push(format!("waiting: {} keys under the lock's prefix", keys.count()));
    c.unlock(a.key()).await?;
    let b = tokio::time::timeout(Duration::from_secs(5), b).await.context("the waiter never got the lock")???;
    ensure!(b.key() == format!("{l}/{lb:x}").as_bytes());
    seen.push(format!("lock header revision above the unlock: {}", b.header().is_some_and(|h| h.revision() > 0)));
    c.unlock(b.key()).await?;
    let left = c.get(l_dir.as_str(), Some(GetOptions::new().with_prefix().with_count_only())).await?.count();
    seen.push(format!("after unlocks: {left} keys"));

    // A lock with no lease gets one from the server.
    let z = c.lock(z.as_str(), None).await?;
    let zkey = String::from_utf8_lossy(z.key()).to_string();
    let kv = c.get(z.key(), None).await?.kvs()[0].clone();
    let ttl = c.lease_time_to_live(kv.lease(), None).await?.granted_ttl();
    seen.push(format!("lease-less lock: key {} under the lock's prefix, lease {} s", zkey.starts_with(&z_dir), ttl));
    c.unlock(z.key()).await?;

    // Elections.
    let ea = c.lease_grant(10, None).await?.id();
    let eb = c.lease_grant(10, None).await?.id();
    seen.push(format!("no leader: {}", error_of(c.leader(e.as_str()).await)));
    let ca = c.campaign(e.as_str(), "a", ea).await?;
    let leader: LeaderKey = ca.leader().context("campaign leader")?.clone();
    ensure!(leader.key() == format!("{e}/{ea:x}").as_bytes());
    ensure!(leader.name() == e.as_bytes() && leader.lease() == ea && leader.rev() > 0);
    let mut observer = connect().await?.observe(e.as_str()).await?;
    let mut c3 = connect().await?;
    let e2 = e.clone();
    let mut second = tokio::spawn(async move { c3.campaign(e2, "b", eb).await });
    ensure!(still_waiting(&mut second, Duration::from_millis(700)).await, "a second campaign did not wait");
    let value = |r: etcd_client::LeaderResponse| r.kv().map(|kv| kv.value_str().unwrap_or("?").to_string());
    seen.push(format!("leader: {:?}", value(c.leader(e.as_str()).await?)));
    c.proclaim("a2", Some(ProclaimOptions::new().with_leader(leader.clone()))).await?;
    seen.push(format!("after proclaim: {:?}", value(c.leader(e.as_str()).await?)));
    let stale = leader.clone().with_rev(leader.rev() + 1000);
    seen.push(format!(
        "stale proclaim: {}",
        error_of(c.proclaim("x", Some(ProclaimOptions::new().with_leader(stale))).await)
    ));
    seen.push(format!("proclaim without leader: {}", error_of(c.proclaim("x", None).await)));
    c.resign(Some(ResignOptions::new().with_leader(leader))).await?;
    let cb = tokio::time::timeout(Duration::from_secs(5), second).await.context("the second never led")???;
    let b_leader = cb.leader().context("second leader")?;
    ensure!(b_leader.key() == format!("{e}/{eb:x}").as_bytes());
    seen.push(format!("after resign: {:?}", value(c.leader(e.as_str()).await?)));
    let mut observed = Vec::new();
    while observed.len() < 3 {
        let next = tokio::time::timeout(Duration::from_secs(5), observer.next()).await;
        let Ok(Some(resp)) = next else { break };
        observed.push(value(resp?).unwrap_or_default());
    }
    seen.push(format!("observed: {observed:?}"));

    // Defragment answers without a header, as etcd 3.4 does.
    let d = c.defragment().await?;
    seen.push(format!("defragment header: {:?}", d.header().is_some()));
    Ok(seen)
}

#[tokio::test]
async fn lock_and_election_match_etcd() -> Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let meridian = Cluster::start(3, ClusterOpts::fast())?;
    let want = script(etcd.endpoint(1), "").await.context("against etcd")?;
    let got = script(meridian.endpoint(2), "").await.context("against meridian")?;
    eprintln!("etcd 3.4 and meridian: {want:#?}");
    assert_eq!(got, want);
    // And through a gateway, which sends them to the primary's leader.
    let gw = GatewayProcess::start("gw", "default", &[("default", meridian.endpoints())], &[])?;
    let through = script(gw.endpoint(), "gw-").await.context("through a gateway")?;
    assert_eq!(through, want, "through a gateway");
    assert!(want.contains(&"observed: [\"a\", \"a2\", \"b\"]".to_string()), "{want:?}");
    Ok(())
}
