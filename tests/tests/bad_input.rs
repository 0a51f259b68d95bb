//! Requests etcd refuses, sent to a real 3-member Meridian cluster: each must fail with etcd 3.4's
//! exact gRPC code and message (clients, including etcd's own Go client, match on them), and the
//! cluster must keep serving afterwards.
//!
//! The same checks go through the real `etcdctl` too, which prints `Error: <message>` and exits
//! non-zero. The expected strings are etcd 3.4's (`etcdserver/api/v3rpc/rpctypes/error.go`, and
//! grpc-go's own wording for the transport limit).

use std::fmt::Debug;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use meridian_tests::{etcdctl_with_input, Cluster, ClusterOpts};
use tonic::Code;

const EMPTY_KEY: &str = "etcdserver: key is not provided";
const TOO_LARGE: &str = "etcdserver: request is too large";
const TOO_MANY_OPS: &str = "etcdserver: too many operations in txn request";
const DUPLICATE_KEY: &str = "etcdserver: duplicate key given in txn request";
const FUTURE_REV: &str = "etcdserver: mvcc: required revision is a future revision";
const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
const VALUE_PROVIDED: &str = "etcdserver: value is provided";
const KEY_NOT_FOUND: &str = "etcdserver: key not found";
const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";

/// etcd's default `--max-request-bytes`: 1.5 MiB.
const DEFAULT_MAX_REQUEST: usize = 1_572_864;
/// What etcd adds to `--max-request-bytes` for grpc-go's receive limit.
const GRPC_OVERHEAD: usize = 512 * 1024;

/// The status of a failed call; panics, naming `what`, if it succeeded or failed otherwise.
fn status<T: Debug>(what: &str, result: Result<T, etcd_client::Error>) -> tonic::Status {
    match result {
        Err(etcd_client::Error::GRpcStatus(status)) => status,
        other => panic!("{what}: expected a gRPC error status, got {other:?}"),
    }
}

/// Asserts `result` failed with exactly `code` and `message`.
fn assert_refused<T: Debug>(what: &str, result: Result<T, etcd_client::Error>, code: Code, message: &str) {
    let status = status(what, result);
    assert_eq!((status.code(), status.message()), (code, message), "{what}: wrong error");
}

/// A put then a linearizable get through `client` both succeed: the cluster still serves.
async fn assert_serving(client: &mut Client, tag: &str) -> Result<()> {
    let key = format!("alive/{tag}");
    client.put(key.as_str(), tag, None).await.with_context(|| format!("put after {tag}"))?;
    let resp = client.get(key.as_str(), None).await.with_context(|| format!("get after {tag}"))?;
    assert_eq!(resp.kvs().first().map(|kv| kv.value()), Some(tag.as_bytes()), "read back after {tag}");
    Ok(())
}

fn revision(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.expect("response header").revision()
}

/// Length of a protobuf varint.
fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// Encoded size of a PutRequest with only key and value set: what grpc-go reports as the
/// received message size.
fn put_request_len(key: usize, value: usize) -> usize {
    1 + varint_len(key) + key + 1 + varint_len(value) + value
}

fn puts(prefix: &str, n: usize) -> Vec<TxnOp> {
    (0..n).map(|i| TxnOp::put(format!("{prefix}{i:03}"), "v", None)).collect()
}

