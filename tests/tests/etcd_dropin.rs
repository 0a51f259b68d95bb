//! `meridian node` as a drop-in for etcd 3.4's unit files and tooling: etcd's flags it does not
//! implement are accepted with a warning (or refused when ignoring them would be wrong), etcd's
//! YAML configuration file works with etcd's keys and gives the member and cluster ids etcd gives,
//! systemd hears READY=1, and a lease granted right after startup expires on time.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use meridian_tests::{check_health, etcd_bin, etcdctl_ok, lease_port, meridian_bin, Cluster, ClusterOpts};

#[test]
fn etcd_flags_of_its_e2e_tests_start_the_member_with_a_warning() -> Result<()> {
    let flags = [
        "--experimental-initial-corrupt-check",
        "--strict-reconfig-check",
        "--grpc-keepalive-min-time=10s",
        "--enable-v2=false",
        "--logger=zap",
        "--log-outputs=stderr",
        "--pre-vote",
    ];
    let cluster =
        Cluster::start(1, ClusterOpts { extra_args: flags.map(String::from).to_vec(), ..Default::default() })?;
    assert_eq!(cluster.etcdctl_ok(&["put", "k", "v"])?.trim(), "OK");
    let log = std::fs::read_to_string(cluster.log_path(1))?;
    for flag in ["--experimental-initial-corrupt-check", "--strict-reconfig-check", "--grpc-keepalive-min-time=10s"] {
        assert!(log.contains(flag) && log.contains("accepts and ignores"), "no warning for {flag}:\n{log}");
    }
    Ok(())
}

#[test]
fn etcd_flags_whose_effect_matters_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (args, want) in [
        (vec!["--enable-v2=true"], "--enable-v2=true: the etcd v2 API is out of scope"),
        (
            vec!["--auth-token", "jwt,pub-key=k,sign-method=RS256"],
            "--auth-token jwt,pub-key=k,sign-method=RS256: pub-key k:",
        ),
        (vec!["--force-new-cluster"], "--force-new-cluster=true"),
        (vec!["--discovery", "https://discovery.example/x"], "discovery is not supported"),
    ] {
        let out = Command::new(meridian_bin()?).current_dir(dir.path()).arg("node").args(&args).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    Ok(())
}

