//! Auth beside etcd 3.4: the same etcdctl session (users, roles, permissions on a key, a prefix,
//! a range and from a key; then every operation by every user) runs against a real etcd and a
//! Meridian member and prints the same thing; and, on three members of each, a token handed out
//! by one member is taken at once by the others, a watch outside the user's permissions is
//! refused as etcd refuses it, and users and roles outlive a restart.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use meridian_proto::etcdserverpb::auth_client::AuthClient;
use meridian_proto::etcdserverpb::kv_client::KvClient;
use meridian_proto::etcdserverpb::watch_client::WatchClient;
use meridian_proto::etcdserverpb::watch_request::RequestUnion;
use meridian_proto::etcdserverpb::{
    AuthenticateRequest, PutRequest, RangeRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};
use meridian_tests::{
    assert_same_steps, etcdctl, etcdctl_with_input, etcdctl_with_timeout, http_post_with, mask_hex_ids, Cluster,
    ClusterOpts, Server,
};

/// A fast cluster whose password hashes are cheap (`--bcrypt-cost 4`, which etcd takes too):
/// every etcdctl call with `--user` checks a password, and the default cost makes a session of
/// hundreds of them spend most of its time in bcrypt.
fn opts(extra: Vec<String>) -> ClusterOpts {
    let mut extra_args = vec!["--bcrypt-cost=4".to_string()];
    extra_args.extend(extra);
    ClusterOpts { extra_args, ..ClusterOpts::fast() }
}

/// What etcdctl printed, comparable across servers: the exit, stdout, and the `Error:` lines,
/// with ids masked and the member's address named.
fn run_as(c: &Cluster, user: Option<&str>, args: &[&str], input: &str) -> Result<String> {
    let mut all: Vec<String> = user.map(|u| format!("--user={u}")).into_iter().collect();
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = etcdctl_with_input(&[c.endpoint(1)], &all, input)?;
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("Error:")).collect();
    let text = format!(
        "$ etcdctl {}\nexit={}\n{}{}",
        all.join(" "),
        out.status.code().unwrap_or(-1),
        out.stdout,
        errors.join("\n")
    );
    Ok(mask_hex_ids(&text).replace(&c.endpoint(1), "<member>"))
}

/// Runs each etcdctl command against `eps`; each must succeed.
fn etcdctl_each(eps: &[String], commands: &[&[&str]]) -> Result<()> {
    for args in commands {
        let out = etcdctl(eps, args)?;
        ensure!(out.success(), "etcdctl {args:?}: {}", out.stderr);
    }
    Ok(())
}

/// root, and alice with READWRITE over `app/`; then auth on.
const ALICE_OWNS_APP: &[&[&str]] = &[
    &["user", "add", "root:rootpw"],
    &["user", "grant-role", "root", "root"],
    &["user", "add", "alice:apw"],
    &["role", "add", "reader"],
    &["role", "grant-permission", "reader", "readwrite", "app/", "--prefix"],
    &["user", "grant-role", "alice", "reader"],
    &["auth", "enable"],
];

/// The users of the matrix, as `--user` takes them (`None`: no credentials).
const USERS: [Option<&str>; 8] = [
    Some("root:rootpw"),
    Some("alice:apw"),
    Some("bob:bpw"),
    Some("carol:cpw"),
    Some("dave:dpw"),
    Some("erin:epw"),
    Some("alice:wrong"),
    None,
];

/// Every operation of the matrix, for one user. Writes leave the store as they found it (or
/// change it the same way on both servers), so every user meets the same keys.
fn operations(c: &Cluster, user: Option<&str>, dir: &std::path::Path) -> Result<Vec<String>> {
    let snapshot = dir.join("snap.db");
    let snapshot = snapshot.to_str().context("path")?;
    let txn = "value(\"app/x\") = \"1\"\n\nput cfg from-txn\n\nput m2 from-txn\n";
    let mut seen = Vec::new();
    for (args, input) in [
        (vec!["get", "app/x"], ""),
        (vec!["get", "app/", "--prefix"], ""),
        (vec!["get", "", "--prefix", "--keys-only"], ""),
        (vec!["get", "k1"], ""),
        (vec!["get", "k2"], ""),
        (vec!["put", "app/x", "1"], ""),
        (vec!["put", "cfg", "2"], ""),
        (vec!["put", "cfg", "3", "--prev-kv"], ""),
        (vec!["get", "cfg"], ""),
        (vec!["get", "m", "n"], ""),
        (vec!["put", "m1", "2"], ""),
        (vec!["del", "m1", "--prev-kv"], ""),
        (vec!["put", "m1", "1"], ""),
        (vec!["get", "z9"], ""),
        (vec!["get", "z", "--from-key"], ""),
        (vec!["put", "zz", "1"], ""),
        (vec!["del", "zz"], ""),
        (vec!["txn"], txn),
        (vec!["user", "get", "alice"], ""),
        (vec!["user", "get", "bob"], ""),
        (vec!["role", "get", "reader"], ""),
        (vec!["user", "list"], ""),
        (vec!["role", "list"], ""),
        (vec!["snapshot", "save", snapshot], ""),
        (vec!["defrag"], ""),
        (vec!["lock", "app/lock", "true"], ""),
    ] {
        seen.push(run_as(c, user, &args, input)?.replace(snapshot, "<file>"));
    }
    // A watch: refused at once outside the user's permissions, or open until stopped.
    let mut watch: Vec<String> = user.map(|u| format!("--user={u}")).into_iter().collect();
    watch.extend(["watch".to_string(), "k1".to_string()]);
    let watch: Vec<&str> = watch.iter().map(String::as_str).collect();
    seen.push(format!(
        "$ etcdctl {}\n{}",
        watch.join(" "),
        etcdctl_with_timeout(&[c.endpoint(1)], &watch, Duration::from_millis(1500))?
    ));
    Ok(seen)
}