/// Default limits: a value just under --max-request-bytes is stored; over it, etcd's
/// "request is too large"; over the gRPC receive limit (limit + 512 KiB), grpc-go's
/// ResourceExhausted.
#[tokio::test]
async fn oversized_requests_are_refused_with_default_limit() -> Result<()> {
    let cluster = Cluster::start(3, ClusterOpts::fast())?;
    let mut client = cluster.client().await?;

    let fits = vec![b'x'; 1_468_006]; // 1.4 MiB
    client.put("big/fits", fits.clone(), None).await?;
    let resp = client.get("big/fits", None).await?;
    assert_eq!(resp.kvs().first().map(|kv| kv.value().len()), Some(fits.len()));

    let over_limit = vec![b'x'; 1_677_722]; // 1.6 MiB
    assert!(put_request_len(10, over_limit.len()) < DEFAULT_MAX_REQUEST + GRPC_OVERHEAD);
    assert_refused(
        "put of 1.6 MiB",
        client.put("big/over-1", over_limit, None).await,
        Code::InvalidArgument,
        TOO_LARGE,
    );

    let over_grpc = vec![b'x'; 3 * 1024 * 1024];
    let status = status("put of 3 MiB", client.put("big/over-2", over_grpc.clone(), None).await);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        format!(
            "grpc: received message larger than max ({} vs. {})",
            put_request_len("big/over-2".len(), over_grpc.len()),
            DEFAULT_MAX_REQUEST + GRPC_OVERHEAD
        ),
        "put of 3 MiB"
    );

    for key in ["big/over-1", "big/over-2"] {
        let resp = client.get(key, None).await?;
        assert_eq!(resp.count(), 0, "{key} must not have been stored");
    }
    assert_serving(&mut client, "oversized").await
}

/// `--max-request-bytes 1024`: a 2 KiB value is refused with etcd's own message (it is still
/// below the gRPC receive limit, 1024 + 512 KiB), a small one is stored.
#[tokio::test]
async fn oversized_requests_are_refused_with_custom_limit() -> Result<()> {
    let cluster = Cluster::start(3, ClusterOpts { max_request_bytes: Some(1024), ..ClusterOpts::fast() })?;
    let mut client = cluster.client().await?;
    assert_refused(
        "put of 2 KiB with --max-request-bytes 1024",
        client.put("k", vec![b'x'; 2048], None).await,
        Code::InvalidArgument,
        TOO_LARGE,
    );
    client.put("k", vec![b'x'; 512], None).await?;
    assert_serving(&mut client, "custom-limit").await
}

/// 129 operations in one branch of a txn are refused (default --max-txn-ops 128); 128 apply.
#[tokio::test]
async fn too_many_txn_ops_are_refused() -> Result<()> {
    let cluster = Cluster::start(3, ClusterOpts::fast())?;
    let mut client = cluster.client().await?;

    assert_refused(
        "txn of 129 puts",
        client.txn(Txn::new().and_then(puts("many/", 129))).await,
        Code::InvalidArgument,
        TOO_MANY_OPS,
    );
    assert_eq!(
        client.get("many/", Some(GetOptions::new().with_prefix().with_count_only())).await?.count(),
        0,
        "a refused txn writes nothing"
    );

    let resp = client.txn(Txn::new().and_then(puts("many/", 128))).await?;
    assert!(resp.succeeded());
    assert_eq!(resp.op_responses().len(), 128);
    let count = client.get("many/", Some(GetOptions::new().with_prefix().with_count_only())).await?.count();
    assert_eq!(count, 128);
    assert_serving(&mut client, "txn-ops").await
}

/// `--max-txn-ops 4`: five operations are refused, four apply.
#[tokio::test]
async fn custom_max_txn_ops_is_enforced() -> Result<()> {
    let cluster = Cluster::start(3, ClusterOpts { max_txn_ops: Some(4), ..ClusterOpts::fast() })?;
    let mut client = cluster.client().await?;
    assert_refused(
        "txn of 5 puts with --max-txn-ops 4",
        client.txn(Txn::new().and_then(puts("few/", 5))).await,
        Code::InvalidArgument,
        TOO_MANY_OPS,
    );
    let resp = client.txn(Txn::new().and_then(puts("few/", 4))).await?;
    assert!(resp.succeeded());
    assert_eq!(resp.op_responses().len(), 4);
    assert_serving(&mut client, "max-txn-ops").await
}

