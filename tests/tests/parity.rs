//! Parity with etcd 3.4: the same etcdctl session runs against a fresh real
//! etcd and a fresh 3-member Meridian cluster, and every command must print
//! the same thing and exit the same way. Only what differs by nature is
//! normalized: cluster/member ids, raft terms, and etcdctl's own log lines.
//!
//! Revisions are compared as they are: they must match exactly.

use meridian_tests::{etcdctl_with_input, mask_ids, Cluster, ClusterOpts, CtlOutput, EtcdCluster};

/// One etcdctl invocation: arguments, and optional stdin (for `txn`).
type Step = (&'static [&'static str], Option<&'static str>);

const SESSION: &[Step] = &[
    // Puts, versions, prev-kv.
    (&["put", "d1", "v1"], None),
    (&["put", "d1", "v2", "--prev-kv"], None),
    (&["put", "d2", "v1", "-w", "json"], None),
    (&["put", "d1", "v3", "--prev-kv", "-w", "json"], None),
    (&["get", "d1", "-w", "json"], None),
    (&["get", "d1"], None),
    // Ranges: prefix, limit and more, count-only, keys-only, sorting, from-key.
    (&["put", "e1", "c"], None),
    (&["put", "e2", "a"], None),
    (&["put", "e3", "b"], None),
    (&["get", "d", "--prefix", "-w", "json"], None),
    (&["get", "e", "--prefix", "--limit", "2", "-w", "json"], None),
    (&["get", "e", "--prefix", "--count-only", "-w", "json"], None),
    (&["get", "e", "--prefix", "--keys-only"], None),
    (&["get", "e", "--prefix", "--sort-by=VALUE"], None),
    (&["get", "e", "--prefix", "--sort-by=MODIFY", "--order=DESCEND"], None),
    (&["get", "e", "--prefix", "--sort-by=CREATE", "--order=ASCEND", "--limit", "2", "-w", "json"], None),
    (&["get", "e", "--prefix", "--sort-by=VERSION", "-w", "json"], None),
    (&["get", "", "--from-key", "-w", "json"], None),
    (&["get", "e2", "--from-key", "--keys-only"], None),
    (&["get", "e1", "e3", "-w", "json"], None),
    (&["get", "e3", "e1", "-w", "json"], None),
    (&["get", "e", "--prefix", "--rev=6", "-w", "json"], None),
    (&["get", "e", "--prefix", "--max-mod-revision=7", "-w", "json"], None),
    (&["get", "e", "--prefix", "--min-mod-revision=8", "-w", "json"], None),
    (&["get", "e", "--prefix", "--min-create-revision=8", "--max-create-revision=8", "-w", "json"], None),
    (&["get", "d1", "--consistency=s", "-w", "json"], None),
    (&["get", "missing", "-w", "json"], None),
    // Deletes.
    (&["del", "d2", "--prev-kv", "-w", "json"], None),
    (&["del", "nothing", "-w", "json"], None),
    (&["del", "e", "--prefix"], None),
    (&["del", "a", "--from-key", "-w", "json"], None),
    (&["put", "f1", "x"], None),
    (&["put", "f1", "y"], None),
    // ignore-value / ignore-lease.
    (&["put", "f1", "--ignore-value", "-w", "json"], None),
    (&["get", "f1", "-w", "json"], None),
    (&["put", "f1", "--ignore-lease", "z", "-w", "json"], None),
    // Txns: success and failure branches, compares of every kind.
    (&["txn", "-w", "json"], Some("mod(\"zz\") = \"0\"\n\nput t1 1\nput t2 2\n\nget t1\n\n")),
    (&["txn", "-w", "json"], Some("version(\"t1\") = \"1\"\n\nget t --prefix\ndel t1\n\nput t3 x\n\n")),
    (&["txn", "-w", "json"], Some("value(\"t2\") = \"2\"\n\nput t4 1\nget t4\n\n\n")),
    (&["txn", "-w", "json"], Some("value(\"t2\") > \"5\"\n\nput t5 1\n\nget t2\nput t6 6\n\n")),
    (&["txn", "-w", "json"], Some("create(\"t2\") < \"100\"\nmod(\"t4\") > \"0\"\n\nget t --prefix --keys-only\n\n\n")),
    (&["txn"], Some("version(\"t2\") != \"1\"\n\nput t7 1\n\nput t8 1\n\n")),
    (&["txn"], Some("value(\"nope\") = \"\"\n\nput t9 1\n\nput t10 1\n\n")),
    // Errors.
    (&["put", "", "v"], None),
    (&["get", ""], None),
    (&["get", "d1", "--rev=1000"], None),
    (&["put", "f1", "v", "--ignore-value"], None),
    (&["put", "nokey", "--ignore-value"], None),
    (&["put", "leased", "v", "--lease=1234"], None),
    (&["txn"], Some("\nput t11 1\nput t12 1 --lease=1234\n\n\n")),
    (&["txn"], Some("\nput dup 1\nput dup 2\n\n\n")),
    (&["txn"], Some("\ndel k a\nput b 1\n\n\n")),
    // Compaction.
    (&["compact", "1000"], None),
    (&["compact", "5"], None),
    (&["compact", "5"], None),
    (&["compact", "3"], None),
    (&["get", "d1", "--rev=4", "-w", "json"], None),
    (&["get", "d1", "--rev=5", "-w", "json"], None),
    (&["get", "d1", "--rev=6", "-w", "json"], None),
    (&["compact", "12", "--physical"], None),
    (&["get", "", "--from-key", "-w", "json"], None),
    (&["put", "after-compact", "1", "-w", "json"], None),
];

