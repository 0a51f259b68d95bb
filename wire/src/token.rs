//! The mirror token: a shared secret, read from a file on both the secondary
//! (`meridian node --mirror-token-file`) and the mirror (`meridian mirror
//! --mirror-token-file`), and carried by every `Mirror.Apply` in the
//! [`TOKEN_METADATA`] gRPC metadata. It stands in for auth until auth exists.
//! Heartbeats carry a time from [`unix_ms`].

use std::path::Path;

/// The gRPC metadata key that carries the mirror token.
pub const TOKEN_METADATA: &str = "x-meridian-mirror-token";

/// Reads a token file: its contents, trimmed, which must be one line of
/// printable ASCII (it travels as gRPC metadata).
///
/// # Errors
///
/// A message naming `--mirror-token-file` and the file, for an unreadable,
/// empty or non-printable token.
pub fn read_token(path: &Path) -> Result<String, String> {
    let token = std::fs::read_to_string(path).map_err(|e| format!("--mirror-token-file {}: {e}", path.display()))?;
    let token = token.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("--mirror-token-file {}: the token must be one line of printable ASCII", path.display()));
    }
    Ok(token.to_string())
}

/// Unix time in ms: the clock a heartbeat's source time is written with (on
/// the mirror) and read against (on the secondary).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Compares two secrets without stopping at the first difference, so the
/// time taken tells nothing of how much of a guess was right.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files() {
        let dir = std::env::temp_dir().join(format!("meridian-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(read_token(&file).unwrap(), "s3cret");
        for bad in ["", " \n", "two words"] {
            std::fs::write(&file, bad).unwrap();
            assert!(read_token(&file).unwrap_err().contains("--mirror-token-file"), "{bad:?}");
        }
        assert!(read_token(&dir.join("missing")).unwrap_err().contains("missing"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
        assert!(!same_secret(b"", b"a"));
    }
}
