//! Multi-region: read-only secondaries and the mirror into them.

use meridian_tests::{Cluster, ClusterOpts};

fn secondary_opts() -> ClusterOpts {
    ClusterOpts {
        extra_args: ["--region", "eu-west", "--initial-role", "secondary", "--primary-region", "us-east"]
            .map(String::from)
            .to_vec(),
        ..ClusterOpts::fast()
    }
}

const READ_ONLY: &str = "meridian: read-only secondary of region \"us-east\"; send writes to the primary or a gateway";

/// A secondary refuses every client write with FAILED_PRECONDITION and a
/// message naming its primary, and still serves reads, watches and status.
#[tokio::test]
async fn a_secondary_refuses_client_writes() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, secondary_opts())?;
    let mut c = cluster.client().await?;
    let refused = |e: etcd_client::Error| match e {
        etcd_client::Error::GRpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("not a gRPC status: {other}"),
    };
    let want = (tonic::Code::FailedPrecondition, READ_ONLY.to_string());
    assert_eq!(refused(c.put("k", "v", None).await.unwrap_err()), want);
    assert_eq!(refused(c.delete("k", None).await.unwrap_err()), want);
    let txn = etcd_client::Txn::new().and_then([etcd_client::TxnOp::put("k", "v", None)]);
    assert_eq!(refused(c.txn(txn).await.unwrap_err()), want);
    assert_eq!(refused(c.lease_grant(10, None).await.unwrap_err()), want);
    assert_eq!(refused(c.lease_revoke(7).await.unwrap_err()), want);
    assert_eq!(refused(c.compact(1, None).await.unwrap_err()), want);

    // Reads, read-only txns, watches and status work.
    assert_eq!(c.get("k", None).await?.count(), 0);
    let ro = etcd_client::Txn::new().and_then([etcd_client::TxnOp::get("k", None)]);
    assert!(c.txn(ro).await?.succeeded());
    let (_w, _s) = c.watch("k", None).await?;
    assert_eq!(c.status().await?.header().unwrap().revision(), 1);
    c.hash_kv(0).await?;

    // etcdctl shows the same refusal.
    let out = cluster.etcdctl(&["put", "k", "v"])?;
    assert!(!out.success());
    assert!(out.stderr.contains(READ_ONLY), "{}", out.stderr);
    Ok(())
}