/// The session; what each step printed, in order.
fn session(server: Server) -> Result<Vec<String>> {
    let c = Cluster::start_server(server, 1, opts(Vec::new()))?;
    let dir = tempfile::tempdir()?;
    let mut seen = Vec::new();
    let root = Some("root:rootpw");
    for (args, input) in [
        (vec!["user", "add", "root:rootpw"], ""),
        (vec!["auth", "enable"], ""),
        (vec!["user", "add", "alice:apw"], ""),
        (vec!["user", "add", "bob:bpw"], ""),
        (vec!["user", "add", "carol:cpw"], ""),
        (vec!["user", "add", "dave:dpw"], ""),
        (vec!["user", "add", "erin:epw"], ""),
        (vec!["user", "add", "nopw", "--no-password"], ""),
        (vec!["role", "add", "reader"], ""),
        (vec!["role", "grant-permission", "reader", "read", "app/", "--prefix"], ""),
        (vec!["role", "grant-permission", "reader", "read", "k1"], ""),
        (vec!["role", "add", "writer"], ""),
        (vec!["role", "grant-permission", "writer", "write", "cfg"], ""),
        (vec!["role", "grant-permission", "writer", "readwrite", "m", "n"], ""),
        (vec!["role", "add", "tail"], ""),
        (vec!["role", "grant-permission", "tail", "readwrite", "z", "--from-key"], ""),
        (vec!["role", "grant-permission", "tail", "read", "app/lock", "--prefix"], ""),
        (vec!["role", "grant-permission", "tail", "write", "app/lock", "--prefix"], ""),
        (vec!["user", "grant-role", "alice", "reader"], ""),
        (vec!["user", "grant-role", "bob", "writer"], ""),
        (vec!["user", "grant-role", "carol", "reader"], ""),
        (vec!["user", "grant-role", "carol", "writer"], ""),
        (vec!["user", "grant-role", "carol", "writer"], ""),
        (vec!["user", "grant-role", "erin", "tail"], ""),
        (vec!["put", "app/x", "1"], ""),
        (vec!["put", "cfg", "1"], ""),
        (vec!["put", "m1", "1"], ""),
        (vec!["put", "z9", "1"], ""),
        (vec!["put", "k1", "1"], ""),
        (vec!["role", "get", "reader"], ""),
        (vec!["role", "get", "writer"], ""),
        (vec!["role", "get", "tail"], ""),
        (vec!["role", "get", "root"], ""),
        (vec!["user", "get", "carol", "--detail"], ""),
        (vec!["user", "list"], ""),
        (vec!["role", "list"], ""),
    ] {
        seen.push(run_as(&c, root, &args, input)?);
    }
    for user in USERS {
        for out in operations(&c, user, dir.path())? {
            seen.push(out);
        }
    }
    // The refusals of auth management, and changes that take effect at once.
    for (user, args, input) in [
        (root, vec!["user", "delete", "root"], ""),
        (root, vec!["user", "revoke-role", "root", "root"], ""),
        (root, vec!["role", "delete", "root"], ""),
        (root, vec!["user", "add", "alice:again"], ""),
        (root, vec!["role", "add", "reader"], ""),
        (root, vec!["user", "grant-role", "alice", "nosuch"], ""),
        (root, vec!["user", "revoke-role", "alice", "writer"], ""),
        (root, vec!["role", "revoke-permission", "reader", "nokey"], ""),
        (root, vec!["user", "get", "nosuch"], ""),
        (Some("nopw:x"), vec!["get", "k1"], ""),
        (Some("alice:apw"), vec!["auth", "disable"], ""),
        (Some("alice:apw"), vec!["user", "add", "mallory:m"], ""),
        (root, vec!["user", "passwd", "alice", "--interactive=false"], "newpw\n"),
        (Some("alice:apw"), vec!["get", "k1"], ""),
        (Some("alice:newpw"), vec!["get", "k1"], ""),
        (root, vec!["role", "revoke-permission", "reader", "k1"], ""),
        (Some("alice:newpw"), vec!["get", "k1"], ""),
        (root, vec!["role", "revoke-permission", "reader", "app/", "--prefix"], ""),
        (root, vec!["user", "revoke-role", "carol", "writer"], ""),
        (Some("carol:cpw"), vec!["put", "cfg", "4"], ""),
        (root, vec!["role", "delete", "writer"], ""),
        (root, vec!["user", "get", "bob"], ""),
        (Some("bob:bpw"), vec!["put", "cfg", "5"], ""),
        (root, vec!["user", "delete", "bob"], ""),
        (Some("bob:bpw"), vec!["get", "cfg"], ""),
        (root, vec!["auth", "disable"], ""),
        (None, vec!["get", "cfg"], ""),
        (Some("alice:wrong"), vec!["get", "cfg"], ""),
        (None, vec!["auth", "enable"], ""),
        (None, vec!["get", "cfg"], ""),
    ] {
        seen.push(run_as(&c, user, &args, input)?);
    }
    // etcd's JSON gateway: a token from /v3/auth/authenticate in the Authorization header.
    let addr = c.endpoint(1).parse()?;
    let (code, body) = http_post_with(addr, "/v3/kv/range", &[], r#"{"key":"Y2Zn"}"#)?;
    seen.push(format!("POST /v3/kv/range without a token: {code} {body}"));
    let (code, body) = http_post_with(addr, "/v3/auth/authenticate", &[], r#"{"name":"root","password":"rootpw"}"#)?;
    let token: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("{code} {body}"))?;
    let token = token["token"].as_str().with_context(|| format!("no token: {body}"))?.to_string();
    let (code, body) = http_post_with(addr, "/v3/kv/range", &[("Authorization", &token)], r#"{"key":"Y2Zn"}"#)?;
    seen.push(format!("POST /v3/kv/range with root's token: {code} value {}", body.contains("\"value\":\"Mw==\"")));
    let (code, body) = http_post_with(addr, "/v3/auth/user/list", &[("Authorization", "nosuchtoken.1")], "{}")?;
    seen.push(format!("POST /v3/auth/user/list with a bad token: {code} {body}"));
    Ok(seen)
}

#[test]
fn etcdctl_auth_session_prints_what_etcd_prints() -> Result<()> {
    let etcd = session(Server::Etcd)?;
    let meridian = session(Server::Meridian)?;
    // The session checks something: each refusal showed, and permitted reads saw values.
    let expected = [
        "etcdserver: permission denied",
        "etcdserver: user name is empty",
        "etcdserver: authentication failed, invalid user ID or password",
        "etcdserver: invalid auth management",
        "auth: permission denied",
        "auth: authentication failed, password was given for no password user",
        "watch was canceled (rpc error: code = PermissionDenied desc = etcdserver: permission denied)",
        "Snapshot saved at <file>",
        "Permission of key k1 is revoked from role reader",
        "\"code\":16",
    ];
    assert_same_steps(&etcd, &meridian, &expected);
    Ok(())
}

fn with_token<T>(msg: T, token: &str) -> Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("token", token.parse()?);
    Ok(req)
}

async fn authenticate(url: String, name: &str, password: &str) -> Result<String> {
    let mut auth = AuthClient::connect(url).await?;
    let req = AuthenticateRequest { name: name.into(), password: password.into() };
    Ok(auth.authenticate(req).await?.into_inner().token)
}

/// The first answer of a watch on `key` with `token`.
async fn first_watch_answer(url: String, token: &str, key: &str) -> Result<WatchResponse> {
    let mut watch = WatchClient::connect(url).await?;
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest { key: key.into(), ..Default::default() })),
    };
    let mut stream = watch.watch(with_token(tokio_stream::once(create), token)?).await?.into_inner();
    let answer = tokio::time::timeout(Duration::from_secs(5), stream.message()).await??;
    answer.context("the watch stream ended")
}

