//! Running the real `etcdctl` with bounded time, and helpers for its output.

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;

use crate::bins::etcdctl_bin;
use crate::process::wait_timeout;

/// etcdctl's own `--command-timeout`; the process is killed 10 s after it.
const ETCDCTL_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Output of one `etcdctl` run.
#[derive(Debug)]
pub struct CtlOutput {
    /// Exit status; a run killed at the harness's deadline never produces one (it is an error).
    pub status: ExitStatus,
    /// Stdout, lossily decoded.
    pub stdout: String,
    /// Stderr, lossily decoded.
    pub stderr: String,
}

impl CtlOutput {
    /// Whether etcdctl exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// Runs the real `etcdctl` (v3 API) with `--endpoints`, a 3 s dial and a 10 s command timeout.
///
/// The process is killed if it has not exited 10 s after its own command timeout, so a hung
/// etcdctl cannot hang the test. `ETCDCTL_*` variables of the caller are removed.
///
/// # Errors
///
/// etcdctl is missing or cannot be spawned, or it overran its deadline. A non-zero exit is not
/// an error here: check [`CtlOutput::success`], or use [`etcdctl_ok`].
pub fn etcdctl(endpoints: &[impl AsRef<str>], args: &[&str]) -> Result<CtlOutput> {
    etcdctl_with_input(endpoints, args, "")
}

/// As [`etcdctl`], with `input` on stdin (`etcdctl txn`, `etcdctl put` without a value).
///
/// # Errors
///
/// As [`etcdctl`].
pub fn etcdctl_with_input(endpoints: &[impl AsRef<str>], args: &[&str], input: &str) -> Result<CtlOutput> {
    let endpoints = endpoints.iter().map(|e| e.as_ref()).collect::<Vec<_>>().join(",");
    let mut cmd = Command::new(etcdctl_bin()?);
    cmd.arg(format!("--endpoints={endpoints}"))
        .arg("--dial-timeout=3s")
        .arg(format!("--command-timeout={}s", ETCDCTL_COMMAND_TIMEOUT.as_secs()))
        .args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCDCTL_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("ETCDCTL_API", "3");
    run_bounded(cmd, input, ETCDCTL_COMMAND_TIMEOUT + Duration::from_secs(10))
        .with_context(|| format!("etcdctl {}", args.join(" ")))
}

/// Runs [`etcdctl`] and returns its stdout.
///
/// # Errors
///
/// As [`etcdctl`], and when etcdctl exits non-zero; the error carries its stderr.
pub fn etcdctl_ok(endpoints: &[impl AsRef<str>], args: &[&str]) -> Result<String> {
    let out = etcdctl(endpoints, args)?;
    if !out.success() {
        bail!("etcdctl {} failed with {}: {}{}", args.join(" "), out.status, out.stderr, out.stdout);
    }
    Ok(out.stdout)
}

/// Runs [`etcdctl`] with `-w json` appended and parses its stdout.
///
/// Keys and values in the JSON are base64, as etcdctl prints them; see [`decode_b64`].
///
/// # Examples
///
/// ```no_run
/// # fn main() -> anyhow::Result<()> {
/// use meridian_tests::{decode_b64, etcdctl_json, EtcdCluster};
///
/// let etcd = EtcdCluster::start(1)?;
/// etcd.etcdctl_ok(&["put", "a", "1"])?;
/// let resp = etcdctl_json(&etcd.endpoints(), &["get", "a"])?;
/// assert_eq!(decode_b64(resp["kvs"][0]["value"].as_str().unwrap())?, b"1");
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// As [`etcdctl_ok`], and when stdout is not JSON.
pub fn etcdctl_json(endpoints: &[impl AsRef<str>], args: &[&str]) -> Result<serde_json::Value> {
    let mut args = args.to_vec();
    args.extend(["-w", "json"]);
    let stdout = etcdctl_ok(endpoints, &args)?;
    serde_json::from_str(&stdout).with_context(|| format!("etcdctl {} printed no JSON: {stdout}", args.join(" ")))
}

/// Decodes standard base64, the encoding of keys and values in `etcdctl -w json`.
///
/// # Errors
///
/// `s` is not valid base64.
pub fn decode_b64(s: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).with_context(|| format!("not base64: {s:?}"))
}

