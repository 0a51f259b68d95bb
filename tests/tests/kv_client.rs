//! The KV, Txn, Compact, Maintenance and Cluster APIs through the
//! `etcd-client` crate, the way a Rust application uses them, against a
//! 3-member Meridian cluster.

use etcd_client::{
    CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse,
};
use meridian_tests::{Cluster, ClusterOpts};

#[tokio::test]
async fn kv_txn_and_compaction() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOpts::fast())?;
    let mut c = cluster.client().await?;

    let r = c.put("k1", "a", None).await?;
    let first = r.header().expect("header").revision();
    assert_eq!(first, 2, "a fresh cluster is at revision 1; the first put makes 2");
    let r = c.put("k1", "b", Some(PutOptions::new().with_prev_key())).await?;
    assert_eq!(r.prev_key().map(|kv| kv.value()), Some(&b"a"[..]));
    c.put("k2", "c", None).await?;
    c.put("k3", "d", None).await?;

    let r = c.get("k1", None).await?;
    let kv = &r.kvs()[0];
    assert_eq!((kv.create_revision(), kv.mod_revision(), kv.version()), (2, 3, 2));
    let h = r.header().expect("header");
    assert_ne!(h.cluster_id(), 0);
    assert_ne!(h.member_id(), 0);
    assert!(h.raft_term() >= 1);
    assert_eq!(h.revision(), 5);

    let r = c
        .get("k", Some(GetOptions::new().with_prefix().with_limit(2).with_sort(SortTarget::Key, SortOrder::Descend)))
        .await?;
    let keys: Vec<&[u8]> = r.kvs().iter().map(|kv| kv.key()).collect();
    assert_eq!(keys, [&b"k3"[..], b"k2"]);
    assert!(r.more());
    assert_eq!(r.count(), 3);

    let r = c.get("k1", Some(GetOptions::new().with_revision(2))).await?;
    assert_eq!(r.kvs()[0].value(), b"a", "reads at an old revision see the old value");
    let r = c.get("k", Some(GetOptions::new().with_prefix().with_count_only())).await?;
    assert_eq!((r.count(), r.kvs().len()), (3, 0));
    let r = c.get("k", Some(GetOptions::new().with_prefix().with_keys_only().with_serializable())).await?;
    assert!(r.kvs().iter().all(|kv| kv.value().is_empty()));

    // A txn: compare on value and version, with writes on the taken branch only.
    let txn = Txn::new()
        .when([Compare::value("k1", CompareOp::Equal, "b"), Compare::version("k2", CompareOp::Greater, 0)])
        .and_then([TxnOp::put("t", "yes", None), TxnOp::get("k1", None)])
        .or_else([TxnOp::put("t", "no", None)]);
    let r = c.txn(txn).await?;
    assert!(r.succeeded());
    assert_eq!(r.header().expect("header").revision(), 6);
    match &r.op_responses()[1] {
        TxnOpResponse::Get(g) => assert_eq!(g.kvs()[0].value(), b"b"),
        other => panic!("expected a get response, got {other:?}"),
    }
    let r = c
        .txn(Txn::new().when([Compare::mod_revision("k1", CompareOp::Less, 3)]).or_else([TxnOp::delete("k3", None)]))
        .await?;
    assert!(!r.succeeded());
    assert_eq!(c.get("k3", None).await?.count(), 0);

    let r = c.delete("k", Some(DeleteOptions::new().with_prefix().with_prev_key())).await?;
    assert_eq!(r.deleted(), 2);
    assert_eq!(r.prev_kvs().len(), 2);

    // Physical compaction: history before the revision is gone, after it stays.
    let now = c.get("t", None).await?.header().expect("header").revision();
    c.compact(now - 1, Some(CompactionOptions::new().with_physical())).await?;
    let err = c.get("k1", Some(GetOptions::new().with_revision(2))).await.expect_err("compacted");
    assert!(err.to_string().contains("required revision has been compacted"), "{err}");
    assert_eq!(c.get("t", Some(GetOptions::new().with_revision(now))).await?.kvs()[0].value(), b"yes");
    Ok(())
}

#[tokio::test]
async fn maintenance_and_cluster() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOpts::fast())?;
    let mut c = cluster.client().await?;
    for i in 0..20 {
        c.put(format!("key{i}"), format!("value{i}"), None).await?;
    }
    let rev = c.get("key0", None).await?.header().expect("header").revision();

    let members = c.member_list().await?;
    assert_eq!(members.members().len(), 3);
    let names: Vec<&str> = members.members().iter().map(|m| m.name()).collect();
    for want in ["m1", "m2", "m3"] {
        assert!(names.contains(&want), "{names:?}");
    }

    let mut leaders = Vec::new();
    let mut hashes = Vec::new();
    for i in 1..=3 {
        let mut mc = cluster.member_client(i).await?;
        // Wait (bounded) until this member has applied the last write.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let s = mc.status().await?;
            if s.header().expect("header").revision() >= rev || std::time::Instant::now() > deadline {
                assert_eq!(s.version(), "3.4.23");
                assert!(s.raft_index() >= s.raft_applied_index());
                assert!(s.db_size() > 0);
                leaders.push(s.leader());
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let h = mc.hash_kv(rev).await?;
        hashes.push(h.hash());
    }
    assert!(leaders.iter().all(|l| *l == leaders[0] && *l != 0), "{leaders:?}");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "HashKV differs between members: {hashes:?}");
    Ok(())
}
