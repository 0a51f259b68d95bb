//! `meridian node` as an operator runs it: etcd's flags, a config file and
//! environment variables with the documented precedence, defaults with no
//! flags at all, and the HTTP endpoints beside gRPC.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meridian_tests::{
    check_health, etcdctl, etcdctl_with_input, http_get, lease_port, meridian_bin, Cluster, ClusterOpts,
};

/// A node process started by this test; killed by PID on drop.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(dir: &std::path::Path, args: &[String], env: &[(&str, String)]) -> anyhow::Result<Node> {
    let mut cmd = Command::new(meridian_bin()?);
    cmd.current_dir(dir)
        .arg("node")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(dir.join("node.log"))?));
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(Node(cmd.spawn()?))
}

fn wait_healthy(addr: SocketAddr, node: &mut Node) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if check_health(addr).is_ok() {
            return Ok(());
        }
        if let Some(status) = node.0.try_wait()? {
            anyhow::bail!("node exited with {status}");
        }
        anyhow::ensure!(Instant::now() < deadline, "node at {addr} not healthy in time");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn txn_of(n: usize) -> String {
    let mut s = String::from("\n");
    for i in 0..n {
        s.push_str(&format!("put k{i} v\n"));
    }
    s.push_str("\n\n");
    s
}

#[test]
fn flags_beat_environment_beats_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (client, peer) = (lease_port()?, lease_port()?);
    let client_url = format!("http://127.0.0.1:{}", client.port());
    let peer_url = format!("http://127.0.0.1:{}", peer.port());
    std::fs::write(
        dir.path().join("node.toml"),
        format!(
            "name = \"from-file\"\nlisten_client_urls = \"{client_url}\"\nadvertise_client_urls = \"{client_url}\"\n\
             listen_peer_urls = \"{peer_url}\"\ninitial_advertise_peer_urls = \"{peer_url}\"\nmax_txn_ops = 2\n"
        ),
    )?;
    let addr: SocketAddr = format!("127.0.0.1:{}", client.port()).parse()?;
    let ep = [format!("127.0.0.1:{}", client.port())];
    let config = ["--config-file".to_string(), "node.toml".to_string()];

    // The file alone: its name and its txn limit.
    let mut node = spawn(dir.path(), &config, &[])?;
    wait_healthy(addr, &mut node)?;
    let members = etcdctl(&ep, &["member", "list"])?;
    assert!(members.stdout.contains("from-file"), "{}", members.stdout);
    assert!(etcdctl_with_input(&ep, &["txn"], &txn_of(2))?.success());
    let refused = etcdctl_with_input(&ep, &["txn"], &txn_of(3))?;
    assert!(refused.stderr.contains("too many operations in txn request"), "{}", refused.stderr);
    drop(node);

    // The environment beats the file.
    let mut node = spawn(dir.path(), &config, &[("MERIDIAN_MAX_TXN_OPS", "3".into())])?;
    wait_healthy(addr, &mut node)?;
    assert!(etcdctl_with_input(&ep, &["txn"], &txn_of(3))?.success());
    assert!(!etcdctl_with_input(&ep, &["txn"], &txn_of(4))?.success());
    drop(node);

    // A flag beats both, also written Go-style with one dash.
    let mut args = config.to_vec();
    args.extend(["-max-txn-ops".to_string(), "4".to_string()]);
    let mut node = spawn(dir.path(), &args, &[("MERIDIAN_MAX_TXN_OPS", "3".into())])?;
    wait_healthy(addr, &mut node)?;
    assert!(etcdctl_with_input(&ep, &["txn"], &txn_of(4))?.success());
    assert!(!etcdctl_with_input(&ep, &["txn"], &txn_of(5))?.success());
    assert!(dir.path().join("from-file.meridian").is_dir(), "data dir defaults to <name>.meridian");
    Ok(())
}

#[test]
fn with_no_flags_it_serves_on_2379_with_data_in_default_meridian() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut node = spawn(dir.path(), &[], &[])?;
    wait_healthy("127.0.0.1:2379".parse()?, &mut node)?;
    let out = meridian_tests::etcdctl_ok(&["127.0.0.1:2379"], &["put", "k", "v"])?;
    assert_eq!(out.trim(), "OK");
    assert!(dir.path().join("default.meridian").is_dir());
    let list = meridian_tests::etcdctl_ok(&["127.0.0.1:2379"], &["member", "list"])?;
    assert!(list.contains("default, http://127.0.0.1:2380, http://127.0.0.1:2379"), "{list}");
    Ok(())
}