/// Every run of 10 to 16 lowercase hex digits (a member or cluster id) becomes `ID`.
pub fn mask_hex_ids(s: &str) -> String {
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let hex =
            (10..=16).contains(&word.len()) && word.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
        out.push_str(if hex && word.chars().any(|c| c.is_ascii_digit()) { "ID" } else { word });
        word.clear();
    };
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Asserts that a session run against Meridian printed, step by step, what the same session
/// printed against etcd, and that etcd's showed each of `expected` (so the session checks
/// something).
///
/// # Panics
///
/// On the first step that differs, a different number of steps, or an expected text missing.
pub fn assert_same_steps(etcd: &[String], meridian: &[String], expected: &[&str]) {
    for (i, (e, m)) in etcd.iter().zip(meridian).enumerate() {
        assert_eq!(m, e, "step {i}: meridian (left) and etcd (right) differ");
    }
    assert_eq!(meridian.len(), etcd.len(), "the sessions have different numbers of steps");
    let all = etcd.join("\n");
    for want in expected {
        assert!(all.contains(want), "the session never showed {want:?}:\n{all}");
    }
}

/// Replaces the values of `cluster_id`, `member_id` and `raft_term` in JSON
/// output with `N`: they differ between any two clusters by nature.
pub fn mask_ids(s: &str) -> String {
    let mut s = s.to_string();
    for field in ["cluster_id", "member_id", "raft_term"] {
        let pat = format!("\"{field}\":");
        let mut at = 0;
        while let Some(i) = s[at..].find(&pat) {
            let start = at + i + pat.len();
            let end = s[start..].find(|c: char| !c.is_ascii_digit()).map_or(s.len(), |e| start + e);
            s.replace_range(start..end, "N");
            at = start;
        }
    }
    s
}

/// Runs a long-lived etcdctl command (such as `watch`) for `run_for`, then
/// stops it, and returns what it printed: stdout, then stderr without
/// etcdctl's own timestamped log lines.
pub fn etcdctl_with_timeout(endpoints: &[impl AsRef<str>], args: &[&str], run_for: Duration) -> Result<String> {
    let endpoints = endpoints.iter().map(|e| e.as_ref()).collect::<Vec<_>>().join(",");
    let mut cmd = Command::new(etcdctl_bin()?);
    cmd.arg(format!("--endpoints={endpoints}")).arg("--dial-timeout=3s").args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCDCTL_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("ETCDCTL_API", "3").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawn {:?}", cmd.get_program()))?;
    let stdout = read_pipe(child.stdout.take());
    let stderr = read_pipe(child.stderr.take());
    if wait_timeout(&mut child, run_for)?.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut out = join_pipe(stdout);
    for line in join_pipe(stderr).lines().filter(|l| !l.starts_with("{\"level\"")) {
        out.push_str(line);
        out.push('\n');
    }
    Ok(out)
}

/// Runs `cmd` with `input` on stdin, collecting stdout and stderr; kills it after `limit`.
fn run_bounded(mut cmd: Command, input: &str, limit: Duration) -> Result<CtlOutput> {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawn {:?}", cmd.get_program()))?;
    // Readers run on threads so a full pipe cannot block the child while we wait for it.
    let stdout = read_pipe(child.stdout.take());
    let stderr = read_pipe(child.stderr.take());
    if let Some(mut stdin) = child.stdin.take() {
        // A child that exits without reading its stdin closes the pipe; that is not our error.
        let _ = stdin.write_all(input.as_bytes());
    }
    let Some(status) = wait_timeout(&mut child, limit)? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("still running after {limit:?}; killed");
    };
    Ok(CtlOutput { status, stdout: join_pipe(stdout), stderr: join_pipe(stderr) })
}

fn read_pipe(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

fn join_pipe(handle: JoinHandle<Vec<u8>>) -> String {
    String::from_utf8_lossy(&handle.join().unwrap_or_default()).into_owned()
}
