//! Leases as service registration uses them: grant, attach, keep alive,
//! time to live, revoke, expiry — including across leader failure and a
//! whole-cluster restart — and etcdctl's lease commands against etcd 3.4.

use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp};
use meridian_tests::{Cluster, ClusterOpts, EtcdCluster};

fn grpc_code(e: &etcd_client::Error) -> Option<(tonic::Code, String)> {
    match e {
        etcd_client::Error::GRpcStatus(s) => Some((s.code(), s.message().to_string())),
        _ => None,
    }
}

/// etcdctl's lease commands print the same on etcd 3.4 and Meridian (lease ids masked).
#[test]
fn etcdctl_lease_commands_match_etcd() -> anyhow::Result<()> {
    fn session(c: &Cluster) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        let run = |args: &[&str]| -> anyhow::Result<String> {
            let o = c.etcdctl(args)?;
            let errors: Vec<&str> = o.stderr.lines().filter(|l| l.starts_with("Error")).collect();
            Ok(format!("{} | {} | {}", o.status.code().unwrap_or(-1), o.stdout.trim(), errors.join(";")))
        };
        let granted = c.etcdctl_ok(&["lease", "grant", "100"])?;
        let id = granted.split_whitespace().nth(1).expect("lease id").to_string();
        let mask = |s: String| s.replace(&id, "ID");
        out.push(mask(granted.trim().to_string()));
        let short = run(&["lease", "grant", "1"])?;
        let short_id = short.split_whitespace().nth(3).unwrap_or_default().to_string();
        out.push(short.replace(&short_id, "ID2"));
        out.push(mask(run(&["put", "k1", "v", &format!("--lease={id}")])?));
        out.push(mask(run(&["put", "k2", "v", &format!("--lease={id}")])?));
        out.push(mask(run(&["lease", "timetolive", &id])?).replace("remaining(99s)", "remaining(100s)"));
        // etcd lists a lease's keys in Go map order, which varies from run to run: sort them.
        let with_keys =
            mask(run(&["lease", "timetolive", "--keys", &id])?).replace("remaining(99s)", "remaining(100s)");
        out.push(sort_attached_keys(&with_keys));
        out.push(mask(run(&["lease", "keep-alive", "--once", &id])?));
        // etcd lists leases in no particular order: compare the count line.
        out.push(run(&["lease", "list"])?.lines().next().unwrap_or_default().to_string());
        out.push(mask(run(&["put", "k3", "v", "--lease=1234"])?));
        out.push(mask(run(&["lease", "revoke", &id])?));
        out.push(
            mask(run(&["get", "k", "--prefix", "--count-only", "-w", "fields"])?)
                .lines()
                .filter(|l| l.contains("Count") || l.contains("Revision"))
                .collect(),
        );
        out.push(run(&["lease", "revoke", "1234"])?);
        out.push(run(&["lease", "timetolive", "1234"])?);
        out.push(run(&["lease", "keep-alive", "--once", "1234"])?);
        Ok(out)
    }
    let etcd = EtcdCluster::start(1)?;
    let meridian = Cluster::start(
        3,
        ClusterOpts { election_timeout_ms: Some(1000), heartbeat_interval_ms: Some(100), ..ClusterOpts::default() },
    )?;
    let want = session(&etcd)?;
    let got = session(&meridian)?;
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g, w);
    }
    Ok(())
}

#[tokio::test]
async fn grant_attach_keepalive_ttl_revoke() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOpts::fast())?;
    let mut c = cluster.client().await?;

    let granted = c.lease_grant(60, Some(LeaseGrantOptions::new().with_id(0x1234))).await?;
    assert_eq!((granted.id(), granted.ttl()), (0x1234, 60));
    let dup = c.lease_grant(60, Some(LeaseGrantOptions::new().with_id(0x1234))).await.expect_err("duplicate id");
    assert_eq!(grpc_code(&dup), Some((tonic::Code::FailedPrecondition, "etcdserver: lease already exists".into())));
    let auto = c.lease_grant(1, None).await?;
    assert!(auto.id() > 0);
    assert_eq!(auto.ttl(), 1, "a TTL of 1 is granted as the minimum (1.5 election timeouts of 500 ms)");

    c.put("svc/a", "1", Some(PutOptions::new().with_lease(0x1234))).await?;
    c.put("svc/b", "1", Some(PutOptions::new().with_lease(0x1234))).await?;
    c.put("svc/c", "1", None).await?;
    let kv = c.get("svc/a", None).await?.kvs()[0].clone();
    assert_eq!(kv.lease(), 0x1234);

    let missing = c.put("x", "1", Some(PutOptions::new().with_lease(0x999))).await.expect_err("unknown lease");
    assert_eq!(grpc_code(&missing), Some((tonic::Code::NotFound, "etcdserver: requested lease not found".into())));
    // A txn whose chosen branch uses an unknown lease fails whole.
    let txn = Txn::new()
        .and_then([TxnOp::put("t1", "1", None), TxnOp::put("t2", "1", Some(PutOptions::new().with_lease(0x999)))]);
    assert!(c.txn(txn).await.is_err());
    assert_eq!(c.get("t1", None).await?.count(), 0, "nothing of the failed txn was written");
    // Compare on the LEASE target.
    let t = c
        .txn(
            Txn::new()
                .when([Compare::lease("svc/a", CompareOp::Equal, 0x1234)])
                .and_then([TxnOp::put("leased", "yes", None)]),
        )
        .await?;
    assert!(t.succeeded());
    let t = c.txn(Txn::new().when([Compare::lease("svc/c", CompareOp::Greater, 0)])).await?;
    assert!(!t.succeeded());

    // Keep-alive through every member (followers forward to the leader).
    for i in 1..=3 {
        let mut mc = cluster.member_client(i).await?;
        let (mut keeper, mut stream) = mc.lease_keep_alive(0x1234).await?;
        keeper.keep_alive().await?;
        let resp = tokio::time::timeout(Duration::from_secs(5), stream.message()).await??.expect("keep-alive reply");
        assert_eq!((resp.id(), resp.ttl()), (0x1234, 60), "member {i}");
        let ttl = mc.lease_time_to_live(0x1234, Some(LeaseTimeToLiveOptions::new().with_keys())).await?;
        assert_eq!(ttl.granted_ttl(), 60);
        assert!((55..=60).contains(&ttl.ttl()), "member {i}: {}", ttl.ttl());
        let mut keys: Vec<Vec<u8>> = ttl.keys().to_vec();
        keys.sort();
        assert_eq!(keys, [b"svc/a".to_vec(), b"svc/b".to_vec()]);
    }
    let listed: Vec<i64> = c.leases().await?.leases().iter().map(|l| l.id()).collect();
    assert!(listed.contains(&0x1234) && listed.contains(&auto.id()), "{listed:?}");

    // Revoke deletes every attached key in one revision.
    let before = c.get("svc/c", None).await?.header().unwrap().revision();
    let revoked = c.lease_revoke(0x1234).await?;
    assert_eq!(revoked.header().unwrap().revision(), before + 1);
    let left: Vec<Vec<u8>> = c
        .get("svc/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await?
        .kvs()
        .iter()
        .map(|kv| kv.key().to_vec())
        .collect();
    assert_eq!(left, [b"svc/c".to_vec()]);
    assert_eq!(c.lease_time_to_live(0x1234, None).await?.ttl(), -1);
    let gone = c.lease_revoke(0x1234).await.expect_err("already revoked");
    assert_eq!(grpc_code(&gone), Some((tonic::Code::NotFound, "etcdserver: requested lease not found".into())));
    Ok(())
}