/// An empty key is refused on put, get, delete, and in a txn compare or op.
#[tokio::test]
async fn empty_key_is_refused() -> Result<()> {
    let cluster = Cluster::start(3, ClusterOpts::fast())?;
    let mut client = cluster.client().await?;
    client.put("k", "v", None).await?;

    assert_refused("put with empty key", client.put("", "v", None).await, Code::InvalidArgument, EMPTY_KEY);
    assert_refused("get with empty key", client.get("", None).await, Code::InvalidArgument, EMPTY_KEY);
    assert_refused(
        "serializable get with empty key",
        client.get("", Some(GetOptions::new().with_serializable())).await,
        Code::InvalidArgument,
        EMPTY_KEY,
    );
    assert_refused("delete with empty key", client.delete("", None).await, Code::InvalidArgument, EMPTY_KEY);
    assert_refused(
        "txn compare on empty key",
        client
            .txn(Txn::new().when([Compare::value("", CompareOp::Equal, "v")]).and_then([TxnOp::put("k", "w", None)]))
            .await,
        Code::InvalidArgument,
        EMPTY_KEY,
    );
    assert_refused(
        "txn put of empty key",
        client.txn(Txn::new().and_then([TxnOp::put("", "w", None)])).await,
        Code::InvalidArgument,
        EMPTY_KEY,
    );

    let resp = client.get("k", None).await?;
    assert_eq!(resp.kvs().first().map(|kv| kv.value()), Some(&b"v"[..]), "the refused txns wrote nothing");
    assert_serving(&mut client, "empty-key").await
}

/// A range_end before the key is an empty range, not an error: get finds nothing, delete
/// deletes nothing and does not advance the revision.
#[tokio::test]
async fn range_end_before_key_is_an_empty_range() -> Result<()> {
    let cluster = Cluster::start(3, ClusterOpts::fast())?;
    let mut client = cluster.client().await?;
    for k in ["a", "b", "c"] {
        client.put(k, "1", None).await?;
    }
    let resp = client.get("b", Some(GetOptions::new().with_range("a"))).await?;
    assert_eq!((resp.count(), resp.kvs().len()), (0, 0), "{resp:?}");
    let before = revision(resp.header());

    let resp = client.delete("b", Some(DeleteOptions::new().with_range("a"))).await?;
    assert_eq!(resp.deleted(), 0, "{resp:?}");
    assert_eq!(revision(resp.header()), before, "a delete of nothing must not create a revision");
    let all = client.get("a", Some(GetOptions::new().with_range("d"))).await?;
    assert_eq!(all.count(), 3, "a, b and c are all still there");
    assert_eq!(revision(all.header()), before);
    assert_serving(&mut client, "range-end").await
}

/// Reads and compactions at a revision that does not exist yet, or no longer exists.
#[tokio::test]
async fn future_and_compacted_revisions_are_refused() -> Result<()> {
    let cluster = Cluster::start(3, ClusterOpts::fast())?;
    let mut client = cluster.client().await?;
    let mut rev = 0;
    for v in ["1", "2", "3", "4"] {
        rev = revision(client.put("k", v, None).await?.header());
    }

    assert_refused(
        "get at current + 100",
        client.get("k", Some(GetOptions::new().with_revision(rev + 100))).await,
        Code::OutOfRange,
        FUTURE_REV,
    );
    assert_refused(
        "serializable get at current + 100",
        client.get("k", Some(GetOptions::new().with_revision(rev + 100).with_serializable())).await,
        Code::OutOfRange,
        FUTURE_REV,
    );
    assert_refused("compact at current + 100", client.compact(rev + 100, None).await, Code::OutOfRange, FUTURE_REV);
    // The current revision itself is readable.
    let resp = client.get("k", Some(GetOptions::new().with_revision(rev))).await?;
    assert_eq!(resp.kvs().first().map(|kv| kv.value()), Some(&b"4"[..]));

    client.compact(rev, None).await?;
    assert_refused(
        "get at compacted - 1",
        client.get("k", Some(GetOptions::new().with_revision(rev - 1))).await,
        Code::OutOfRange,
        COMPACTED,
    );
    assert_refused("compact again at the same revision", client.compact(rev, None).await, Code::OutOfRange, COMPACTED);
    assert_refused(
        "compact below the compacted revision",
        client.compact(rev - 1, None).await,
        Code::OutOfRange,
        COMPACTED,
    );
    let resp = client.get("k", Some(GetOptions::new().with_revision(rev))).await?;
    assert_eq!(
        resp.kvs().first().map(|kv| kv.value()),
        Some(&b"4"[..]),
        "the compaction revision itself stays readable"
    );
    assert_serving(&mut client, "revisions").await
}

