//! A client port must not hand its memory to whoever connects: raw HTTP/2 clients that declare
//! huge frames, or send CONTINUATION frames without end, are disconnected with a protocol error,
//! the member's memory stays flat, and other clients are served meanwhile.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use meridian_tests::{Cluster, ClusterOpts};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// What each attacking connection tries to send.
const ATTACK_BYTES: usize = 24 << 20;
/// Attacking connections of each kind.
const CONNECTIONS: usize = 4;
const GOAWAY: u8 = 0x7;
const FRAME_SIZE_ERROR: u32 = 0x6;

fn frame(kind: u8, flags: u8, stream: u32, len: usize, payload: &[u8]) -> Vec<u8> {
    let mut f = (len as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The opening bytes and a repeated chunk of one attack.
fn attack(kind: &str) -> (Vec<u8>, Vec<u8>) {
    let mut open = PREFACE.to_vec();
    open.extend(frame(0x4, 0, 0, 0, &[]));
    match kind {
        // A DATA frame that declares 16 MiB, then its bytes.
        "huge-frame" => {
            open.extend(frame(0x0, 0, 1, (1 << 24) - 1, &[]));
            (open, vec![0u8; 64 * 1024])
        }
        // HEADERS without END_HEADERS, then CONTINUATION frames that never end the block.
        "endless-continuation" => {
            open.extend(frame(0x1, 0, 1, 1, &[0x83]));
            let mut chunk = Vec::new();
            for _ in 0..4 {
                chunk.extend(frame(0x9, 0, 1, 16_000, &[0x40; 16_000]));
            }
            (open, chunk)
        }
        other => panic!("no attack {other}"),
    }
}

/// Runs one attack; returns the bytes the member took before it closed the connection, and
/// whether it said GOAWAY(FRAME_SIZE_ERROR) first.
fn run_attack(endpoint: &str, kind: &str) -> Result<(usize, bool)> {
    let (open, chunk) = attack(kind);
    let mut s = TcpStream::connect(endpoint)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&open)?;
    let mut sent = open.len();
    let closed = loop {
        if sent >= ATTACK_BYTES {
            break false;
        }
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("{kind}: the member neither read nor closed the connection after {sent} bytes")
            }
            Err(_) => break true,
        }
    };
    if !closed {
        bail!("{kind}: the member took all {sent} bytes without closing the connection");
    }
    // Whatever the member wrote before it closed: its SETTINGS, then the GOAWAY.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok((sent, has_goaway(&got, FRAME_SIZE_ERROR)))
}

fn has_goaway(mut bytes: &[u8], code: u32) -> bool {
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let Some(payload) = bytes.get(9..9 + len) else { return false };
        if bytes[3] == GOAWAY && payload.len() >= 8 {
            return u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]) == code;
        }
        bytes = &bytes[9 + len..];
    }
    false
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

#[test]
fn frames_past_the_limits_close_the_connection_and_memory_stays_flat() -> Result<()> {
    let cluster = Cluster::start(1, ClusterOpts::default())?;
    let pid = cluster.pid(1).context("member pid")?;
    cluster.etcdctl_ok(&["put", "before", "1"])?;
    let rss_before = rss_kib(pid)?;
    let started = Instant::now();
    for kind in ["huge-frame", "endless-continuation"] {
        for n in 0..CONNECTIONS {
            let (sent, goaway) = run_attack(&cluster.endpoint(1), kind)?;
            assert!(sent < ATTACK_BYTES / 2, "{kind} #{n}: {sent} bytes taken before the close");
            assert!(goaway, "{kind} #{n}: closed without GOAWAY(FRAME_SIZE_ERROR)");
        }
        // Other clients are served meanwhile.
        assert_eq!(cluster.etcdctl_ok(&["put", kind, "ok"])?.trim(), "OK");
        assert_eq!(cluster.etcdctl_ok(&["get", kind, "--print-value-only"])?.trim(), "ok");
    }
    let grown = rss_kib(pid)?.saturating_sub(rss_before);
    eprintln!("RSS grew by {grown} KiB over {} attacks in {:?}", 2 * CONNECTIONS, started.elapsed());
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB under the attacks");
    Ok(())
}
