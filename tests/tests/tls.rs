//! TLS on every link, with certificates made at test time: etcdctl against a member beside real
//! etcd 3.4 (client certificates required, refused without one), peers over mutual TLS,
//! `--auto-tls`, a certificate replaced on disk and served without a restart, and a mirror and a
//! gateway speaking mTLS to their upstreams.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use meridian_tests::{
    etcdctl, etcdctl_ok, secondary_flags, Cluster, ClusterOpts, EtcdCluster, GatewayProcess, MirrorProcess, Pair,
    TestCa,
};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// `--cert-file --key-file --trusted-ca-file --client-cert-auth`, as an etcd unit file has them.
fn client_tls_flags(ca: &TestCa, server: &Pair) -> Vec<String> {
    args(&[
        "--cert-file",
        server.cert(),
        "--key-file",
        server.key(),
        "--trusted-ca-file",
        ca.ca(),
        "--client-cert-auth",
    ])
}

/// etcdctl's TLS flags for one client identity.
fn ctl_tls<'a>(ca: &'a str, who: Option<&'a Pair>) -> Vec<&'a str> {
    let mut out = vec!["--cacert", ca];
    if let Some(p) = who {
        out.extend(["--cert", p.cert(), "--key", p.key()]);
    }
    out
}

fn with<'a>(tls: &[&'a str], cmd: &[&'a str]) -> Vec<&'a str> {
    tls.iter().chain(cmd).copied().collect()
}

#[test]
fn etcdctl_over_tls_and_refusals_match_etcd() -> Result<()> {
    let ca = TestCa::new("client CA")?;
    let server = ca.server("server")?;
    let alice = ca.client("alice")?;
    let stranger_ca = TestCa::new("other CA")?;
    let stranger = stranger_ca.client("mallory")?;
    let opts = || ClusterOpts { client_https: true, extra_args: client_tls_flags(&ca, &server), ..Default::default() };
    let etcd = EtcdCluster::start_with(1, opts())?;
    let meridian = Cluster::start(1, opts())?;
    let mut seen = Vec::new();
    for cluster in [&*etcd, &meridian] {
        let eps = cluster.client_urls();
        let good = ctl_tls(ca.ca(), Some(&alice));
        let put = etcdctl_ok(&eps, &with(&good, &["put", "k", "v"]))?;
        let get = etcdctl_ok(&eps, &with(&good, &["get", "k"]))?;
        // A client with no certificate, one from a CA the server does not trust, a server
        // certificate the client does not trust, and plain HTTP to a TLS port: every one fails.
        // (etcdctl retries until its command timeout: 3 s, not the harness's 10.)
        let probe = ["--command-timeout=3s", "get", "k"];
        let no_cert = etcdctl(&eps, &with(&ctl_tls(ca.ca(), None), &probe))?;
        let foreign = etcdctl(&eps, &with(&ctl_tls(ca.ca(), Some(&stranger)), &probe))?;
        let untrusted = etcdctl(&eps, &with(&ctl_tls(stranger_ca.ca(), Some(&alice)), &probe))?;
        let plain = etcdctl(&[cluster.endpoint(1)], &probe)?;
        let refusals: Vec<(bool, bool)> = [&no_cert, &foreign, &untrusted, &plain]
            .iter()
            .map(|o| (o.success(), o.stderr.contains("context deadline exceeded")))
            .collect();
        seen.push((put, get, refusals));
    }
    assert_eq!(seen[0].0.trim(), "OK");
    assert_eq!(seen[0].1, "k\nv\n");
    assert_eq!(seen[1], seen[0], "meridian answers and refuses as etcd does");
    assert!(seen[1].2.iter().all(|(ok, _)| !ok), "{:?}", seen[1].2);
    let log = std::fs::read_to_string(meridian.log_path(1))?;
    assert!(log.contains("rejected connection from \"127.0.0.1:"), "no rejection logged:\n{log}");

    // /health on the client port over https, with a client certificate (curl is etcd's recipe).
    if let Ok(out) = std::process::Command::new("curl")
        .args(["-s", "--cacert", ca.ca(), "--cert", alice.cert(), "--key", alice.key()])
        .arg(format!("{}/health", meridian.client_url(1)))
        .output()
    {
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"health":"true"}"#);
    }
    Ok(())
}