/// A process started by this test; killed by PID on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_healthy(port: u16, p: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while check_health(([127, 0, 0, 1], port).into()).is_err() {
        if let Some(status) = p.0.try_wait()? {
            bail!("exited with {status}");
        }
        if Instant::now() >= deadline {
            bail!("not healthy on {port} in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The first line of `etcdctl member list`: `id, started, name, peer URLs, client URLs, learner`.
fn member_line(port: u16) -> Result<String> {
    let list = etcdctl_ok(&[format!("127.0.0.1:{port}")], &["member", "list"])?;
    Ok(list.lines().next().context("empty member list")?.to_string())
}

/// The same etcd YAML file (etcd's keys, including some Meridian ignores) starts etcd 3.4 and
/// Meridian, which then list the same member id and report the same cluster id.
#[test]
fn etcds_yaml_config_file_gives_the_ids_etcd_gives() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (client, peer) = (lease_port()?, lease_port()?);
    let (c, p) = (client.port(), peer.port());
    let yaml = format!(
        "# etcd.conf.yml as etcd's docs write it\n\
         name: 'yaml-member'\n\
         data-dir: {data}\n\
         snapshot-count: 10000\n\
         heartbeat-interval: 100\n\
         election-timeout: 1000\n\
         quota-backend-bytes: 0\n\
         listen-peer-urls: http://127.0.0.1:{p}\n\
         listen-client-urls: http://127.0.0.1:{c}\n\
         max-snapshots: 5\n\
         max-wals: 5\n\
         initial-advertise-peer-urls: http://127.0.0.1:{p}\n\
         advertise-client-urls: http://127.0.0.1:{c}\n\
         initial-cluster: yaml-member=http://127.0.0.1:{p}\n\
         initial-cluster-token: 'yaml-cluster'\n\
         initial-cluster-state: 'new'\n\
         strict-reconfig-check: false\n\
         enable-v2: false\n\
         enable-pprof: true\n\
         proxy: 'off'\n\
         client-transport-security:\n\
         \x20 cert-file:\n\
         \x20 key-file:\n\
         \x20 client-cert-auth: false\n\
         debug: false\n\
         logger: zap\n\
         log-outputs: [stderr]\n\
         force-new-cluster: false\n",
        data = "DATA"
    );
    let mut seen = Vec::new();
    for (server, program, sub) in [("etcd", etcd_bin()?, vec![]), ("meridian", meridian_bin()?, vec!["node"])] {
        let data = dir.path().join(server);
        let file = dir.path().join(format!("{server}.conf.yml"));
        std::fs::write(&file, yaml.replace("DATA", &data.display().to_string()))?;
        let log = std::fs::File::create(dir.path().join(format!("{server}.log")))?;
        let mut cmd = Command::new(&program);
        cmd.args(&sub).arg("--config-file").arg(&file).stdout(Stdio::null()).stderr(log);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        let mut proc = Proc(cmd.spawn()?);
        wait_healthy(c, &mut proc)
            .with_context(|| std::fs::read_to_string(dir.path().join(format!("{server}.log"))).unwrap_or_default())?;
        let line = member_line(c)?;
        let status = etcdctl_ok(&[format!("127.0.0.1:{c}")], &["endpoint", "status", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&status)?;
        let cluster_id = v[0]["Status"]["header"]["cluster_id"].clone();
        seen.push((line, cluster_id));
        drop(proc);
    }
    assert!(seen[0].0.contains("yaml-member"), "{:?}", seen[0]);
    assert_eq!(seen[1].0.split(", ").next(), seen[0].0.split(", ").next(), "member id: etcd then meridian");
    assert_eq!(seen[1].1, seen[0].1, "cluster id: etcd then meridian");
    let log = std::fs::read_to_string(dir.path().join("meridian.log"))?;
    assert!(log.contains("max-snapshots") && log.contains("ignores"), "{log}");
    Ok(())
}

#[test]
fn a_yaml_configs_certificate_name_checks_are_read() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("tls.yml");
    // Both checks at once: refused with etcd's message, which shows both were read.
    let yaml = "name: t\ncipher-suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n\
                peer-transport-security:\n  allowed-cn: m1\n  allowed-hostname: localhost\n";
    std::fs::write(&file, yaml)?;
    let out =
        Command::new(meridian_bin()?).current_dir(dir.path()).arg("node").arg("--config-file").arg(&file).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr
                .contains(r#"AllowedCN and AllowedHostname are mutually exclusive (cn="m1", hostname="localhost")"#),
        "{stderr}"
    );
    // A cipher suite Go does not know, in the YAML list: etcd's message.
    std::fs::write(&file, "name: t\ncipher-suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, NOPE]\n")?;
    let out =
        Command::new(meridian_bin()?).current_dir(dir.path()).arg("node").arg("--config-file").arg(&file).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(r#"unexpected TLS cipher suite "NOPE""#), "{stderr}");
    Ok(())
}

/// A `Type=notify` unit: the member sends READY=1 to `$NOTIFY_SOCKET` once it serves.
#[test]
fn systemd_hears_ready_once_the_member_serves() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path)?;
    socket.set_read_timeout(Some(Duration::from_secs(20)))?;
    let env = vec![("NOTIFY_SOCKET".to_string(), path.display().to_string())];
    let cluster = Cluster::start(1, ClusterOpts { env, ..Default::default() })?;
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).context("no sd_notify message")?;
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(cluster.etcdctl_ok(&["put", "k", "v"])?.trim(), "OK");
    Ok(())
}

/// etcd's `TestCtlV3LeaseTestTimeToLiveExpired`: a 3 s lease granted right after startup has
/// expired 4 s later. Three fresh members, since the fault it guards against came and went with
/// timing.
#[test]
fn a_lease_granted_right_after_startup_expires_on_time() -> Result<()> {
    for round in 0..3 {
        let cluster = Cluster::start(1, ClusterOpts::default())?;
        let granted = cluster.etcdctl_ok(&["lease", "grant", "3"])?;
        let id = granted.split_whitespace().nth(1).context("lease id")?.to_string();
        std::thread::sleep(Duration::from_secs(4));
        let ttl = cluster.etcdctl_ok(&["lease", "timetolive", &id])?;
        assert!(ttl.contains("already expired"), "round {round}: 4 s after a 3 s grant: {ttl}");
    }
    Ok(())
}

/// Metric names on `/metrics` (sample lines, without `_bucket`/`_sum`/`_count` and labels).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| ["_bucket", "_sum", "_count"].iter().fold(n, |n, s| n.strip_suffix(s).unwrap_or(n)).to_string())
        .collect()
}

