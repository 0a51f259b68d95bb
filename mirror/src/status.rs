//! `meridian mirror status`: the lag for a person.

use std::io::{Read, Write};
use std::time::Duration;

use meridian_proto::meridian::v1::mirror_client::MirrorClient;
use meridian_proto::meridian::v1::MirrorStatusRequest;

use crate::config::{endpoints, StatusFlags};

/// Prints the secondary's view (applied revision, lag reported by the
/// mirror) and, with `--metrics`, the running mirror's counters.
///
/// # Errors
///
/// Neither source of information answers.
pub async fn print_status(flags: &StatusFlags) -> anyhow::Result<()> {
    anyhow::ensure!(flags.target.is_some() || flags.metrics.is_some(), "give --target and/or --metrics");
    if let Some(target) = &flags.target {
        let mut last = None;
        for ep in endpoints("--target", target)? {
            match MirrorClient::connect(ep.clone()).await {
                Ok(mut c) => match c.status(MirrorStatusRequest::default()).await {
                    Ok(s) => {
                        let s = s.into_inner();
                        println!("target:            {ep} ({} of region {:?})", s.role, s.region);
                        println!(
                            "mirrors region:    {:?} (source cluster {:x}, epoch {})",
                            s.primary_region, s.source_cluster_id, s.epoch
                        );
                        println!("source revision:   {}", s.source_revision);
                        println!("applied revision:  {}", s.revision);
                        println!("compact revision:  {}", s.compact_revision);
                        let staleness = match s.staleness_ms {
                            ms if ms < 0 => "unknown (no mirror heartbeat yet)".to_string(),
                            ms => format!("{:.3} s", ms as f64 / 1000.0),
                        };
                        println!("lag:               {} revisions", s.lag_revisions);
                        println!("staleness:         {staleness} (since it last held all its source had)");
                        println!("apply rate:        {:.1} revisions/s", s.apply_rate);
                        println!("resyncs:           {}", s.resyncs_total);
                        println!("errors:            {}", s.errors_total);
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(anyhow::anyhow!("{ep}: {}", e.message())),
                },
                Err(e) => last = Some(anyhow::anyhow!("{ep}: {e}")),
            }
        }
        if let Some(e) = last {
            return Err(e);
        }
    }
    if let Some(addr) = &flags.metrics {
        let body = http_get(addr.trim_start_matches("http://"), "/status")?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        println!("mirror process:    {addr}");
        println!("  source revision:  {}", v["source_revision"]);
        println!("  applied revision: {}", v["applied_revision"]);
        println!(
            "  lag:              {} revisions, {:.3} s",
            v["lag_revisions"],
            v["lag_seconds"].as_f64().unwrap_or(0.0)
        );
        println!("  apply rate:       {:.1} revisions/s", v["apply_rate"].as_f64().unwrap_or(0.0));
        println!("  resyncs:          {}", v["resyncs_total"]);
        println!("  errors:           {}", v["errors_total"]);
    }
    Ok(())
}

fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .ok_or_else(|| anyhow::anyhow!("bad HTTP response from {addr}"))
}