#[test]
fn revoked_client_certificates_are_refused_as_etcd_refuses_them() -> Result<()> {
    let ca = TestCa::new("crl CA")?;
    let server = ca.server("server")?;
    let (alice, mallory, bob) = (ca.client("alice")?, ca.client("mallory")?, ca.client("bob")?);
    let crl = ca.crl("revoked.crl", &[&mallory])?;
    let flags = [client_tls_flags(&ca, &server), args(&["--client-crl-file", &crl])].concat();
    let opts = || ClusterOpts { client_https: true, extra_args: flags.clone(), ..Default::default() };
    let etcd = EtcdCluster::start_with(1, opts())?;
    let meridian = Cluster::start(1, opts())?;
    let probe = ["--command-timeout=3s", "get", "k"];
    let mut seen = Vec::new();
    for cluster in [&*etcd, &meridian] {
        let eps = cluster.client_urls();
        let ok =
            |who: &Pair| -> Result<bool> { Ok(etcdctl(&eps, &with(&ctl_tls(ca.ca(), Some(who)), &probe))?.success()) };
        seen.push((ok(&alice)?, ok(&mallory)?, ok(&bob)?));
    }
    assert_eq!(seen[0], (true, false, true), "etcd");
    assert_eq!(seen[1], seen[0], "meridian, then etcd");
    // The list is re-read when it changes: bob is refused from then on.
    ca.crl("revoked.crl", &[&mallory, &bob])?;
    let eps = meridian.client_urls();
    eventually(
        Duration::from_secs(10),
        || Ok(!etcdctl(&eps, &with(&ctl_tls(ca.ca(), Some(&bob)), &probe))?.success()),
    )?;
    ensure!(etcdctl(&eps, &with(&ctl_tls(ca.ca(), Some(&alice)), &probe))?.success(), "alice is still welcome");
    Ok(())
}

/// Waits until `f` holds, polling every 100 ms, within `limit`.
fn eventually(limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let last = f();
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "not within {limit:?}: {last:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn peers_over_mutual_tls() -> Result<()> {
    let ca = TestCa::new("cluster CA")?;
    let peer = ca.server("peer")?;
    let server = ca.server("server")?;
    let extra = args(&[
        "--peer-cert-file",
        peer.cert(),
        "--peer-key-file",
        peer.key(),
        "--peer-trusted-ca-file",
        ca.ca(),
        "--peer-client-cert-auth",
        "--cert-file",
        server.cert(),
        "--key-file",
        server.key(),
    ]);
    let opts = ClusterOpts { client_https: true, peer_https: true, extra_args: extra, ..ClusterOpts::fast() };
    let mut cluster = Cluster::start(3, opts)?;
    let tls = ctl_tls(ca.ca(), None);
    etcdctl_ok(&cluster.client_urls(), &with(&tls, &["put", "k", "over-tls-peers"]))?;
    for i in 1..=3 {
        eventually(Duration::from_secs(10), || {
            let got = etcdctl_ok(
                &[cluster.client_url(i)],
                &with(&tls, &["get", "k", "--consistency=s", "--print-value-only"]),
            )?;
            Ok(got.trim() == "over-tls-peers")
        })
        .with_context(|| format!("m{i} never applied the write"))?;
    }
    // The leader goes; the others elect one over TLS and take writes, and a lease granted
    // through a follower is kept alive through the leader's https peer URL.
    let leader = (1..=3)
        .find(|&i| {
            etcdctl_ok(&[cluster.client_url(i)], &with(&tls, &["endpoint", "status", "-w", "json"]))
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .is_some_and(|v| v[0]["Status"]["leader"] == v[0]["Status"]["header"]["member_id"])
        })
        .context("no leader")?;
    cluster.kill9(leader)?;
    let rest: Vec<String> = (1..=3).filter(|&i| i != leader).map(|i| cluster.client_url(i)).collect();
    eventually(Duration::from_secs(15), || Ok(etcdctl(&rest, &with(&tls, &["put", "k2", "v2"]))?.success()))?;
    for url in &rest {
        let grant = etcdctl_ok(&[url], &with(&tls, &["lease", "grant", "30"]))?;
        let id = grant.split_whitespace().nth(1).context("lease id")?.to_string();
        let kept = etcdctl_ok(&[url], &with(&tls, &["lease", "keep-alive", "--once", &id]))?;
        ensure!(kept.contains("keepalived with TTL"), "{kept}");
    }
    Ok(())
}