/// On three members: a token is taken by every member at once; a watch is checked as etcd
/// checks it; users, roles and grants outlive a restart of every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_work_on_every_member_and_auth_outlives_a_restart() -> Result<()> {
    for server in [Server::Etcd, Server::Meridian] {
        let mut c = Cluster::start_server(server, 3, opts(Vec::new()))?;
        let eps = [c.endpoint(1)];
        etcdctl_each(&eps, ALICE_OWNS_APP)?;
        for round in ["before", "after"] {
            let token = authenticate(c.client_url(1), "alice", "apw").await?;
            for i in [3, 2] {
                let mut kv = KvClient::connect(c.client_url(i)).await?;
                let put = PutRequest { key: format!("app/{i}").into(), value: b"v".to_vec(), ..Default::default() };
                kv.put(with_token(put, &token)?).await.with_context(|| format!("{server:?} {round}: put at m{i}"))?;
                let denied =
                    kv.put(with_token(PutRequest { key: b"other".to_vec(), ..Default::default() }, &token)?).await;
                ensure!(
                    denied.as_ref().is_err_and(|s| s.code() == tonic::Code::PermissionDenied),
                    "{server:?} {round}: {denied:?}"
                );
                let got = kv
                    .range(with_token(RangeRequest { key: format!("app/{i}").into(), ..Default::default() }, &token)?)
                    .await?;
                ensure!(got.into_inner().kvs.len() == 1, "{server:?} {round}: app/{i} not read back at m{i}");
            }
            let bad = KvClient::connect(c.client_url(2))
                .await?
                .range(with_token(RangeRequest { key: b"app/3".to_vec(), ..Default::default() }, "nosuch.1")?)
                .await;
            ensure!(
                bad.as_ref().is_err_and(
                    |s| s.code() == tonic::Code::Unauthenticated && s.message() == "etcdserver: invalid auth token"
                ),
                "{server:?}: {bad:?}"
            );
            let ok = first_watch_answer(c.client_url(2), &token, "app/3").await?;
            ensure!(ok.created && !ok.canceled, "{server:?} {round}: {ok:?}");
            let refused = first_watch_answer(c.client_url(3), &token, "other").await?;
            ensure!(
                refused.created
                    && refused.canceled
                    && refused.watch_id == -1
                    && refused.cancel_reason
                        == "rpc error: code = PermissionDenied desc = etcdserver: permission denied",
                "{server:?} {round}: {refused:?}"
            );
            if round == "before" {
                c.restart_all()?;
            }
        }
        let out = etcdctl(&eps, &["--user=root:rootpw", "role", "get", "reader"])?;
        ensure!(out.stdout.contains("[app/, app0) (prefix app/)"), "{server:?}: {}", out.stdout);
    }
    Ok(())
}

