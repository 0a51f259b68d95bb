//! Proves the harness against the reference etcd 3.4 before Meridian's node exists: if these pass,
//! a failing Meridian test points at Meridian, not at the harness.
//!
//! They need `etcd` and `etcdctl` on PATH and fail (never skip) without them, with a message that
//! says `apt-get install etcd-server etcd-client`.

use std::os::unix::process::ExitStatusExt;

use meridian_tests::{decode_b64, ClusterOpts, EtcdCluster};

const SIGTERM: i32 = 15;

/// A put through `etcdctl` is read back through `etcdctl get -w json` with etcd's JSON shape.
#[test]
fn etcdctl_put_then_get_json() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1)?;

    assert_eq!(etcd.etcdctl_ok(&["put", "a", "1"])?.trim(), "OK");

    let resp = etcd.etcdctl_json(&["get", "a"])?;
    assert_eq!(resp["count"], 1, "{resp}");
    let kv = &resp["kvs"][0];
    assert_eq!(decode_b64(kv["key"].as_str().expect("key is a string"))?, b"a");
    assert_eq!(decode_b64(kv["value"].as_str().expect("value is a string"))?, b"1");
    assert_eq!(kv["version"], 1, "{resp}");
    assert_eq!(kv["create_revision"], kv["mod_revision"], "{resp}");
    assert_eq!(resp["header"]["revision"], kv["mod_revision"], "{resp}");
    Ok(())
}

/// Member operations: the leader is found, SIGKILLed, the survivors elect another and keep
/// serving, and the restarted member catches up on what it missed from its own data dir.
#[tokio::test]
async fn kill_leader_restart_catches_up() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start_with(3, ClusterOpts::fast())?;
    let mut client = etcd.client().await?;
    client.put("before", "1", None).await?;

    let old = etcd.leader().await?;
    etcd.kill9(old)?;
    assert!(!etcd.is_running(old));
    let new = etcd.leader().await?;
    assert_ne!(new, old);

    // A client on a survivor, so the write cannot stall on the dead member's connection.
    let mut survivor = etcd.member_client(new).await?;
    survivor.put("after", "2", None).await?;

    etcd.restart(old)?;
    let mut restarted = etcd.member_client(old).await?;
    // The default Get is linearizable: it answers only once the member has caught up.
    let resp = restarted.get("after", None).await?;
    assert_eq!(resp.kvs().first().map(|kv| kv.value()), Some(&b"2"[..]));
    let resp = restarted.get("before", None).await?;
    assert_eq!(resp.kvs().first().map(|kv| kv.value()), Some(&b"1"[..]));

    // A graceful stop: exit within 10 s of SIGTERM. etcd re-raises SIGTERM after shutting down.
    let status = etcd.stop(new)?;
    assert!(status.success() || status.signal() == Some(SIGTERM), "etcd exited with {status}");
    assert!(!etcd.is_running(new));
    Ok(())
}