/// A txn that writes one key twice, or puts a key it also deletes, is refused whole.
#[tokio::test]
async fn duplicate_key_in_txn_is_refused() -> Result<()> {
    let cluster = Cluster::start(3, ClusterOpts::fast())?;
    let mut client = cluster.client().await?;
    assert_refused(
        "txn putting one key twice",
        client
            .txn(Txn::new().and_then([
                TxnOp::put("dup", "1", None),
                TxnOp::put("other", "1", None),
                TxnOp::put("dup", "2", None),
            ]))
            .await,
        Code::InvalidArgument,
        DUPLICATE_KEY,
    );
    assert_refused(
        "txn putting and deleting one key",
        client.txn(Txn::new().and_then([TxnOp::delete("dup", None), TxnOp::put("dup", "1", None)])).await,
        Code::InvalidArgument,
        DUPLICATE_KEY,
    );
    for key in ["dup", "other"] {
        assert_eq!(client.get(key, None).await?.count(), 0, "{key} written");
    }
    assert_serving(&mut client, "duplicate-key").await
}

/// `ignore_value` with a value, or on a missing key, is refused; on an existing key without a
/// value it keeps the value and bumps the version.
#[tokio::test]
async fn ignore_value_misuse_is_refused() -> Result<()> {
    let cluster = Cluster::start(3, ClusterOpts::fast())?;
    let mut client = cluster.client().await?;
    client.put("iv", "kept", None).await?;

    assert_refused(
        "put ignore_value with a value",
        client.put("iv", "new", Some(PutOptions::new().with_ignore_value())).await,
        Code::InvalidArgument,
        VALUE_PROVIDED,
    );
    assert_refused(
        "put ignore_value on a missing key",
        client.put("missing", "", Some(PutOptions::new().with_ignore_value())).await,
        Code::InvalidArgument,
        KEY_NOT_FOUND,
    );
    assert_eq!(client.get("missing", None).await?.count(), 0);

    client.put("iv", "", Some(PutOptions::new().with_ignore_value())).await?;
    let resp = client.get("iv", None).await?;
    let kv = resp.kvs().first().context("iv")?;
    assert_eq!((kv.value(), kv.version()), (&b"kept"[..], 2));
    assert_serving(&mut client, "ignore-value").await
}

