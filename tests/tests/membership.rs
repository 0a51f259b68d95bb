//! Membership changes beside etcd 3.4: the same etcdctl session (member add as a learner, the
//! new member joining with `--initial-cluster-state existing`, what a learner refuses, promote,
//! update, the refusals, and removing the leader) runs against a real etcd and a Meridian
//! cluster, and prints the same thing once member and cluster ids are masked.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use meridian_tests::{assert_same_steps, etcdctl, mask_hex_ids, Cluster, ClusterOpts, Server};

/// What a command printed, comparable across clusters: ids masked, ports replaced by the member
/// names they belong to, etcdctl's own log lines dropped, and lines (and the list inside
/// `ETCD_INITIAL_CLUSTER`, which etcd orders by member id) sorted.
fn normalize(c: &Cluster, text: &str) -> String {
    // etcdctl pads ids to 16 columns (`%16x`): an id with a leading zero digit gets a space.
    let mut text = mask_hex_ids(text);
    while text.contains("  ID") {
        text = text.replace("  ID", " ID");
    }
    for i in (1..=c.len()).rev() {
        text = text.replace(&c.endpoint(i), &format!("<m{i} client>"));
    }
    for (port, name) in peer_ports(c) {
        text = text.replace(&format!("127.0.0.1:{port}"), &format!("<{name} peer>"));
    }
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("{\"level\""))
        .map(|l| match l.strip_prefix("ETCD_INITIAL_CLUSTER=\"").and_then(|r| r.strip_suffix('"')) {
            Some(list) => {
                let mut parts: Vec<&str> = list.split(',').collect();
                parts.sort();
                format!("ETCD_INITIAL_CLUSTER=\"{}\"", parts.join(","))
            }
            None => l.to_string(),
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// The peer port of every member, from `member list` (a member added later included).
fn peer_ports(c: &Cluster) -> Vec<(String, String)> {
    let eps: Vec<String> = (1..=c.len()).filter(|&i| c.is_running(i)).map(|i| c.endpoint(i)).collect();
    let Ok(out) = etcdctl(&eps, &["member", "list"]) else { return Vec::new() };
    out.stdout
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(", ").collect();
            let name = fields.get(2)?.to_string();
            let port = fields.get(3)?.rsplit(':').next()?.to_string();
            Some((port, if name.is_empty() { "unstarted".into() } else { name }))
        })
        .collect()
}

/// Runs etcdctl against `eps` and records how it went: the exit, and stdout or the error line.
fn run(c: &Cluster, eps: &[String], args: &[&str]) -> Result<String> {
    let out = etcdctl(eps, args)?;
    let error = out.stderr.lines().filter(|l| l.starts_with("Error:")).collect::<Vec<_>>().join("\n");
    let command = normalize(c, &args.join(" "));
    Ok(format!("$ etcdctl {command}\nok={}\n{}{}", out.success(), normalize(c, &out.stdout), error))
}

/// The id of member `name`, from `member list`.
fn member_id(c: &Cluster, eps: &[String], name: &str) -> Result<String> {
    let out = etcdctl(eps, &["member", "list"])?;
    out.stdout
        .lines()
        .find(|l| l.split(", ").nth(2) == Some(name))
        .and_then(|l| l.split(", ").next())
        .map(str::to_string)
        .with_context(|| format!("no member {name} in {}", normalize(c, &out.stdout)))
}