/// Every etcd 3.4 metric is accounted for in tests/data/etcd-3.4-metrics.txt (checked against a
/// live etcd after the same requests), and every one marked `exported` is on Meridian's /metrics
/// under etcd's name.
#[tokio::test]
async fn etcds_metrics_are_exported_under_their_names() -> Result<()> {
    let table = include_str!("../data/etcd-3.4-metrics.txt");
    let listed: std::collections::BTreeMap<&str, &str> =
        table.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once('\t')).collect();
    let etcd = meridian_tests::EtcdCluster::start(1)?;
    let meridian = Cluster::start(1, ClusterOpts::default())?;
    let mut names = Vec::new();
    for cluster in [&*etcd, &meridian] {
        cluster.etcdctl_ok(&["put", "a", "b"])?;
        cluster.etcdctl_ok(&["get", "a"])?;
        cluster.etcdctl_ok(&["lease", "grant", "10"])?;
        let (_, text) = meridian_tests::http_get(cluster.endpoint(1).parse()?, "/metrics")?;
        names.push(metric_names(&text));
    }
    let unlisted: Vec<_> =
        names[0].iter().filter(|n| n.starts_with("etcd") && !listed.contains_key(n.as_str())).collect();
    assert!(unlisted.is_empty(), "etcd exports metrics the table does not account for: {unlisted:?}");
    let missing: Vec<_> =
        listed.iter().filter(|(n, d)| **d == "exported" && !names[1].contains(**n)).map(|(n, _)| n).collect();
    assert!(missing.is_empty(), "marked exported but missing from Meridian's /metrics: {missing:?}");
    Ok(())
}