/// The claims of a JWT (its middle part, base64url), as JSON.
fn claims(token: &str) -> Result<serde_json::Value> {
    use base64::Engine;
    let body = token.split('.').nth(1).context("not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(body)?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// `--auth-token jwt,...` with RS256 keys (tests/data/jwt), on three members of each server: a
/// token signed by one member is taken by another, carries etcd's claims at the same auth
/// revision, goes stale for KV calls (not for root's) once the auth store changes, is refused
/// when tampered with, and outlives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_behave_as_etcds() -> Result<()> {
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/jwt");
    let flag = format!(
        "--auth-token=jwt,pub-key={},priv-key={},sign-method=RS256,ttl=10m",
        keys.join("rs256.pub").display(),
        keys.join("rs256.key").display()
    );
    let mut revisions = Vec::new();
    for server in [Server::Etcd, Server::Meridian] {
        let mut c = Cluster::start_server(server, 3, opts(vec![flag.clone()]))?;
        let eps = [c.endpoint(1)];
        etcdctl_each(&eps, ALICE_OWNS_APP)?;
        let token = authenticate(c.client_url(1), "alice", "apw").await?;
        let claimed = claims(&token)?;
        ensure!(claimed["username"] == "alice" && claimed["exp"].is_u64(), "{server:?}: {claimed}");
        revisions.push(claimed["revision"].clone());
        let mut kv = KvClient::connect(c.client_url(2)).await?;
        let put = || PutRequest { key: b"app/1".to_vec(), value: b"v".to_vec(), ..Default::default() };
        kv.put(with_token(put(), &token)?).await.with_context(|| format!("{server:?}: put at m2"))?;
        let mut tampered = token.clone();
        tampered.pop();
        let bad = kv.put(with_token(put(), &tampered)?).await;
        ensure!(bad.as_ref().is_err_and(|s| s.code() == tonic::Code::Unauthenticated), "{server:?}: {bad:?}");

        // The token outlives a restart of every member.
        c.restart_all()?;
        let mut kv = KvClient::connect(c.client_url(3)).await?;
        kv.put(with_token(put(), &token)?).await.with_context(|| format!("{server:?}: put after a restart"))?;

        // Any change to the auth store makes it stale for KV calls; root's own stale token
        // still manages auth.
        let root = authenticate(c.client_url(1), "root", "rootpw").await?;
        let out = etcdctl(&eps, &["--user=root:rootpw", "role", "add", "other"])?;
        ensure!(out.success(), "{server:?}: {}", out.stderr);
        for stale in [
            kv.put(with_token(put(), &token)?).await.map(drop),
            kv.range(with_token(RangeRequest { key: b"app/1".to_vec(), ..Default::default() }, &token)?)
                .await
                .map(drop),
        ] {
            ensure!(
                stale.as_ref().is_err_and(|s| s.code() == tonic::Code::InvalidArgument
                    && s.message() == "etcdserver: revision of auth store is old"),
                "{server:?}: {stale:?}"
            );
        }
        let mut auth = AuthClient::connect(c.client_url(2)).await?;
        let req = meridian_proto::etcdserverpb::AuthRoleAddRequest { name: "third".into() };
        auth.role_add(with_token(req, &root)?).await.with_context(|| format!("{server:?}: role add, stale root"))?;
        let out = etcdctl(&eps, &["--user=alice:apw", "get", "app/1", "--print-value-only"])?;
        ensure!(out.stdout.trim() == "v", "{server:?}: a new token reads: {}{}", out.stdout, out.stderr);
    }
    ensure!(revisions[0] == revisions[1], "auth revisions differ (etcd, meridian): {revisions:?}");
    Ok(())
}

/// With `--client-cert-auth`, a client certificate's CN is the user of a request without a
/// token, beside etcd: a user added with no password acts by certificate only, a token wins over
/// the certificate, and a CN that names no user is refused as etcd refuses it.
#[test]
fn the_client_certificate_cn_is_the_user_as_in_etcd() -> Result<()> {
    let ca = meridian_tests::TestCa::new("client CA")?;
    let server_pair = ca.server("server")?;
    let (root, alice, ghost) = (ca.client("root")?, ca.client("alice")?, ca.client("ghost")?);
    let flags: Vec<String> = [
        "--cert-file",
        server_pair.cert(),
        "--key-file",
        server_pair.key(),
        "--trusted-ca-file",
        ca.ca(),
        "--client-cert-auth",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut outputs = Vec::new();
    for server in [Server::Etcd, Server::Meridian] {
        let c = Cluster::start_server(server, 1, ClusterOpts { client_https: true, ..opts(flags.clone()) })?;
        let eps = c.client_urls();
        let mut seen = Vec::new();
        for (who, user, args) in [
            (&root, None, vec!["user", "add", "root:rootpw"]),
            (&root, None, vec!["user", "add", "alice", "--no-password"]),
            (&root, None, vec!["role", "add", "reader"]),
            (&root, None, vec!["role", "grant-permission", "reader", "readwrite", "app/", "--prefix"]),
            (&root, None, vec!["user", "grant-role", "alice", "reader"]),
            (&root, None, vec!["auth", "enable"]),
            (&root, None, vec!["put", "other", "1"]),
            (&root, None, vec!["user", "list"]),
            (&alice, None, vec!["put", "app/x", "1"]),
            (&alice, None, vec!["get", "app/x", "--print-value-only"]),
            (&alice, None, vec!["put", "other", "2"]),
            (&alice, None, vec!["user", "list"]),
            (&alice, None, vec!["lock", "app/l", "true"]),
            (&alice, Some("alice:x"), vec!["get", "app/x"]),
            (&alice, Some("root:rootpw"), vec!["put", "other", "3"]),
            (&ghost, None, vec!["get", "app/x"]),
            (&ghost, None, vec!["user", "list"]),
        ] {
            let mut all = vec!["--cacert", ca.ca(), "--cert", who.cert(), "--key", who.key()];
            let user = user.map(|u| format!("--user={u}"));
            all.extend(user.as_deref());
            all.extend(args.iter().copied());
            let out = etcdctl(&eps, &all)?;
            let errors: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("Error:")).collect();
            seen.push(format!(
                "{} {user:?} {args:?}: exit={} {}{}",
                if std::ptr::eq(who, &root) {
                    "root"
                } else if std::ptr::eq(who, &alice) {
                    "alice"
                } else {
                    "ghost"
                },
                out.status.code().unwrap_or(-1),
                mask_hex_ids(&out.stdout),
                errors.join("\n")
            ));
        }
        outputs.push(seen);
    }
    let expected = ["etcdserver: permission denied", "etcdserver: user name not found", "exit=0 1\n"];
    assert_same_steps(&outputs[0], &outputs[1], &expected);
    Ok(())
}

/// Through a gateway (one region, the primary): etcdctl authenticates through it, its token
/// rides on every request the gateway routes, and the member's checks answer as without it.
#[test]
fn etcdctl_with_a_user_works_through_a_gateway() -> Result<()> {
    let c = Cluster::start(1, opts(["--region", "us-east"].map(String::from).to_vec()))?;
    let eps = [c.endpoint(1)];
    etcdctl_each(
        &eps,
        &[
            &["user", "add", "root:rootpw"],
            &["user", "add", "alice:apw"],
            &["role", "add", "app"],
            &["role", "grant-permission", "app", "readwrite", "app/", "--prefix"],
            &["user", "grant-role", "alice", "app"],
            &["auth", "enable"],
        ],
    )?;
    let gateway = meridian_tests::GatewayProcess::start("gw", "us-east", &[("us-east", c.endpoints())], &[])?;
    let gw = [gateway.endpoint()];
    let ok = |args: &[&str]| -> Result<String> {
        let out = etcdctl(&gw, args)?;
        ensure!(out.success(), "etcdctl {args:?} through the gateway: {}", out.stderr);
        Ok(out.stdout)
    };
    ok(&["--user=alice:apw", "put", "app/x", "1"])?;
    ensure!(ok(&["--user=alice:apw", "get", "app/x", "--print-value-only"])?.trim() == "1");
    ensure!(ok(&["--user=root:rootpw", "user", "list"])?.contains("alice"));
    for (args, want) in [
        (vec!["--user=alice:apw", "put", "other", "1"], "etcdserver: permission denied"),
        (vec!["get", "app/x"], "etcdserver: user name is empty"),
        (vec!["--user=alice:wrong", "get", "app/x"], "etcdserver: authentication failed, invalid user ID or password"),
        (vec!["--user=alice:apw", "user", "list"], "etcdserver: permission denied"),
    ] {
        let out = etcdctl(&gw, &args)?;
        ensure!(!out.success() && out.stderr.contains(want), "etcdctl {args:?}: {}", out.stderr);
    }
    Ok(())
}

/// Auth on a primary reaches its secondary through the mirror: the mirror reads the source as a
/// user with the role `mirror` (`--user`), writes into the secondary as that user once auth is on
/// there, and the secondary enforces the primary's users, roles and grants, changes included.
#[test]
fn a_secondary_enforces_its_primarys_users_and_roles() -> Result<()> {
    let primary_flags = vec![
        "--region".to_string(),
        "us-east".to_string(),
        "--mirror-token-file".to_string(),
        meridian_tests::mirror_token_file()?.display().to_string(),
    ];
    let primary = Cluster::start(1, opts(primary_flags))?;
    let secondary = Cluster::start(
        1,
        ClusterOpts { extra_args: meridian_tests::secondary_flags("eu-west", "us-east")?, ..ClusterOpts::fast() },
    )?;
    let p = [primary.endpoint(1)];
    let s = [secondary.endpoint(1)];
    etcdctl_each(
        &p,
        &[
            &["user", "add", "root:rootpw"],
            &["user", "add", "alice:apw"],
            &["user", "add", "mirrorer:mpw"],
            &["role", "add", "reader"],
            &["role", "grant-permission", "reader", "read", "app/", "--prefix"],
            &["role", "add", "mirror"],
            &["role", "grant-permission", "mirror", "read", "", "--prefix"],
            &["user", "grant-role", "alice", "reader"],
            &["user", "grant-role", "mirrorer", "mirror"],
            &["put", "app/x", "1"],
            &["auth", "enable"],
        ],
    )?;
    let mirror = meridian_tests::MirrorProcess::start(&primary.endpoints(), &secondary, &["--user", "mirrorer:mpw"])?;
    let put = |key: &str| -> Result<i64> {
        let out = etcdctl(&p, &["--user=root:rootpw", "-w", "json", "put", key, "v"])?;
        ensure!(out.success(), "put {key}: {}", out.stderr);
        let json: serde_json::Value = serde_json::from_str(&out.stdout)?;
        json["header"]["revision"].as_i64().context("revision")
    };
    let wait = |what: &str, check: &dyn Fn() -> Result<bool>| -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !check()? {
            ensure!(std::time::Instant::now() < deadline, "{what}; mirror log:\n{}", mirror.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    };
    mirror.wait_applied(put("app/y")?, Duration::from_secs(20))?;
    // The secondary takes the primary's users: alice reads there, within her grants only.
    wait("alice cannot read app/x on the secondary", &|| {
        Ok(etcdctl(&s, &["--user=alice:apw", "get", "app/x", "--print-value-only"])?.stdout.trim() == "1")
    })?;
    for (args, want) in [
        (vec!["get", "app/x"], "etcdserver: user name is empty"),
        (vec!["--user=alice:apw", "get", "other"], "etcdserver: permission denied"),
        (vec!["--user=alice:wrong", "get", "app/x"], "etcdserver: authentication failed, invalid user ID or password"),
        (vec!["--user=root:rootpw", "user", "add", "bob:b"], "read-only secondary"),
    ] {
        let out = etcdctl(&s, &args)?;
        ensure!(!out.success() && out.stderr.contains(want), "etcdctl {args:?} on the secondary: {}", out.stderr);
    }
    let users = etcdctl(&s, &["--user=root:rootpw", "user", "list"])?;
    ensure!(users.stdout.split_whitespace().collect::<Vec<_>>() == ["alice", "mirrorer", "root"], "{users:?}");

    // Through a gateway in the secondary's region (the primary 25 ms away): a token the gateway
    // handed out reads from the secondary, which has its own token for the same user.
    let to_primary = meridian_tests::LatencyProxy::start(&primary.endpoint(1), Duration::from_millis(25))?;
    let gateway = meridian_tests::GatewayProcess::start(
        "gw-eu",
        "eu-west",
        &[("us-east", vec![to_primary.endpoint()]), ("eu-west", secondary.endpoints())],
        &[],
    )?;
    gateway.wait_every_region_known(Duration::from_secs(20))?;
    let url = format!("http://{}", gateway.endpoint());
    let served = tokio::runtime::Runtime::new()?.block_on(async {
        let token = authenticate(url.clone(), "alice", "apw").await?;
        let mut kv = KvClient::connect(url).await?;
        let mut regions = Vec::new();
        for serializable in [true, false] {
            let req = RangeRequest { key: b"app/x".to_vec(), serializable, ..Default::default() };
            let resp =
                kv.range(with_token(req, &token)?).await.with_context(|| format!("serializable {serializable}"))?;
            let region =
                resp.metadata().get("x-meridian-region").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            ensure!(resp.into_inner().kvs.first().is_some_and(|kv| kv.value == b"1"), "app/x through the gateway");
            regions.push(region);
        }
        let denied = kv
            .range(with_token(
                RangeRequest { key: b"other".to_vec(), serializable: true, ..Default::default() },
                &token,
            )?)
            .await;
        ensure!(denied.as_ref().is_err_and(|s| s.code() == tonic::Code::PermissionDenied), "{denied:?}");
        Ok::<_, anyhow::Error>(regions)
    })?;
    ensure!(served == ["eu-west", "eu-west"], "reads were not served by the secondary: {served:?}");
    // Writes still reach the secondary (the mirror writes as its user now), and a revoked grant
    // is revoked there too.
    mirror.wait_applied(put("app/z")?, Duration::from_secs(20))?;
    let out = etcdctl(&p, &["--user=root:rootpw", "user", "revoke-role", "alice", "reader"])?;
    ensure!(out.success(), "{}", out.stderr);
    wait("alice still reads on the secondary", &|| {
        Ok(etcdctl(&s, &["--user=alice:apw", "get", "app/x"])?.stderr.contains("etcdserver: permission denied"))
    })?;
    Ok(())
}

/// `[rate_limits]` per user through a gateway: a user past their write budget is refused with
/// etcd's "too many requests", while another user on the same address keeps their own budget
/// (by address alone they would share one), and a fresh token of the first user gives no new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_rate_limits_count_per_user() -> Result<()> {
    let c = Cluster::start(1, opts(["--region", "us-east"].map(String::from).to_vec()))?;
    let eps = [c.endpoint(1)];
    etcdctl_each(
        &eps,
        &[
            &["user", "add", "root:rootpw"],
            &["user", "grant-role", "root", "root"],
            &["role", "add", "app"],
            &["role", "grant-permission", "app", "readwrite", "app/", "--prefix"],
            &["user", "add", "alice:apw"],
            &["user", "add", "bob:bpw"],
            &["user", "grant-role", "alice", "app"],
            &["user", "grant-role", "bob", "app"],
            &["auth", "enable"],
        ],
    )?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, "[rate_limits]\nwrite = 5\n")?;
    let gateway = meridian_tests::GatewayProcess::start(
        "gw",
        "us-east",
        &[("us-east", c.endpoints())],
        &["--config-file", &file.display().to_string()],
    )?;
    let url = format!("http://{}", gateway.endpoint());
    // Writes in a burst until the first refusal: how many went through, and the refusal.
    let burst = |token: String| {
        let url = url.clone();
        async move {
            let mut kv = KvClient::connect(url).await?;
            for n in 0..20 {
                let put =
                    PutRequest { key: b"app/k".to_vec(), value: n.to_string().into_bytes(), ..Default::default() };
                if let Err(e) = kv.put(with_token(put, &token)?).await {
                    return Ok::<_, anyhow::Error>((n, Some(e)));
                }
            }
            Ok((20, None))
        }
    };
    let alice = authenticate(url.clone(), "alice", "apw").await?;
    let (accepted, refused) = burst(alice).await?;
    let refused = refused.context("20 writes in a burst were all accepted under a limit of 5/s")?;
    ensure!(
        (refused.code(), refused.message()) == (tonic::Code::ResourceExhausted, "etcdserver: too many requests"),
        "{refused:?}"
    );
    ensure!((5..=7).contains(&accepted), "{accepted} writes accepted before the limit");
    let again = authenticate(url.clone(), "alice", "apw").await?;
    let (more, _) = burst(again).await?;
    ensure!(more <= 2, "a new token of the same user got a new budget: {more} writes");
    let bob = authenticate(url.clone(), "bob", "bpw").await?;
    let (bobs, _) = burst(bob).await?;
    ensure!(bobs >= 4, "another user on the same address was held back: {bobs} writes");
    Ok(())
}

