//! Plain HTTP/1.1 GETs against a member: `/health` for readiness, and any other path.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Result};

/// Checks one member: `GET /health` over a plain HTTP/1.1 connection must answer 200 with a body
/// containing `true`.
///
/// # Errors
///
/// Connection failure, timeout (2 s), another status, or a body without `true`.
pub fn check_health(addr: SocketAddr) -> Result<()> {
    let (status, body) = http_get(addr, "/health")?;
    if status != 200 {
        bail!("status {status}, body {body:?}");
    }
    if !body.contains("true") {
        bail!("unhealthy: {body:?}");
    }
    Ok(())
}

/// A plain HTTP/1.1 GET of `path` on `addr`: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http_request(addr, &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"))
}

/// A plain HTTP/1.1 POST of `body` (JSON) to `path` on `addr`: the status code and the body,
/// as `curl -X POST -d` sends it.
pub fn http_post(addr: SocketAddr, path: &str, body: &str) -> Result<(u16, String)> {
    http_post_with(addr, path, &[], body)
}

/// [`http_post`] with more header lines (`("Authorization", token)`).
pub fn http_post_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Result<(u16, String)> {
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    http_request(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
             {extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn http_request(addr: SocketAddr, request: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    // One write: `write!` would issue one syscall per piece.
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    // The server closes after the response (Connection: close); a timeout keeps what arrived.
    if let Err(err) = stream.take(4 * 1024 * 1024).read_to_end(&mut response) {
        if response.is_empty() {
            return Err(err.into());
        }
    }
    let response = String::from_utf8_lossy(&response);
    let status_line = response.lines().next().unwrap_or_default();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !status_line.starts_with("HTTP/1.") {
        bail!("not an HTTP response: {status_line:?}");
    }
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    let body = if chunked { dechunk(body) } else { body.to_string() };
    let status = status_line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, body))
}

/// The body of a `Transfer-Encoding: chunked` response (etcd's /metrics is one): each chunk is
/// its hex size, CRLF, the bytes, CRLF; a zero size ends it. Sizes count bytes, so this works on
/// bytes and decodes the text at the end.
fn dechunk(body: &str) -> String {
    let (mut rest, mut out) = (body.as_bytes(), Vec::new());
    while let Some(at) = rest.windows(2).position(|w| w == b"\r\n") {
        let line = String::from_utf8_lossy(&rest[..at]);
        let size = usize::from_str_radix(line.split(';').next().unwrap_or_default().trim(), 16).unwrap_or(0);
        let after = &rest[at + 2..];
        out.extend_from_slice(&after[..after.len().min(size)]);
        if size == 0 || after.len() <= size {
            break;
        }
        rest = after[size..].strip_prefix(b"\r\n").unwrap_or(&after[size..]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(super::dechunk("4\r\netcd\r\n6\r\n_debug\r\n0\r\n\r\n"), "etcd_debug");
        assert_eq!(super::dechunk("3;x=y\r\nabc\r\n0\r\n"), "abc");
    }

    use super::*;

    #[test]
    fn health_check_accepts_only_200_with_true() {
        for (response, healthy) in [
            ("HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n{\"health\":\"true\"}", true),
            ("HTTP/1.1 200 OK\r\n\r\n{\"health\":\"false\",\"reason\":\"\"}", false),
            ("HTTP/1.1 503 Service Unavailable\r\n\r\n{\"health\":\"true\"}", false),
            ("HTTP/1.0 200 OK\r\n\r\n{\"health\":\"true\",\"reason\":\"\"}", true),
        ] {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let addr = listener.local_addr().unwrap();
            let server = std::thread::spawn(move || {
                let (mut conn, _) = listener.accept().unwrap();
                // Read the whole request: closing with unread input would reset the connection.
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    let n = conn.read(&mut buf).unwrap();
                    assert!(n > 0, "request ended early: {request:?}");
                    request.extend_from_slice(&buf[..n]);
                }
                assert!(request.starts_with(b"GET /health HTTP/1.1\r\n"), "{request:?}");
                conn.write_all(response.as_bytes()).unwrap();
            });
            let result = check_health(addr);
            assert_eq!(result.is_ok(), healthy, "{response}: {result:?}");
            server.join().unwrap();
        }
    }
}
