//! The lab's layout: which ports and paths every member, gateway, mirror and relay gets, the
//! round trips between regions, and `lab.json`, where it is kept so a second `meridian lab`
//! resumes the same lab.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::*;

/// One member of a region's cluster.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MemberLayout {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RegionLayout {
    pub name: String,
    pub role: String,
    pub members: Vec<MemberLayout>,
    pub gateway_url: String,
    pub dashboard_url: String,
    pub gateway_metrics: String,
    pub mirror_metrics: String,
    /// For every other region: the relay ports this region dials it by, one
    /// per member of that region, in member order.
    pub relays: BTreeMap<String, Vec<String>>,
    /// For every other region: the relay port this region dials that
    /// region's control member by.
    pub control_relays: BTreeMap<String, String>,
}

/// What `lab.json` holds: everything a program needs to drive the lab.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Layout {
    /// The lab's admin API (`meridian lab status`, `kill`, ...).
    pub admin_url: String,
    pub regions: Vec<RegionLayout>,
    /// The control cluster (primary lease, auto-failover): one member per region.
    pub control: Vec<MemberLayout>,
    /// Round trips between regions, in ms, `"a:b"` → ms.
    pub rtt_ms: BTreeMap<String, u64>,
    pub mirror_token_file: PathBuf,
}

/// The round trip between two regions.
pub(crate) fn rtt(table: &BTreeMap<String, u64>, a: &str, b: &str) -> u64 {
    table.get(&format!("{a}:{b}")).or_else(|| table.get(&format!("{b}:{a}"))).copied().unwrap_or(0)
}

/// `--latency`: the round-trip table.
///
/// # Errors
///
/// A value that is neither a duration nor `a:b=duration` pairs of known regions.
pub fn parse_latency(s: Option<&str>) -> Result<BTreeMap<String, u64>> {
    let mut table: BTreeMap<String, u64> = DEFAULT_RTT_MS.iter().map(|(a, b, ms)| (format!("{a}:{b}"), *ms)).collect();
    let Some(s) = s.map(str::trim).filter(|s| !s.is_empty()) else { return Ok(table) };
    let ms = |v: &str| -> Result<u64> {
        if v == "0" {
            return Ok(0);
        }
        let d = meridian_wire::duration::parse_duration(v)
            .ok_or_else(|| anyhow::anyhow!("--latency: {v:?} is not a duration like 64ms"))?;
        Ok(d.as_millis() as u64)
    };
    if !s.contains('=') {
        let all = ms(s)?;
        for v in table.values_mut() {
            *v = all;
        }
        return Ok(table);
    }
    for pair in s.split(',') {
        let (regions, v) =
            pair.split_once('=').ok_or_else(|| anyhow::anyhow!("--latency: {pair:?} is not a:b=duration"))?;
        let (a, b) =
            regions.split_once(':').ok_or_else(|| anyhow::anyhow!("--latency: {regions:?} is not two regions a:b"))?;
        let (a, b) = (a.trim(), b.trim());
        if !REGIONS.contains(&a) || !REGIONS.contains(&b) || a == b {
            bail!("--latency: {a}:{b} is not a pair of the lab's regions ({})", REGIONS.join(", "));
        }
        table.remove(&format!("{b}:{a}"));
        table.insert(format!("{a}:{b}"), ms(v.trim())?);
    }
    Ok(table)
}

impl Layout {
    /// The lab's layout: ports from `base`, data under `dir`.
    pub fn new(dir: &Path, members: usize, base: u16, rtt_ms: BTreeMap<String, u64>) -> Self {
        let mut port = base;
        let mut next = || {
            port += 1;
            port
        };
        let url = |p: u16| format!("http://127.0.0.1:{p}");
        let mut regions: Vec<RegionLayout> = REGIONS
            .iter()
            .enumerate()
            .map(|(i, name)| RegionLayout {
                name: name.to_string(),
                role: if i == 0 { "primary" } else { "secondary" }.into(),
                members: (1..=members)
                    .map(|m| MemberLayout {
                        name: format!("{name}-{m}"),
                        client_url: url(next()),
                        peer_url: url(next()),
                        data_dir: dir.join(name).join(format!("m{m}")),
                    })
                    .collect(),
                gateway_url: String::new(),
                dashboard_url: String::new(),
                gateway_metrics: String::new(),
                mirror_metrics: String::new(),
                relays: BTreeMap::new(),
                control_relays: BTreeMap::new(),
            })
            .collect();
        for r in &mut regions {
            let gw = next();
            r.gateway_url = url(gw);
            r.gateway_metrics = format!("127.0.0.1:{}", next());
            r.dashboard_url = format!("http://{}/dashboard", r.gateway_metrics);
            r.mirror_metrics = format!("127.0.0.1:{}", next());
        }
        for i in 0..regions.len() {
            for j in 0..regions.len() {
                if i != j {
                    let ports = (0..members).map(|_| format!("127.0.0.1:{}", next())).collect();
                    let other = regions[j].name.clone();
                    regions[i].relays.insert(other.clone(), ports);
                    regions[i].control_relays.insert(other, format!("127.0.0.1:{}", next()));
                }
            }
        }
        let control = REGIONS
            .iter()
            .map(|name| MemberLayout {
                name: format!("control-{name}"),
                client_url: url(next()),
                peer_url: url(next()),
                data_dir: dir.join("control").join(name),
            })
            .collect();
        Self { admin_url: url(base), regions, control, rtt_ms, mirror_token_file: dir.join("mirror.token") }
    }