/// Identical watches of two users through one gateway are not shared (etcd's grpc-proxy once
/// leaked a coalesced watch across users): the user without the permission is refused as etcd
/// refuses them, and sees none of the other's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_never_shares_a_watch_between_users() -> Result<()> {
    let c = Cluster::start(1, opts(["--region", "us-east"].map(String::from).to_vec()))?;
    etcdctl_each(
        &[c.endpoint(1)],
        &[
            &["user", "add", "root:rootpw"],
            &["user", "grant-role", "root", "root"],
            &["role", "add", "app"],
            &["role", "grant-permission", "app", "readwrite", "app/", "--prefix"],
            &["role", "add", "elsewhere"],
            &["role", "grant-permission", "elsewhere", "read", "other/", "--prefix"],
            &["user", "add", "alice:apw"],
            &["user", "add", "bob:bpw"],
            &["user", "grant-role", "alice", "app"],
            &["user", "grant-role", "bob", "elsewhere"],
            &["auth", "enable"],
        ],
    )?;
    let gateway = meridian_tests::GatewayProcess::start("gw", "us-east", &[("us-east", c.endpoints())], &[])?;
    let url = format!("http://{}", gateway.endpoint());
    let (alice, bob) =
        (authenticate(url.clone(), "alice", "apw").await?, authenticate(url.clone(), "bob", "bpw").await?);
    // Alice's watch first, so a shared one would already exist for Bob's to join.
    let watch = |token: String| {
        let url = url.clone();
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let create = WatchCreateRequest { key: b"app/x".to_vec(), ..Default::default() };
            tx.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) }).await?;
            let mut client = WatchClient::connect(url).await?;
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let mut inbound = client.watch(with_token(stream, &token)?).await?.into_inner();
            let first = tokio::time::timeout(Duration::from_secs(5), inbound.message()).await??.context("ended")?;
            Ok::<_, anyhow::Error>((first, inbound, tx))
        }
    };
    let (created, mut alices, _keep_alice) = watch(alice.clone()).await?;
    ensure!(created.created && !created.canceled, "{created:?}");
    let (refused, mut bobs, _keep_bob) = watch(bob).await?;
    ensure!(
        refused.canceled && refused.cancel_reason.contains("etcdserver: permission denied"),
        "Bob's watch of app/x was not refused: {refused:?}"
    );
    let mut kv = KvClient::connect(url).await?;
    let put = PutRequest { key: b"app/x".to_vec(), value: b"secret".to_vec(), ..Default::default() };
    kv.put(with_token(put, &alice)?).await?;
    let event = tokio::time::timeout(Duration::from_secs(5), alices.message()).await??.context("ended")?;
    ensure!(event.events.iter().any(|e| e.kv.as_ref().is_some_and(|kv| kv.value == b"secret")), "{event:?}");
    let leaked = tokio::time::timeout(Duration::from_secs(1), bobs.message()).await;
    ensure!(!matches!(&leaked, Ok(Ok(Some(r))) if !r.events.is_empty()), "Bob saw Alice's event: {leaked:?}");
    Ok(())
}