#[test]
fn bad_configuration_is_refused_with_a_clear_message() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for (args, want) in [
        (vec!["--name", "x", "--initial-cluster", "y=http://127.0.0.1:1"], "couldn't find local name \"x\""),
        (vec!["--heartbeat-interval", "100", "--election-timeout", "200"], "should be at least as 5 times"),
        (vec!["--initial-cluster-state", "bogus"], "initial-cluster-state"),
        (
            vec!["--listen-client-urls", "https://127.0.0.1:1"],
            "TLS key/cert (--cert-file, --key-file) must be provided for client url https://127.0.0.1:1 with HTTPS scheme",
        ),
        (vec!["--listen-peer-urls", "https://127.0.0.1:1"], "cannot listen on TLS for 127.0.0.1:1"),
        (vec!["--cert-file", "a.crt"], "--cert-file and --key-file must be given together"),
        // Each refused at startup, naming its flag, instead of failing later in a task.
        (vec!["--auto-compaction-retention", "5ns"], "invalid --auto-compaction-retention \"5ns\""),
        (vec!["--auto-compaction-mode", "daily"], "invalid --auto-compaction-mode \"daily\""),
        (vec!["--experimental-lease-checkpoint-interval", "0"], "--experimental-lease-checkpoint-interval"),
        (vec!["--experimental-watch-progress-notify-interval", "10"], "--experimental-watch-progress-notify-interval"),
        (vec!["--advertise-client-urls", "127.0.0.1:2379"], "--advertise-client-urls"),
        (vec!["--listen-metrics-urls", "http://127.0.0.1"], "--listen-metrics-urls"),
        (vec!["--initial-role", "tertiary"], "--initial-role"),
    ] {
        let out = Command::new(meridian_bin()?).current_dir(dir.path()).arg("node").args(&args).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    Ok(())
}

#[test]
fn health_version_and_metrics_over_http() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOpts { metrics: true, ..ClusterOpts::fast() })?;
    cluster.etcdctl_ok(&["put", "a", "1"])?;
    let client: SocketAddr = cluster.endpoint(1).parse()?;
    let metrics: SocketAddr = cluster.metrics_url(1).expect("metrics url").trim_start_matches("http://").parse()?;

    let (code, body) = http_get(client, "/health")?;
    assert_eq!((code, body.as_str()), (200, r#"{"health":"true"}"#));
    let (code, body) = http_get(client, "/version")?;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body)?;
    assert!(v["etcdserver"].as_str().is_some_and(|s| s.starts_with("3.4.")), "{body}");
    assert!(v["etcdcluster"].as_str().is_some(), "{body}");

    for addr in [client, metrics] {
        let (code, text) = http_get(addr, "/metrics")?;
        assert_eq!(code, 200);
        for name in [
            "etcd_server_has_leader 1",
            "etcd_server_is_leader",
            "etcd_server_leader_changes_seen_total",
            "etcd_server_proposals_committed_total",
            "etcd_server_proposals_applied_total",
            "etcd_server_proposals_pending",
            "etcd_server_proposals_failed_total",
            "etcd_disk_wal_fsync_duration_seconds_bucket",
            "etcd_disk_backend_commit_duration_seconds_bucket",
            "etcd_mvcc_db_total_size_in_bytes",
            "etcd_mvcc_db_total_size_in_use_in_bytes",
            "etcd_server_quota_backend_bytes",
            "etcd_debugging_mvcc_keys_total",
            "etcd_server_id",
        ] {
            assert!(text.contains(name), "{name} missing from /metrics on {addr}");
        }
        let committed: i64 = text
            .lines()
            .find_map(|l| l.strip_prefix("etcd_server_proposals_committed_total "))
            .and_then(|v| v.trim().parse().ok())
            .expect("committed gauge");
        assert!(committed >= 2, "the put was committed: {committed}");
    }
    Ok(())
}