#[test]
fn a_replaced_certificate_is_served_without_a_restart() -> Result<()> {
    let ca = TestCa::new("first CA")?;
    let first = ca.server("server")?;
    let served = Pair { cert: ca.dir().join("served.crt"), key: ca.dir().join("served.key"), serial: 0 };
    std::fs::copy(&first.cert, &served.cert)?;
    std::fs::copy(&first.key, &served.key)?;
    let opts = ClusterOpts {
        client_https: true,
        extra_args: args(&["--cert-file", served.cert(), "--key-file", served.key()]),
        ..ClusterOpts::fast()
    };
    let cluster = Cluster::start(1, opts)?;
    let other_ca = TestCa::new("rotated CA")?;
    let rotated = other_ca.server("server")?;
    let old = ctl_tls(ca.ca(), None);
    let new = ctl_tls(other_ca.ca(), None);
    let eps = cluster.client_urls();
    etcdctl_ok(&eps, &with(&old, &["put", "k", "v"]))?;
    ensure!(!etcdctl(&eps, &with(&new, &["get", "k"]))?.success(), "the new CA is trusted before the rotation");
    // Key first, then the certificate: a check in between sees a pair that does not match,
    // and keeps serving the old one.
    std::fs::copy(&rotated.key, &served.key)?;
    std::fs::copy(&rotated.cert, &served.cert)?;
    eventually(Duration::from_secs(10), || Ok(etcdctl(&eps, &with(&new, &["get", "k"]))?.success()))?;
    ensure!(!etcdctl(&eps, &with(&old, &["get", "k"]))?.success(), "the old certificate is still served");
    let log = std::fs::read_to_string(cluster.log_path(1))?;
    ensure!(log.contains("certificates reloaded"), "{log}");
    Ok(())
}

#[test]
fn auto_tls_on_clients_and_peers() -> Result<()> {
    let opts = ClusterOpts {
        client_https: true,
        peer_https: true,
        extra_args: args(&["--auto-tls", "--peer-auto-tls"]),
        ..ClusterOpts::fast()
    };
    let cluster = Cluster::start(3, opts)?;
    let insecure = ["--insecure-transport=false", "--insecure-skip-tls-verify"];
    etcdctl_ok(&cluster.client_urls(), &with(&insecure, &["put", "auto", "tls"]))?;
    // As etcd, the pair is kept in the data dir: a client can trust it by file.
    let cert = cluster.data_dir(2).join("fixtures/client/cert.pem");
    ensure!(cluster.data_dir(2).join("fixtures/peer/key.pem").exists());
    let cert = cert.to_str().context("path")?;
    eventually(Duration::from_secs(10), || {
        let got = etcdctl_ok(
            &[cluster.client_url(2)],
            &["--cacert", cert, "get", "auto", "--consistency=s", "--print-value-only"],
        )?;
        Ok(got.trim() == "tls")
    })?;
    // Without a way to check the certificate, etcdctl refuses it.
    let trusting_nothing = TestCa::new("unrelated CA")?;
    ensure!(!etcdctl(&[cluster.client_url(1)], &["--cacert", trusting_nothing.ca(), "get", "auto"])?.success());
    Ok(())
}