/// What a user sees of one command, with the inherently different parts masked.
fn observed(out: &CtlOutput) -> String {
    // etcdctl logs its retries as JSON lines on stderr; the user-facing part is "Error: ...".
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("Error:")).collect();
    format!("exit={} stdout={} stderr={}", out.status.code().unwrap_or(-1), mask_ids(&out.stdout), errors.join("\n"))
}

#[test]
fn etcdctl_session_matches_etcd() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let meridian = Cluster::start(3, ClusterOpts::fast())?;
    let mut mismatches = Vec::new();
    for (args, input) in SESSION {
        let run = |c: &Cluster| -> anyhow::Result<CtlOutput> {
            match input {
                Some(stdin) => etcdctl_with_input(&c.endpoints(), args, stdin),
                None => c.etcdctl(args),
            }
        };
        let want = observed(&run(&etcd)?);
        let got = observed(&run(&meridian)?);
        if want != got {
            mismatches.push(format!("etcdctl {}\n  etcd:     {want}\n  meridian: {got}", args.join(" ")));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} commands differ:\n{}",
        mismatches.len(),
        SESSION.len(),
        mismatches.join("\n")
    );
    // The same history hashes the same: HashKV at every revision, compacted ones included.
    assert_eq!(hashes(&meridian)?, hashes(&etcd)?);
    Ok(())
}

/// The same session through a gateway, in front of a 3-member primary and a secondary with its
/// mirror (the gateway in the secondary's region), prints what etcd prints: linearizable reads
/// served by the secondary after a read index, writes, errors and compactions on the primary.
/// `--max-staleness 0s`, because every etcdctl command is a new connection: serializable reads
/// go to the primary, as on a one-region etcd (bounded reads are tested in `gateway.rs`).
#[test]
fn etcdctl_session_through_a_gateway_matches_etcd() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let primary = Cluster::start(
        3,
        ClusterOpts { extra_args: ["--region", "us-east"].map(String::from).to_vec(), ..ClusterOpts::fast() },
    )?;
    let secondary = Cluster::start(
        1,
        ClusterOpts { extra_args: meridian_tests::secondary_flags("eu-west", "us-east")?, ..ClusterOpts::fast() },
    )?;
    let _mirror = meridian_tests::MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    let gateway = meridian_tests::GatewayProcess::start(
        "gw",
        "eu-west",
        &[("us-east", primary.endpoints()), ("eu-west", secondary.endpoints())],
        &["--max-staleness", "0s"],
    )?;
    let gw = [gateway.endpoint()];
    let mut mismatches = Vec::new();
    for (args, input) in SESSION {
        let want = observed(&match input {
            Some(stdin) => etcdctl_with_input(&etcd.endpoints(), args, stdin)?,
            None => etcd.etcdctl(args)?,
        });
        let got = observed(&match input {
            Some(stdin) => etcdctl_with_input(&gw, args, stdin)?,
            None => meridian_tests::etcdctl(&gw, args)?,
        });
        if want != got {
            mismatches.push(format!("etcdctl {}\n  etcd:    {want}\n  gateway: {got}", args.join(" ")));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} commands differ:\n{}",
        mismatches.len(),
        SESSION.len(),
        mismatches.join("\n")
    );
    Ok(())
}

/// `etcdctl endpoint hashkv --rev=R` for every revision up to the current
/// one: the first endpoint's hash and compact revision, or the error.
fn hashes(c: &Cluster) -> anyhow::Result<Vec<String>> {
    let head: serde_json::Value = serde_json::from_str(&c.etcdctl_ok(&["get", "x", "-w", "json"])?)?;
    let current = head["header"]["revision"].as_i64().expect("revision");
    let mut out = Vec::new();
    for rev in 1..=current {
        let r = c.etcdctl(&["endpoint", "hashkv", &format!("--rev={rev}"), "-w", "json"])?;
        out.push(if r.success() {
            let v: serde_json::Value = serde_json::from_str(&r.stdout)?;
            format!("rev {rev}: hash {} compact {}", v[0]["HashKV"]["hash"], v[0]["HashKV"]["compact_revision"])
        } else {
            format!("rev {rev}: {}", observed(&r))
        });
    }
    Ok(out)
}