/// The value of one sample (`name{labels}` as the page prints it, or a bare name) on a
/// Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The metrics that were "not yet" mean what etcd's do: watchers, streams and events sent,
/// records a compaction removed, raft log bytes, client bytes and calls by kind and version.
#[tokio::test]
async fn watch_compaction_log_and_client_metrics_count_what_happened() -> Result<()> {
    let cluster = Cluster::start(1, ClusterOpts::default())?;
    let mut client = cluster.client().await?;
    client.put("m", "1", None).await?;
    let second = client.put("m", "2", None).await?;
    let rev = second.header().context("header")?.revision();
    let (_watcher, mut events) = client.watch("m", None).await?;
    let (_other, _other_events) = client.watch("other", None).await?;
    client.put("m", "3", None).await?;
    let got = tokio::time::timeout(Duration::from_secs(5), events.message()).await??.context("watch ended")?;
    ensure_events(&got)?;
    client.compact(rev, None).await?; // m@1 is superseded at rev: removed
    let page = || -> Result<String> { Ok(meridian_tests::http_get(cluster.endpoint(1).parse()?, "/metrics")?.1) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = page()?;
        if sample(&text, "etcd_debugging_mvcc_db_compaction_keys_total").unwrap_or(0.0) >= 1.0 {
            break text;
        }
        if Instant::now() > deadline {
            bail!("no compacted key counted:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let value = |series: &str| sample(&text, series).with_context(|| format!("{series} is not on /metrics"));
    assert_eq!(value("etcd_debugging_mvcc_watcher_total")?, 2.0, "two watchers");
    assert!(value("etcd_debugging_mvcc_watch_stream_total")? >= 1.0);
    assert_eq!(value("etcd_debugging_mvcc_slow_watcher_total")?, 0.0);
    assert!(value("etcd_debugging_mvcc_events_total")? >= 1.0, "the event sent");
    assert_eq!(value("etcd_debugging_mvcc_db_compaction_keys_total")?, 1.0, "m@1 removed");
    assert!(value("etcd_disk_wal_write_bytes_total")? > 0.0);
    assert!(value("etcd_network_client_grpc_received_bytes_total")? > 0.0);
    assert!(value("etcd_network_client_grpc_sent_bytes_total")? > 0.0);
    let calls: f64 = text
        .lines()
        .filter(|l| l.starts_with("etcd_server_client_requests_total{") && l.contains(r#"type="unary""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(calls >= 4.0, "four puts and a compact are unary calls: {calls}");
    assert!(
        text.contains(r#"etcd_server_client_requests_total{client_api_version="#) && text.contains(r#"type="stream""#)
    );
    Ok(())
}

fn ensure_events(resp: &etcd_client::WatchResponse) -> Result<()> {
    anyhow::ensure!(resp.events().len() == 1, "one event, got {:?}", resp.events());
    Ok(())
}

/// `--max-concurrent-streams` is the HTTP/2 limit of a client connection, as in etcd: a third
/// call on a connection limited to two waits until one ends.
#[tokio::test]
async fn max_concurrent_streams_limits_one_connection() -> Result<()> {
    let opts = ClusterOpts { extra_args: vec!["--max-concurrent-streams".into(), "2".into()], ..Default::default() };
    let cluster = Cluster::start(1, opts)?;
    let mut client = cluster.client().await?;
    client.put("k", "v", None).await?;
    let (w1, _s1) = client.watch("a", None).await?;
    let (_w2, _s2) = client.watch("b", None).await?;
    let mut third = client.clone();
    let get = tokio::spawn(async move { third.get("k", None).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!get.is_finished(), "a third concurrent stream was let through");
    drop((w1, _s1));
    let resp = tokio::time::timeout(Duration::from_secs(5), get).await.context("the call never ran")???;
    assert_eq!(resp.kvs().len(), 1);
    Ok(())
}

/// `--grpc-keepalive-interval` and `--grpc-keepalive-timeout`: the member pings an idle client
/// connection, and closes one that does not answer.
#[test]
fn keepalive_pings_and_closes_a_silent_connection() -> Result<()> {
    use std::io::{Read, Write};
    let opts = ClusterOpts {
        extra_args: ["--grpc-keepalive-interval", "200ms", "--grpc-keepalive-timeout", "300ms"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let cluster = Cluster::start(1, opts)?;
    let mut s = std::net::TcpStream::connect(cluster.endpoint(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // The HTTP/2 preface and an empty SETTINGS frame; then silence: no ACK, no PING answer.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")?;
    let started = Instant::now();
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let closed_after = started.elapsed();
    let mut kinds = Vec::new();
    let mut at = 0;
    while at + 9 <= got.len() {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        kinds.push((got[at + 3], got[at + 4]));
        at += 9 + len;
    }
    assert!(kinds.contains(&(0x6, 0)), "no PING from the member: frames {kinds:?}");
    assert!(closed_after < Duration::from_secs(3), "the silent connection stayed open {closed_after:?}");
    Ok(())
}

/// `unix://` client and peer URLs, as etcd's own tests use them: the socket files are named by
/// the URL (`localhost:N`, in the working directory); etcdctl works through them, and a member
/// lists itself as etcd does.
#[test]
fn unix_socket_urls_serve_as_etcds_do() -> Result<()> {
    let (c, p, m) = (lease_port()?, lease_port()?, lease_port()?);
    let mut seen = Vec::new();
    for (server, program, sub) in [("etcd", etcd_bin()?, vec!["node"]), ("meridian", meridian_bin()?, vec!["node"])] {
        let dir = tempfile::tempdir()?;
        let client = format!("unix://localhost:{}", c.port());
        let peer = format!("unix://localhost:{}", p.port());
        let sub = if server == "etcd" { &[][..] } else { &sub[..] };
        let log = std::fs::File::create(dir.path().join("log"))?;
        let mut cmd = Command::new(&program);
        cmd.current_dir(dir.path())
            .args(sub)
            .args(["--name", "u1", "--data-dir", "data", "--initial-cluster-token", "unix-test"])
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("u1={peer}")])
            .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{}", m.port())])
            .stdout(Stdio::null())
            .stderr(log);
        let mut proc = Proc(cmd.spawn()?);
        wait_healthy(m.port(), &mut proc)
            .with_context(|| std::fs::read_to_string(dir.path().join("log")).unwrap_or_default())?;
        let socket = dir.path().join(format!("localhost:{}", c.port()));
        anyhow::ensure!(socket.exists(), "{server}: no socket file {}", socket.display());
        // etcdctl names the socket relative to its own working directory.
        let ctl = |args: &[&str]| -> Result<String> {
            let out = Command::new(meridian_tests::etcdctl_bin()?)
                .current_dir(dir.path())
                .env("ETCDCTL_API", "3")
                .args([format!("--endpoints={client}").as_str(), "--dial-timeout=3s"])
                .args(args)
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "{server}: etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let put = ctl(&["put", "k", "over a socket"])?;
        let get = ctl(&["get", "k", "--print-value-only"])?;
        let members = ctl(&["member", "list"])?;
        seen.push((put, get, members));
        drop(proc);
    }
    assert_eq!(seen[0].1.trim(), "over a socket");
    assert_eq!(seen[1], seen[0], "meridian, then etcd");
    Ok(())
}
