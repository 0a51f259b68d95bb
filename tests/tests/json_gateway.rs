//! etcd's JSON gateway (`POST /v3/...`), as the `curl` recipes of etcd's docs use it: the same
//! requests to real etcd 3.4, to Meridian and through a gateway, answers compared once the ids that differ by
//! nature (cluster, member, lease) are set aside.

use std::net::SocketAddr;

use anyhow::Result;
use meridian_tests::{http_post, Cluster, ClusterOpts, EtcdCluster, GatewayProcess};
use serde_json::Value;

/// Drops what differs between two servers by nature: ids, the raft term, sizes and indexes.
fn normalize(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for key in [
                "cluster_id",
                "member_id",
                "raft_term",
                "ID",
                "leader",
                "dbSize",
                "dbSizeInUse",
                "raftIndex",
                "raftAppliedIndex",
                "raftTerm",
            ] {
                if map.contains_key(key) {
                    map.insert(key.into(), Value::from("…"));
                }
            }
            map.values_mut().for_each(normalize);
        }
        Value::Array(items) => items.iter_mut().for_each(normalize),
        _ => {}
    }
}

/// An answer as compared: the status, and the body as JSON (or text), normalized. A parse
/// error's message is the parser's own, so only its code is kept.
fn answer(addr: SocketAddr, path: &str, body: &str) -> Result<String> {
    let (status, text) = http_post(addr, path, body)?;
    let mut lines = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Ok(mut v) => {
                normalize(&mut v);
                if v.get("code") == Some(&Value::from(3)) && body.contains("\"x\"") {
                    v["error"] = "(parser's message)".into();
                    v["message"] = "(parser's message)".into();
                }
                lines.push(v.to_string());
            }
            Err(_) => lines.push(line.trim().to_string()),
        }
    }
    Ok(format!("{status} {}", lines.join("\n")))
}

const SCRIPT: &[(&str, &str)] = &[
    ("/v3/kv/put", r#"{"key": "Zm9v", "value": "YmFy"}"#),
    ("/v3/kv/put", r#"{"key": "Zm9vMg==", "value": "YmF6", "prev_kv": true}"#),
    ("/v3/kv/range", r#"{"key": "Zm9v"}"#),
    ("/v3/kv/range", r#"{"key": "Zm9v", "range_end": "Zm9w", "keys_only": true, "sort_order": "DESCEND"}"#),
    ("/v3beta/kv/range", r#"{"key": "Zm9v", "range_end": "Zm9w", "count_only": true}"#),
    ("/v3/kv/range", r#"{"key": "Zm9v", "limit": "x"}"#),
    ("/v3/kv/range", r#"{"key": ""}"#),
    (
        "/v3/kv/txn",
        r#"{"compare":[{"target":"CREATE","key":"Zm9v","createRevision":"2"}],"success":[{"requestPut":{"key":"Zm9v","value":"YmFy"}}]}"#,
    ),
    (
        "/v3/kv/txn",
        r#"{"compare":[{"result":"EQUAL","target":"VALUE","key":"Zm9v","value":"bm8="}],"failure":[{"request_range":{"key":"Zm9v"}}]}"#,
    ),
    ("/v3/kv/deleterange", r#"{"key": "Zm9vMg==", "prev_kv": true}"#),
    ("/v3/kv/compaction", r#"{"revision": "3"}"#),
    ("/v3/kv/range", r#"{"key": "Zm9v", "revision": "2"}"#),
    ("/v3/lease/grant", r#"{"TTL": 30, "ID": 7}"#),
    ("/v3/lease/timetolive", r#"{"ID": 7}"#),
    ("/v3/kv/lease/revoke", r#"{"ID": 7}"#),
    ("/v3/lease/revoke", r#"{"ID": 7}"#),
    ("/v3/lease/grant", r#"{"TTL": 30, "ID": 8}"#),
    ("/v3/lease/keepalive", r#"{"ID": 8}"#),
    ("/v3/lease/keepalive", r#"{"ID": 99}"#),
    ("/v3/election/campaign", r#"{"name": "ZQ==", "value": "YQ==", "lease": 8}"#),
    ("/v3/election/leader", r#"{"name": "ZQ=="}"#),
    ("/v3/election/observe", r#"{"name": "ZQ=="}"#),
    ("/v3/lease/revoke", r#"{"ID": 8}"#),
    ("/v3/maintenance/status", "{}"),
    ("/v3/kv/bogus", "{}"),
    ("/v3/watch", r#"{"create_request": {"key": "Zm9v", "start_revision": "3"}}"#),
];

#[test]
fn curl_recipes_answer_as_etcd_does() -> Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let meridian = Cluster::start(1, ClusterOpts::default())?;
    // A second cluster behind a gateway, which forwards to its leader.
    let behind = Cluster::start(1, ClusterOpts::default())?;
    let gw = GatewayProcess::start("gw", "default", &[("default", behind.endpoints())], &[])?;
    let mut seen = Vec::new();
    for addr in [etcd.endpoint(1), meridian.endpoint(1), gw.endpoint()] {
        let addr: SocketAddr = addr.parse()?;
        let answers: Vec<String> = SCRIPT.iter().map(|(path, body)| answer(addr, path, body)).collect::<Result<_>>()?;
        seen.push(answers);
    }
    for (who, answers) in [("meridian", &seen[1]), ("a gateway", &seen[2])] {
        for (i, (want, got)) in seen[0].iter().zip(answers).enumerate() {
            assert_eq!(got, want, "{who}: {} {}", SCRIPT[i].0, SCRIPT[i].1);
        }
    }
    // Observe streamed the leader's value; a keep-alive answered with the TTL.
    let at = |path: &str| SCRIPT.iter().position(|(p, _)| *p == path).expect("in the script");
    assert!(seen[1][at("/v3/election/observe")].contains("\"value\":\"YQ==\""), "{:?}", seen[1]);
    assert!(seen[1][at("/v3/lease/keepalive")].contains("\"TTL\":\"30\""), "{:?}", seen[1]);
    // The watch saw the history from revision 3 on, then stayed open.
    let watch = seen[1].last().expect("a watch answer");
    assert!(watch.contains("\"created\":true") && watch.contains("\"mod_revision\":\"4\""), "{watch}");
    Ok(())
}