/// Where etcd 3.4.23 checks nothing, Meridian checks as later 3.4 releases do: a keep-alive
/// needs a user who may write the lease's keys, a TTL with its keys one who may read them, the
/// lease list a user; raising or clearing an alarm and compacting are root's. Reading alarms is
/// anyone's.
#[test]
fn leases_alarms_and_compaction_are_checked_as_later_34_releases_check_them() -> Result<()> {
    let c = Cluster::start(1, opts(Vec::new()))?;
    let eps = [c.endpoint(1)];
    etcdctl_each(&eps, ALICE_OWNS_APP)?;
    etcdctl_each(&eps, &[&["--user=root:rootpw", "user", "add", "bob:bpw"]])?;
    let granted = etcdctl(&eps, &["--user=alice:apw", "lease", "grant", "60"])?;
    let id = granted.stdout.split_whitespace().nth(1).context("no lease id")?.to_string();
    etcdctl_each(&eps, &[&["--user=alice:apw", "put", "app/k", "v", "--lease", &id]])?;
    for (args, want) in [
        (vec!["--user=alice:apw", "lease", "keep-alive", "--once", &id], Ok("keepalived with TTL")),
        (vec!["--user=bob:bpw", "lease", "keep-alive", "--once", &id], Err("etcdserver: permission denied")),
        (vec!["--user=alice:apw", "lease", "timetolive", &id, "--keys"], Ok("attached keys")),
        (vec!["--user=bob:bpw", "lease", "timetolive", &id, "--keys"], Err("etcdserver: permission denied")),
        (vec!["--user=bob:bpw", "lease", "timetolive", &id], Ok("remaining")),
        (vec!["lease", "timetolive", &id], Err("etcdserver: user name is empty")),
        (vec!["lease", "list"], Err("etcdserver: user name is empty")),
        (vec!["--user=bob:bpw", "lease", "list"], Ok("found 1 leases")),
        (vec!["alarm", "list"], Ok("")),
        (vec!["--user=alice:apw", "compact", "2"], Err("etcdserver: permission denied")),
        (vec!["--user=root:rootpw", "compact", "2"], Ok("compacted revision 2")),
    ] {
        let out = etcdctl(&eps, &args)?;
        match want {
            Ok(text) => {
                ensure!(out.success() && out.stdout.contains(text), "etcdctl {args:?}: {}{}", out.stdout, out.stderr)
            }
            Err(text) => {
                ensure!(!out.success() && out.stderr.contains(text), "etcdctl {args:?}: {}{}", out.stdout, out.stderr)
            }
        }
    }
    // Raising an alarm (etcdctl only clears the alarms it lists): bob may not, root may.
    tokio::runtime::Runtime::new()?.block_on(async {
        use meridian_proto::etcdserverpb::maintenance_client::MaintenanceClient;
        use meridian_proto::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmType};
        let raise =
            AlarmRequest { action: AlarmAction::Activate as i32, member_id: 1, alarm: AlarmType::Nospace as i32 };
        let mut m = MaintenanceClient::connect(c.client_url(1)).await?;
        let bob = authenticate(c.client_url(1), "bob", "bpw").await?;
        let refused = m.alarm(with_token(raise.clone(), &bob)?).await;
        ensure!(refused.as_ref().is_err_and(|s| s.code() == tonic::Code::PermissionDenied), "{refused:?}");
        let root = authenticate(c.client_url(1), "root", "rootpw").await?;
        m.alarm(with_token(raise, &root)?).await.context("root raises an alarm")?;
        Ok::<_, anyhow::Error>(())
    })?;
    let listed = etcdctl(&eps, &["alarm", "list"])?;
    ensure!(listed.stdout.contains("NOSPACE"), "anyone reads the alarms: {listed:?}");
    let cleared = etcdctl(&eps, &["--user=bob:bpw", "alarm", "disarm"])?;
    ensure!(!cleared.success() && cleared.stderr.contains("etcdserver: permission denied"), "{cleared:?}");
    etcdctl_each(&eps, &[&["--user=root:rootpw", "alarm", "disarm"]])?;
    Ok(())
}