/// Every member answers identically, so a client may talk to any of them.
#[test]
fn every_member_serves_the_same_answers() -> anyhow::Result<()> {
    let meridian = Cluster::start(3, ClusterOpts::fast())?;
    meridian.etcdctl_ok(&["put", "k", "v"])?;
    let mut seen = Vec::new();
    for i in 1..=3 {
        let out = meridian_tests::etcdctl_ok(&[meridian.endpoint(i)], &["get", "k", "--consistency=l", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        seen.push((v["kvs"].clone(), v["header"]["revision"].clone(), v["header"]["cluster_id"].clone()));
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
    let out = meridian.etcdctl_ok(&["endpoint", "hashkv", "--cluster"])?;
    let hashes: Vec<&str> = out.lines().filter_map(|l| l.split(", ").nth(1)).collect();
    assert_eq!(hashes.len(), 3, "{out}");
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{out}");
    // --cluster dials the advertised client URLs, as etcd's Go client does
    // (with the scheme in the HTTP/2 authority).
    let out = meridian.etcdctl_ok(&["endpoint", "status", "--cluster"])?;
    assert_eq!(out.lines().count(), 3, "{out}");
    let out = meridian.etcdctl(&["endpoint", "health", "--cluster"])?;
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(out.success(), "{text}");
    assert_eq!(text.lines().filter(|l| l.contains("is healthy")).count(), 3, "{text}");
    Ok(())
}

/// `--auto-compaction-retention` (periodic mode, etcd's default) compacts a
/// window behind on both, with the same error for a read below it.
#[test]
fn periodic_auto_compaction_matches_etcd() -> anyhow::Result<()> {
    let flags = ["--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1s"].map(String::from).to_vec();
    let etcd = EtcdCluster::start_with(1, ClusterOpts { extra_args: flags.clone(), ..ClusterOpts::fast() })?;
    let meridian = Cluster::start(3, ClusterOpts { extra_args: flags, ..ClusterOpts::fast() })?;
    for c in [&etcd, &meridian] {
        for i in 0..5 {
            c.etcdctl_ok(&["put", "k", &i.to_string()])?;
        }
    }
    let compacted = |c: &Cluster| -> anyhow::Result<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let out = observed(&c.etcdctl(&["get", "k", "--rev=2"])?);
            if out.contains("compacted") || std::time::Instant::now() > deadline {
                return Ok(out);
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    let want = compacted(&etcd)?;
    assert!(want.contains("required revision has been compacted"), "{want}");
    assert_eq!(compacted(&meridian)?, want);
    // The newest revision stays readable.
    assert_eq!(meridian.etcdctl_ok(&["get", "k", "--print-value-only"])?.trim(), "4");
    Ok(())
}

/// `etcdctl move-leader` hands leadership to a chosen member, as on etcd;
/// a non-member and a call to a follower get etcd's errors.
#[tokio::test]
async fn move_leader_matches_etcd() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3)?;
    let meridian = Cluster::start(3, ClusterOpts::fast())?;
    let mut bogus = Vec::new();
    let mut from_follower = Vec::new();
    for c in [&etcd as &Cluster, &meridian] {
        let leader = c.leader().await?;
        let follower = (1..=3).find(|&i| i != leader).expect("three members");
        let id = |i: usize| async move {
            let status = c.member_client(i).await?.status().await?;
            anyhow::Ok(status.header().expect("header").member_id())
        };
        let (from, to) = (id(leader).await?, id(follower).await?);
        let out = c.etcdctl_ok(&["move-leader", &format!("{to:x}")])?;
        assert_eq!(out, format!("Leadership transferred from {from:x} to {to:x}\n"));
        assert_eq!(c.leader().await?, follower, "the chosen member leads");
        bogus.push(observed(&c.etcdctl(&["move-leader", "1234"])?));
        // A member that does not lead refuses (etcdctl itself always finds the leader).
        let err = c.member_client(leader).await?.move_leader(to).await.expect_err("not the leader");
        from_follower.push(match err {
            etcd_client::Error::GRpcStatus(s) => format!("{:?} {}", s.code(), s.message()),
            other => format!("{other}"),
        });
    }
    assert_eq!(bogus[1], bogus[0]);
    assert!(bogus[0].contains("bad leader transferee"), "{}", bogus[0]);
    assert_eq!(from_follower[1], from_follower[0]);
    assert_eq!(from_follower[0], "FailedPrecondition etcdserver: not leader");
    Ok(())
}