/// Filling a 256 KiB space quota: the put that does not fit is refused with NOSPACE and raises
/// the alarm; reads and deletes still work; puts stay refused while the alarm is on, even after
/// deleting and compacting; after `etcdctl defrag` and `etcdctl alarm disarm` puts work again.
#[tokio::test]
async fn space_quota_raises_nospace_alarm_until_disarmed() -> Result<()> {
    let cluster = Cluster::start(3, ClusterOpts { quota_backend_bytes: Some(256 * 1024), ..ClusterOpts::fast() })?;
    let mut client = cluster.client().await?;
    let value = vec![b'q'; 1024];
    let mut stored = 0;
    let mut refused = None;
    for n in 0..1000 {
        match client.put(format!("q/{n:04}"), value.clone(), None).await {
            Ok(_) => stored += 1,
            Err(err) => {
                refused = Some(status("put past the quota", Err::<(), _>(err)));
                break;
            }
        }
    }
    let refused = refused.context("1000 puts of 1 KiB never exceeded a 256 KiB quota")?;
    assert_eq!((refused.code(), refused.message()), (Code::ResourceExhausted, NO_SPACE), "after {stored} puts");
    assert!(stored > 0, "the quota refused even the first 1 KiB put");

    // Reads still work.
    let resp = client.get("q/0000", None).await?;
    assert_eq!(resp.kvs().first().map(|kv| kv.value()), Some(&value[..]));

    // The alarm is raised cluster-wide (through raft, so poll a little).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = cluster.etcdctl(&["alarm", "list"])?;
        if out.success() && out.stdout.contains("alarm:NOSPACE") {
            break;
        }
        if Instant::now() >= deadline {
            bail!("no NOSPACE alarm in `etcdctl alarm list`: {out:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Deletes still work; puts are still refused, small or not.
    let deleted = client.delete("q/", Some(DeleteOptions::new().with_prefix())).await?.deleted();
    // etcd applies the put that crosses the quota at apply time and still answers NOSPACE, so
    // that one may or may not be stored.
    assert!((stored..=stored + 1).contains(&deleted), "deleted {deleted} keys, {stored} puts were acknowledged");
    assert_refused(
        "small put after deleting everything, alarm still on",
        client.put("small", "1", None).await,
        Code::ResourceExhausted,
        NO_SPACE,
    );
    assert_refused(
        "txn put after deleting everything, alarm still on",
        client.txn(Txn::new().and_then([TxnOp::put("small", "1", None)])).await,
        Code::ResourceExhausted,
        NO_SPACE,
    );

    // Compaction frees the history, but the alarm stays until disarmed.
    let rev = revision(client.get("q/", Some(GetOptions::new().with_prefix())).await?.header());
    client.compact(rev, None).await?;
    assert_refused(
        "small put after compaction, alarm still on",
        client.put("small", "1", None).await,
        Code::ResourceExhausted,
        NO_SPACE,
    );
    let out = cluster.etcdctl(&["alarm", "list"])?;
    assert!(out.stdout.contains("alarm:NOSPACE"), "{out:?}");

    // etcd's recovery procedure: compact, defragment every member, disarm. (etcd 3.4 counts the
    // backend file's size against the quota, so without the defrag it refuses puts again.)
    let out = cluster.etcdctl_ok(&["defrag"])?;
    assert_eq!(out.matches("Finished defragmenting etcd member").count(), 3, "{out}");
    let out = cluster.etcdctl(&["alarm", "disarm"])?;
    assert!(out.success(), "etcdctl alarm disarm: {out:?}");
    let out = cluster.etcdctl(&["alarm", "list"])?;
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout.trim(), "", "alarms left after disarm");

    client.put("small", "1", None).await?;
    assert_serving(&mut client, "quota").await
}

/// The same refusals through the real etcdctl 3.4: it exits non-zero and prints etcd's message.
#[tokio::test]
async fn etcdctl_reports_etcd_errors() -> Result<()> {
    let cluster = Cluster::start(3, ClusterOpts::fast())?;
    let eps = cluster.endpoints();
    let refused = |args: &[&str], input: &str, message: &str| -> Result<()> {
        let out = etcdctl_with_input(&eps, args, input)?;
        assert!(!out.success(), "etcdctl {args:?} should fail with {message:?}: {out:?}");
        let expected = format!("Error: {message}");
        assert!(out.stderr.contains(&expected), "etcdctl {args:?}: stderr lacks {expected:?}: {out:?}");
        Ok(())
    };

    // Too many txn ops (129), then the limit itself (128).
    let txn = |n: usize| -> String {
        let ops: Vec<String> = (0..n).map(|i| format!("put ctl/{i:03} v")).collect();
        format!("\n{}\n\n\n", ops.join("\n"))
    };
    refused(&["txn"], &txn(129), TOO_MANY_OPS)?;
    let out = etcdctl_with_input(&eps, &["txn"], &txn(128))?;
    assert!(out.success(), "txn of 128: {out:?}");
    assert!(out.stdout.starts_with("SUCCESS"), "{out:?}");

    // Empty key.
    refused(&["put", "", "v"], "", EMPTY_KEY)?;
    refused(&["get", ""], "", EMPTY_KEY)?;
    refused(&["del", ""], "", EMPTY_KEY)?;

    // Future and compacted revisions.
    let rev: i64 = cluster.etcdctl_json(&["put", "ctl/k", "1"])?["header"]["revision"]
        .as_i64()
        .context("revision in put -w json")?;
    let future = (rev + 100).to_string();
    refused(&["get", "ctl/k", &format!("--rev={future}")], "", FUTURE_REV)?;
    refused(&["compact", &future], "", FUTURE_REV)?;
    let out = cluster.etcdctl_ok(&["compact", &rev.to_string()])?;
    assert!(out.contains(&format!("compacted revision {rev}")), "{out}");
    refused(&["get", "ctl/k", &format!("--rev={}", rev - 1)], "", COMPACTED)?;
    refused(&["compact", &rev.to_string()], "", COMPACTED)?;

    // Duplicate key in a txn.
    refused(&["txn"], "\nput ctl/d 1\nput ctl/d 2\n\n\n", DUPLICATE_KEY)?;

    assert_eq!(cluster.etcdctl_ok(&["put", "ctl/alive", "1"])?.trim(), "OK");
    assert_eq!(cluster.etcdctl_ok(&["get", "ctl/alive", "--print-value-only"])?.trim(), "1");
    Ok(())
}

/// A client on member `i` alone whose own timeout (30 s) is longer than any the server applies,
/// so the error seen is the server's.
async fn patient_client(cluster: &Cluster, i: usize) -> Result<Client> {
    let options =
        ConnectOptions::new().with_connect_timeout(Duration::from_secs(5)).with_timeout(Duration::from_secs(30));
    Ok(Client::connect([cluster.endpoint(i)], Some(options)).await?)
}

/// With two of three members killed, a put on the survivor fails within 15 s with Unavailable,
/// and a serializable read on it still answers.
async fn survivor_without_quorum(kill_leader: bool) -> Result<()> {
    let mut cluster = Cluster::start(3, ClusterOpts::fast())?;
    cluster.client().await?.put("nl/k", "1", None).await?;
    let leader = cluster.leader().await?;
    let survivor = if kill_leader { (1..=3).find(|&i| i != leader).expect("3 members") } else { leader };
    let mut client = patient_client(&cluster, survivor).await?;
    // The survivor has applied the put before its peers die.
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get("nl/k", Some(GetOptions::new().with_serializable())).await?.count() == 0 {
        if Instant::now() >= deadline {
            bail!("m{survivor} never applied nl/k");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in (1..=3).filter(|&i| i != survivor) {
        cluster.kill9(i)?;
    }

    let started = Instant::now();
    let result = client.put("nl/k", "2", None).await;
    let took = started.elapsed();
    let status = status("put without quorum", result);
    assert_eq!(status.code(), Code::Unavailable, "{status:?} after {took:?}");
    assert!(
        ["etcdserver: no leader", "etcdserver: request timed out"].contains(&status.message()),
        "unexpected message {:?} after {took:?}",
        status.message()
    );
    assert!(took < Duration::from_secs(15), "the put took {took:?} to fail");

    let resp = client
        .get("nl/k", Some(GetOptions::new().with_serializable()))
        .await
        .context("serializable get on the survivor")?;
    assert_eq!(resp.kvs().first().map(|kv| kv.value()), Some(&b"1"[..]));
    Ok(())
}

/// The leader loses both followers.
#[tokio::test]
async fn no_quorum_leader_survivor_refuses_writes() -> Result<()> {
    survivor_without_quorum(false).await
}

/// A follower loses the leader and the other follower.
#[tokio::test]
async fn no_quorum_follower_survivor_refuses_writes() -> Result<()> {
    survivor_without_quorum(true).await
}