#[test]
fn mirror_and_gateway_speak_mutual_tls_to_their_upstreams() -> Result<()> {
    let ca = TestCa::new("regions CA")?;
    let server = ca.server("member")?;
    let mirror_id = ca.client("mirror")?;
    let gateway_id = ca.client("gateway")?;
    let alice = ca.client("alice")?;
    let primary = Cluster::start(
        1,
        ClusterOpts {
            client_https: true,
            extra_args: [client_tls_flags(&ca, &server), args(&["--region", "us"])].concat(),
            ..ClusterOpts::fast()
        },
    )?;
    let secondary = Cluster::start(
        1,
        ClusterOpts {
            client_https: true,
            extra_args: [client_tls_flags(&ca, &server), secondary_flags("eu", "us")?].concat(),
            ..ClusterOpts::fast()
        },
    )?;
    let good = ctl_tls(ca.ca(), Some(&alice));
    etcdctl_ok(&primary.client_urls(), &with(&good, &["put", "before", "1"]))?;
    let _mirror = MirrorProcess::start(
        &primary.client_urls(),
        &secondary,
        &["--cacert", ca.ca(), "--cert", mirror_id.cert(), "--key", mirror_id.key()],
    )?;
    etcdctl_ok(&primary.client_urls(), &with(&good, &["put", "after", "2"]))?;
    eventually(Duration::from_secs(15), || {
        let got = etcdctl_ok(
            &secondary.client_urls(),
            &with(&good, &["get", "after", "--consistency=s", "--print-value-only"]),
        )?;
        Ok(got.trim() == "2")
    })
    .context("the mirror never copied over TLS")?;

    // The gateway's own listener is https too; clients need only the CA for it.
    let gw = GatewayProcess::start_https(
        "gw-eu",
        "eu",
        &[("us", primary.client_urls()), ("eu", secondary.client_urls())],
        &[
            "--cacert",
            ca.ca(),
            "--cert",
            gateway_id.cert(),
            "--key",
            gateway_id.key(),
            "--cert-file",
            server.cert(),
            "--key-file",
            server.key(),
        ],
    )?;
    let through = [format!("https://{}", gw.endpoint())];
    let client = ctl_tls(ca.ca(), None);
    etcdctl_ok(&through, &with(&client, &["put", "via", "gateway"]))?;
    let got = etcdctl_ok(&through, &with(&client, &["get", "via", "--print-value-only"]))?;
    ensure!(got.trim() == "gateway", "{got:?}");
    let regions = gw.regions()?;
    ensure!(regions.to_string().contains("\"primary\""), "{regions}");
    // A gateway without a client certificate cannot reach members that require one.
    let blind = GatewayProcess::start_https(
        "gw-blind",
        "eu",
        &[("us", primary.client_urls())],
        &["--cacert", ca.ca(), "--cert-file", server.cert(), "--key-file", server.key()],
    );
    ensure!(blind.is_err(), "a gateway without a certificate became ready");
    Ok(())
}

/// The flags of a cluster whose peers speak mutual TLS with `peer`'s pair, plus `more`.
fn peer_tls_flags(ca: &TestCa, peer: &Pair, more: &[&str]) -> Vec<String> {
    let base = ["--peer-cert-file", peer.cert(), "--peer-key-file", peer.key(), "--peer-trusted-ca-file", ca.ca()];
    args(&[&base[..], &["--peer-client-cert-auth"], more].concat())
}

/// Whether a cluster of `server` forms with `flags` within a few seconds, and what the first
/// member logged.
fn forms(server: meridian_tests::Server, flags: Vec<String>) -> Result<(bool, String)> {
    let opts = ClusterOpts {
        peer_https: true,
        extra_args: flags,
        ready_timeout: Duration::from_secs(6),
        ..ClusterOpts::fast()
    };
    match Cluster::start_server(server, 3, opts) {
        Ok(cluster) => {
            ensure!(cluster.etcdctl_ok(&["put", "k", "v"])?.trim() == "OK", "a formed cluster takes writes");
            Ok((true, std::fs::read_to_string(cluster.log_path(1))?))
        }
        Err(e) => Ok((false, format!("{e:#}"))),
    }
}