    pub fn region(&self, name: &str) -> &RegionLayout {
        self.regions.iter().find(|r| r.name == name).expect("a lab region")
    }

    /// Every endpoint that serves `/metrics`, as Prometheus file-based
    /// discovery reads it (`deploy/prometheus/prometheus.yml` points at
    /// `lab.meridian/prometheus-targets.json`): one group per job and region.
    pub fn prometheus_targets(&self) -> serde_json::Value {
        let group = |job: &str, region: &str, targets: Vec<&str>| serde_json::json!({ "targets": targets, "labels": { "job": job, "region": region } });
        let mut groups = Vec::new();
        for r in &self.regions {
            groups.push(group("meridian-node", &r.name, r.members.iter().map(|m| host_port(&m.client_url)).collect()));
            groups.push(group("meridian-gateway", &r.name, vec![&r.gateway_metrics]));
            groups.push(group("meridian-mirror", &r.name, vec![&r.mirror_metrics]));
        }
        for (m, r) in self.control.iter().zip(&self.regions) {
            groups.push(group("meridian-control", &r.name, vec![host_port(&m.client_url)]));
        }
        serde_json::Value::Array(groups)
    }

    /// How region `from`'s members reach the control cluster: their own
    /// region's member directly, the others through relays.
    pub fn control_endpoints(&self, from: &str) -> Vec<String> {
        REGIONS
            .iter()
            .zip(&self.control)
            .map(|(name, m)| {
                if *name == from {
                    m.client_url.clone()
                } else {
                    format!("http://{}", self.region(from).control_relays[*name])
                }
            })
            .collect()
    }

    /// How region `from` reaches region `to`: its relays, or the members
    /// themselves for its own region.
    pub fn endpoints(&self, from: &str, to: &str) -> Vec<String> {
        if from == to {
            return self.region(to).members.iter().map(|m| m.client_url.clone()).collect();
        }
        self.region(from).relays[to].iter().map(|p| format!("http://{p}")).collect()
    }
}

/// Prints what the lab is and where (also in `lab.json`).
pub fn print_table(layout: &Layout) {
    println!();
    println!("{:<10} {:<10} {:<18} {:<38} members", "region", "role", "gateway", "dashboard");
    for r in &layout.regions {
        let members: Vec<&str> = r.members.iter().map(|m| host_port(&m.client_url)).collect();
        let (gw, dash) = (host_port(&r.gateway_url), &r.dashboard_url);
        println!("{:<10} {:<10} {:<18} {:<38} {}", r.name, r.role, gw, dash, members.join(","));
    }
    let pairs: Vec<String> = layout.rtt_ms.iter().map(|(k, v)| format!("{k} {v} ms")).collect();
    println!("round trips: {}", pairs.join(", "));
    println!("open the lag dashboard: {}", layout.regions[0].dashboard_url);
    println!("admin: {} (meridian lab status | kill | restart | partition | heal | latency | ...)", layout.admin_url);
    println!("try: etcdctl --endpoints={} put greeting hello", host_port(&layout.regions[1].gateway_url));
    println!("     etcdctl --endpoints={} get greeting", host_port(&layout.regions[2].gateway_url));
    println!("Ctrl-C stops the lab; `meridian lab` again resumes it, `--fresh` starts over.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_tables() {
        let t = parse_latency(None).unwrap();
        assert_eq!(rtt(&t, "eu-west", "us-east"), 64);
        assert_eq!(rtt(&t, "ap-south", "eu-west"), 146);
        let t = parse_latency(Some("20ms")).unwrap();
        assert!(t.values().all(|v| *v == 20));
        let t = parse_latency(Some("eu-west:ap-south=10ms")).unwrap();
        assert_eq!((rtt(&t, "ap-south", "eu-west"), rtt(&t, "us-east", "eu-west")), (10, 64));
        assert!(parse_latency(Some("us-east:mars=5ms")).is_err());
        assert!(parse_latency(Some("fast")).is_err());
    }

    #[test]
    fn layouts_have_distinct_ports_and_relays_for_every_pair() {
        let l = Layout::new(Path::new("lab"), 3, 23000, parse_latency(None).unwrap());
        let mut ports = Vec::new();
        for r in &l.regions {
            ports.extend(r.members.iter().flat_map(|m| [m.client_url.clone(), m.peer_url.clone()]));
            ports.extend([r.gateway_url.clone(), r.gateway_metrics.clone(), r.mirror_metrics.clone()]);
            ports.extend(r.relays.values().flatten().cloned());
            ports.extend(r.control_relays.values().cloned());
            assert_eq!(r.relays.len(), 2);
        }
        ports.extend(l.control.iter().flat_map(|m| [m.client_url.clone(), m.peer_url.clone()]));
        ports.push(l.admin_url.clone());
        let mut ports: Vec<String> = ports.iter().map(|p| host_port(p).to_string()).collect();
        let n = ports.len();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), n, "every port once");
        assert_eq!(l.endpoints("eu-west", "us-east").len(), 3);
        assert_eq!(l.endpoints("us-east", "us-east")[0], l.regions[0].members[0].client_url);
    }
}