/// The session; what each step printed, in order.
fn session(server: Server) -> Result<Vec<String>> {
    let opts = ClusterOpts { ready_timeout: Duration::from_secs(20), ..ClusterOpts::fast() };
    let mut c = Cluster::start_server(server, 1, opts)?;
    let mut seen = Vec::new();
    c.etcdctl_ok(&["put", "before", "1"])?;

    // A learner joins, and has the data.
    let (two, added) = c.add_member(true)?;
    let joined = Instant::now();
    seen.push(format!("$ etcdctl member add m2 --learner\n{}", normalize(&c, &added)));
    let learner = vec![c.endpoint(two)];
    let all = vec![c.endpoint(1), c.endpoint(two)];
    let deadline = Instant::now() + Duration::from_secs(10);
    while etcdctl(&learner, &["get", "before", "--consistency=s", "--print-value-only"])?.stdout.trim() != "1" {
        ensure!(Instant::now() < deadline, "the learner never got the data");
        std::thread::sleep(Duration::from_millis(100));
    }
    seen.push(run(&c, &learner, &["get", "before", "--consistency=s"])?);
    seen.push(run(&c, &learner, &["--command-timeout=2s", "put", "k", "v"])?);
    seen.push(run(&c, &learner, &["--command-timeout=2s", "get", "before"])?);
    seen.push(run(&c, &[c.endpoint(1)], &["member", "list"])?);
    // etcd's JSON gateway on the learner: a write is refused the same way.
    let (code, body) =
        meridian_tests::http_post(c.endpoint(two).parse()?, "/v3/kv/put", r#"{"key":"aw==","value":"dg=="}"#)?;
    seen.push(format!("POST /v3/kv/put on the learner: {code} {body}"));

    // Refusals.
    let peer_of_m2 = format!("--peer-urls={}", c.member_peer_url(two));
    seen.push(run(&c, &[c.endpoint(1)], &["member", "add", "m9", &peer_of_m2])?);
    seen.push(run(&c, &[c.endpoint(1)], &["member", "add", "m9", "--learner", "--peer-urls=http://127.0.0.1:1"])?);
    seen.push(run(&c, &[c.endpoint(1)], &["member", "remove", "1234567890abcdef"])?);
    seen.push(run(&c, &[c.endpoint(1)], &["member", "promote", "1234567890abcdef"])?);
    let m1 = member_id(&c, &all, "m1")?;
    seen.push(run(&c, &[c.endpoint(1)], &["member", "promote", &m1])?);

    // Promote the learner, update it, remove the first member (the leader).
    let m2 = member_id(&c, &all, "m2")?;
    seen.push(run(&c, &[c.endpoint(1)], &["member", "promote", &m2])?);
    seen.push(run(&c, &all, &["member", "update", &m2, &peer_of_m2])?);
    seen.push(run(&c, &all, &["member", "list"])?);
    seen.push(run(&c, &all, &["put", "k", "v"])?);
    // Both refuse to remove a voter while the rest have been reachable for under 5 s (etcd's
    // active-quorum guard); wait that out.
    std::thread::sleep((joined + Duration::from_secs(6)).saturating_duration_since(Instant::now()));
    seen.push(run(&c, &all, &["member", "remove", &m1])?);
    c.wait_exit(1, Duration::from_secs(10)).context("a removed member stops")?;
    let rest = vec![c.endpoint(two)];
    let deadline = Instant::now() + Duration::from_secs(15);
    while !etcdctl(&rest, &["--command-timeout=2s", "put", "after", "1"])?.success() {
        ensure!(Instant::now() < deadline, "the remaining member never took writes");
    }
    seen.push(run(&c, &rest, &["get", "", "--prefix", "--keys-only"])?);
    seen.push(run(&c, &rest, &["member", "list"])?);
    Ok(seen)
}

#[test]
fn etcdctl_member_commands_print_what_etcd_prints() -> Result<()> {
    let etcd = session(Server::Etcd)?;
    let meridian = session(Server::Meridian)?;
    // The session checks something: the learner refused, and the refusals are etcd's.
    let expected = [
        "etcdserver: rpc not supported for learner",
        "etcdserver: Peer URLs already exists",
        "etcdserver: too many learner members in cluster",
        "etcdserver: member not found",
        "etcdserver: can only promote a learner member",
        "promoted in cluster",
        "removed from cluster",
    ];
    assert_same_steps(&etcd, &meridian, &expected);
    Ok(())
}

/// A member removed while it was down learns it from its peers when it comes back, and stops,
/// as etcd's does.
#[test]
fn a_member_removed_while_down_stops_when_it_returns() -> Result<()> {
    for server in [Server::Etcd, Server::Meridian] {
        let mut c = Cluster::start_server(server, 3, ClusterOpts::fast())?;
        let eps: Vec<String> = (1..=2).map(|i| c.endpoint(i)).collect();
        let m3 = member_id(&c, &eps, "m3")?;
        c.stop(3)?;
        // A member that is down may go at once (it is not part of the active quorum).
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = etcdctl(&eps, &["member", "remove", &m3])?;
            if out.success() {
                break;
            }
            ensure!(Instant::now() < deadline, "{server:?}: cannot remove a stopped member: {}", out.stderr);
            std::thread::sleep(Duration::from_millis(500));
        }
        c.spawn(3)?;
        let status = c.wait_exit(3, Duration::from_secs(20)).with_context(|| format!("{server:?}: m3 kept running"))?;
        let log = std::fs::read_to_string(c.log_path(3))?;
        ensure!(log.contains("permanently removed"), "{server:?} ({status}): {log}");
        ensure!(c.etcdctl_ok(&["put", "k", "v"])?.trim() == "OK", "{server:?}: the rest take writes");
    }
    Ok(())
}

/// A member add and a promotion sent to a follower are judged by the leader (which alone sees
/// who is reachable and the learner's progress), as on etcd.
#[test]
fn a_promotion_sent_to_a_follower_is_done_by_the_leader() -> Result<()> {
    for server in [Server::Etcd, Server::Meridian] {
        let mut c = Cluster::start_server(server, 3, ClusterOpts::fast())?;
        c.etcdctl_ok(&["put", "k", "v"])?;
        let status = etcdctl(&c.endpoints(), &["endpoint", "status", "-w", "json"])?;
        let status: serde_json::Value = serde_json::from_str(&status.stdout)?;
        let follower = status
            .as_array()
            .and_then(|all| all.iter().find(|s| s["Status"]["leader"] != s["Status"]["header"]["member_id"]))
            .and_then(|s| s["Endpoint"].as_str())
            .context("a follower")?
            .to_string();
        // Both refuse a member add until every voter has been reachable for 5 s, also when a
        // follower is asked.
        let early = etcdctl(&[&follower], &["member", "add", "m9", "--learner", "--peer-urls=http://127.0.0.1:1"])?;
        ensure!(
            !early.success() && early.stderr.contains("etcdserver: unhealthy cluster"),
            "{server:?}: {}",
            early.stderr
        );
        std::thread::sleep(Duration::from_secs(6));
        let (four, _) = c.add_member(true)?;
        let learner = member_id(&c, &[c.endpoint(1)], "m4")?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = etcdctl(&[&follower], &["member", "promote", &learner])?;
            if out.success() {
                assert!(out.stdout.contains("promoted in cluster"), "{}", out.stdout);
                break;
            }
            // Until the learner has caught up: etcd's refusal, then a retry.
            ensure!(out.stderr.contains("in sync with leader"), "{server:?}: {}", out.stderr);
            ensure!(Instant::now() < deadline, "{server:?}: the learner never caught up");
            std::thread::sleep(Duration::from_millis(300));
        }
        let list = c.etcdctl_ok(&["member", "list"])?;
        ensure!(list.lines().all(|l| l.ends_with("false")), "{server:?}: still a learner: {list}");
        ensure!(etcdctl(&[c.endpoint(four)], &["put", "k2", "v"])?.success(), "{server:?}: the promoted member serves");
    }
    Ok(())
}