/// `--peer-cert-allowed-cn` and `--peer-cert-allowed-hostname`, beside etcd: a cluster whose
/// peers' certificates match forms; one that asks for another CN never does, and says why.
#[test]
fn peer_certificate_names_are_checked_as_etcd_checks_them() -> Result<()> {
    use meridian_tests::Server::{Etcd, Meridian};
    let ca = TestCa::new("names CA")?;
    let peer = ca.server("member-peer")?;
    for server in [Etcd, Meridian] {
        for ok in [["--peer-cert-allowed-cn", "member-peer"], ["--peer-cert-allowed-hostname", "localhost"]] {
            let (formed, log) = forms(server, peer_tls_flags(&ca, &peer, &ok))?;
            ensure!(formed, "{server:?} with {ok:?} did not form: {log}");
        }
        let (formed, log) = forms(server, peer_tls_flags(&ca, &peer, &["--peer-cert-allowed-cn", "someone-else"]))?;
        ensure!(!formed, "{server:?} formed with peers whose CN is not the allowed one");
        if server == Meridian {
            ensure!(log.contains("CommonName authentication failed"), "the refusal is not logged: {log}");
        }
    }
    // Both at once is refused at startup, with etcd's message.
    let both = peer_tls_flags(&ca, &peer, &["--peer-cert-allowed-cn", "a", "--peer-cert-allowed-hostname", "b"]);
    let dir = tempfile::tempdir()?;
    let out = std::process::Command::new(meridian_tests::meridian_bin()?)
        .current_dir(dir.path())
        .arg("node")
        .args(["--listen-peer-urls", "https://127.0.0.1:0"])
        .args(&both)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("AllowedCN and AllowedHostname are mutually exclusive"),
        "{stderr}"
    );
    Ok(())
}

/// `--client-cert-allowed-hostname` beside etcd: a client certificate valid for the host name is
/// served, one without it is refused; and `--cipher-suites` takes Go's names, refusing a name
/// it does not know with etcd's message.
#[test]
fn client_certificate_hostname_and_cipher_suites_match_etcd() -> Result<()> {
    let ca = TestCa::new("hostname CA")?;
    let server = ca.server("server")?;
    // A server pair carries SANs 127.0.0.1 and localhost and may act as a client; alice has none.
    let (with_san, alice) = (ca.server("with-san")?, ca.client("alice")?);
    let flags = [
        client_tls_flags(&ca, &server),
        args(&["--client-cert-allowed-hostname", "localhost"]),
        args(&["--cipher-suites", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305"]),
    ]
    .concat();
    let opts = || ClusterOpts { client_https: true, extra_args: flags.clone(), ..Default::default() };
    let etcd = EtcdCluster::start_with(1, opts())?;
    let meridian = Cluster::start(1, opts())?;
    let probe = ["--command-timeout=3s", "put", "k", "v"];
    let mut seen = Vec::new();
    for cluster in [&*etcd, &meridian] {
        let eps = cluster.client_urls();
        let ok =
            |who: &Pair| -> Result<bool> { Ok(etcdctl(&eps, &with(&ctl_tls(ca.ca(), Some(who)), &probe))?.success()) };
        seen.push((ok(&with_san)?, ok(&alice)?));
    }
    assert_eq!(seen[0], (true, false), "etcd");
    assert_eq!(seen[1], seen[0], "meridian, then etcd");
    let log = std::fs::read_to_string(meridian.log_path(1))?;
    assert!(log.contains("HostName authentication failed"), "{log}");

    let dir = tempfile::tempdir()?;
    for bin in [meridian_tests::etcd_bin()?, meridian_tests::meridian_bin()?] {
        let mut cmd = std::process::Command::new(&bin);
        if bin.ends_with("meridian") {
            cmd.arg("node");
        }
        let out = cmd.current_dir(dir.path()).args(["--cipher-suites", "TLS_NOT_A_SUITE"]).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bin:?} started");
        assert!(stderr.contains(r#"unexpected TLS cipher suite "TLS_NOT_A_SUITE""#), "{bin:?}: {stderr}");
    }
    Ok(())
}