/// Expiry is carried out by whichever member leads: a lease expires on
/// time even when the leader that granted it is killed.
#[tokio::test]
async fn lease_expires_while_the_leader_is_killed() -> anyhow::Result<()> {
    let opts = ClusterOpts {
        extra_args: vec!["--experimental-lease-checkpoint-interval".into(), "500ms".into()],
        ..ClusterOpts::fast()
    };
    let mut cluster = Cluster::start(3, opts)?;
    let leader = cluster.leader().await?;
    let survivor = (1..=3).find(|i| *i != leader).unwrap();
    let mut c = cluster.member_client(survivor).await?;
    let lease = c.lease_grant(4, None).await?.id();
    c.put("eph", "1", Some(PutOptions::new().with_lease(lease))).await?;
    let granted_at = Instant::now();
    cluster.kill9(leader)?;
    let deadline = granted_at + Duration::from_secs(15);
    loop {
        let present = match c.get("eph", Some(etcd_client::GetOptions::new().with_serializable())).await {
            Ok(r) => r.count() == 1,
            Err(_) => true,
        };
        if !present {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the leased key outlived its lease by far");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lived = granted_at.elapsed();
    assert!(lived >= Duration::from_millis(3500), "expired early: {lived:?}");
    Ok(())
}

/// Checkpoints carry remaining TTLs across a leader change and a full
/// restart, so neither hands a lease its full TTL again.
#[tokio::test]
async fn remaining_ttl_survives_leader_change_and_restart() -> anyhow::Result<()> {
    let opts = ClusterOpts {
        extra_args: vec!["--experimental-lease-checkpoint-interval".into(), "500ms".into()],
        ..ClusterOpts::fast()
    };
    let mut cluster = Cluster::start(3, opts)?;
    let mut c = cluster.client().await?;
    let lease = c.lease_grant(30, None).await?.id();
    // Long enough that a checkpoint a second or two stale (a loaded CI
    // machine), plus the election-timeout grace a new leader adds, still
    // leaves the remaining TTL well below the full 30 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let leader = cluster.leader().await?;
    cluster.kill9(leader)?;
    let survivor = (1..=3).find(|i| *i != leader).unwrap();
    let mut s = cluster.member_client(survivor).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let ttl = loop {
        match s.lease_time_to_live(lease, None).await {
            Ok(r) => break r.ttl(),
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => return Err(e.into()),
        }
    };
    assert!(ttl > 0 && ttl <= 27, "after a leader change the lease resumed with {ttl}s of 30");
    cluster.restart(leader)?;

    // Whole-cluster restart: the remaining TTL comes from the last checkpoint.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart_all()?;
    let mut c = cluster.client().await?;
    let ttl = c.lease_time_to_live(lease, None).await?.ttl();
    assert!(ttl > 0 && ttl <= 25, "after a full restart the lease resumed with {ttl}s of 30");
    Ok(())
}

/// `... attached keys([k2 k1]) ...` with the keys in sorted order.
fn sort_attached_keys(line: &str) -> String {
    let Some((head, rest)) = line.split_once("attached keys([") else { return line.to_string() };
    let Some((keys, tail)) = rest.split_once("])") else { return line.to_string() };
    let mut keys: Vec<&str> = keys.split(' ').collect();
    keys.sort_unstable();
    format!("{head}attached keys([{}]){tail}", keys.join(" "))
}
