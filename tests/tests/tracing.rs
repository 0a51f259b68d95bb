//! OpenTelemetry across processes: with `--otlp-endpoint` on a gateway, the primary's member, the
//! mirror and the secondary's member, one put through the gateway is one trace, received by a
//! real OTLP collector (a tonic server of the OTLP trace service, here in the test): spans from
//! every process, one root, every other span's parent in the same trace, and the chain gateway
//! routing → member request → raft propose → commit → apply → mirror apply → the secondary's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use meridian_proto::etcdserverpb::kv_client::KvClient;
use meridian_proto::etcdserverpb::PutRequest;
use meridian_tests::{lease_port, secondary_flags, Cluster, ClusterOpts, GatewayProcess, MirrorProcess};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use parking_lot::Mutex;

/// One span as the collector received it.
#[derive(Clone, Debug)]
struct Got {
    /// The exporting process: its `service.name` and `meridian.region`.
    process: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    name: String,
    attrs: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Got>>>);

fn strings(attrs: &[KeyValue]) -> HashMap<String, String> {
    attrs
        .iter()
        .filter_map(|kv| {
            let v = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), v))
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock();
        for rs in req.into_inner().resource_spans {
            let res = strings(rs.resource.as_ref().map_or(&[][..], |r| &r.attributes));
            let process = format!(
                "{}{}",
                res.get("service.name").cloned().unwrap_or_default(),
                res.get("meridian.region").map(|r| format!("@{r}")).unwrap_or_default()
            );
            for ss in rs.scope_spans {
                for sp in ss.spans {
                    got.push(Got {
                        process: process.clone(),
                        trace: sp.trace_id,
                        id: sp.span_id,
                        parent: sp.parent_span_id,
                        name: sp.name,
                        attrs: strings(&sp.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_put_through_a_gateway_is_one_trace_across_four_processes() -> Result<()> {
    let port = lease_port()?;
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port.port())).await?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let otlp = format!("http://127.0.0.1:{}", port.port());
    let traced = |mut args: Vec<String>| {
        args.extend(["--otlp-endpoint".to_string(), otlp.clone()]);
        args
    };
    let primary = Cluster::start(
        1,
        ClusterOpts { extra_args: traced(["--region", "us-east"].map(String::from).to_vec()), ..ClusterOpts::fast() },
    )?;
    let secondary = Cluster::start(
        1,
        ClusterOpts { extra_args: traced(secondary_flags("eu-west", "us-east")?), ..ClusterOpts::fast() },
    )?;
    let mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &["--otlp-endpoint", &otlp])?;
    let gateway = GatewayProcess::start(
        "gw-eu",
        "eu-west",
        &[("us-east", primary.endpoints()), ("eu-west", secondary.endpoints())],
        &["--otlp-endpoint", &otlp],
    )?;
    // The mirror follows live first: a write it would only meet in its first copy carries no trace.
    let mut direct = KvClient::connect(primary.client_url(1)).await?;
    let warm = PutRequest { key: b"warm".to_vec(), value: b"v".to_vec(), ..Default::default() };
    let warm_rev = direct.put(warm).await?.into_inner().header.context("header")?.revision;
    mirror.wait_applied(warm_rev, Duration::from_secs(20))?;
    let mut kv = KvClient::connect(format!("http://{}", gateway.endpoint())).await?;
    let put = PutRequest { key: b"traced".to_vec(), value: b"v".to_vec(), ..Default::default() };
    let rev = kv.put(put).await?.into_inner().header.context("header")?.revision;
    mirror.wait_applied(rev, Duration::from_secs(20))?;

    // The gateway's span for the put roots the trace; wait until the secondary's apply arrived.
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let got = collector.0.lock().clone();
        let root =
            got.iter().find(|s| s.name == "gateway.route" && s.attrs.get("rpc").map(String::as_str) == Some("KV/Put"));
        if let Some(root) = root {
            let trace: Vec<Got> = got.iter().filter(|s| s.trace == root.trace).cloned().collect();
            if trace.iter().any(|s| s.process == "meridian-node@eu-west" && s.name == "apply") {
                break trace;
            }
        }
        if Instant::now() > deadline {
            let seen: Vec<String> = got
                .iter()
                .map(|s| {
                    format!(
                        "{} {} trace={:02x?} parent={} {:?}",
                        s.process,
                        s.name,
                        &s.trace[..4],
                        !s.parent.is_empty(),
                        s.attrs
                    )
                })
                .collect();
            bail!("no whole trace within 30 s; got {seen:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let by_id: HashMap<&[u8], &Got> = spans.iter().map(|s| (s.id.as_slice(), s)).collect();
    let roots: Vec<&Got> = spans.iter().filter(|s| s.parent.is_empty()).collect();
    ensure!(roots.len() == 1 && roots[0].name == "gateway.route", "one root, the gateway's: {roots:#?}");
    for s in &spans {
        ensure!(
            s.parent.is_empty() || by_id.contains_key(s.parent.as_slice()),
            "{} in {} has a parent outside the trace",
            s.name,
            s.process
        );
    }
    let mut processes: Vec<&str> = spans.iter().map(|s| s.process.as_str()).collect();
    processes.sort_unstable();
    processes.dedup();
    ensure!(
        processes == ["meridian-gateway@eu-west", "meridian-mirror", "meridian-node@eu-west", "meridian-node@us-east"],
        "spans came from {processes:?}"
    );
    ensure!(
        roots[0].attrs.get("region").map(String::as_str) == Some("us-east"),
        "the route span names the region: {:?}",
        roots[0].attrs
    );

    // Walk down from the root: each step is a child of the one before.
    let chain = [
        ("meridian-gateway@eu-west", "gateway.route"),
        ("meridian-node@us-east", "etcdserver.request"),
        ("meridian-node@us-east", "raft.propose"),
        ("meridian-node@us-east", "raft.commit"),
        ("meridian-node@us-east", "apply"),
        ("meridian-mirror", "mirror.apply"),
        ("meridian-node@eu-west", "etcdserver.request"),
        ("meridian-node@eu-west", "raft.propose"),
        ("meridian-node@eu-west", "raft.commit"),
        ("meridian-node@eu-west", "apply"),
    ];
    let mut at: &Got = roots[0];
    for (process, name) in &chain[1..] {
        let next = spans
            .iter()
            .find(|s| s.parent == at.id && s.process == *process && s.name == *name)
            .with_context(|| format!("no {name} in {process} under {} ({})", at.name, at.process))?;
        at = next;
    }
    drop((gateway, mirror, secondary, primary));
    server.abort();
    Ok(())
}
