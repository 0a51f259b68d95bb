//! Member URLs (`--listen-client-urls`, `--initial-cluster`, ...) and
//! endpoint lists (`--endpoints`, `--source`), on [`http::Uri`].
//!
//! etcd's flags take `http://host:port` or `https://host:port`,
//! comma-separated; endpoint lists also take a bare `host:port` (plain
//! HTTP), as etcdctl does. Both are parsed here once,
//! so every process accepts and refuses the same spellings with the same
//! messages.

use std::fmt;

use http::uri::{Scheme, Uri};

/// Why a URL was refused; the message names the URL and says what is wanted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("URL {0:?} must look like http://host:port, https://host:port or unix://name")]
    Malformed(String),
}

/// One `http://host:port` or `https://host:port` URL, checked; or, as etcd
/// takes them, `unix://name` (`unixs://` with TLS): a socket file `name`,
/// relative to the working directory (etcd's tests use `unix://localhost:N`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    uri: Uri,
    tls: bool,
    unix: bool,
    /// `host:port`, as written.
    authority: String,
}

impl Url {
    /// Parses a member URL: `http://host:port` or `https://host:port`,
    /// with an optional path.
    ///
    /// # Examples
    ///
    /// ```
    /// let u = meridian_wire::url::Url::parse("http://127.0.0.1:2379").unwrap();
    /// assert_eq!(u.host_port(), "127.0.0.1:2379");
    /// assert!(meridian_wire::url::Url::parse("127.0.0.1:2379").is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// [`UrlError::Malformed`] for anything that is not `http(s)://host:port`
    /// or `unix(s)://name`.
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let s = s.trim();
        let malformed = || UrlError::Malformed(s.to_string());
        if let Some((scheme, name)) = s.split_once("://").filter(|(scheme, _)| *scheme == "unix" || *scheme == "unixs")
        {
            let name = name.trim_end_matches('/');
            if name.is_empty() || name.contains(['/', '@', '?', '#']) {
                return Err(malformed());
            }
            let uri: Uri = s.parse().map_err(|_| malformed())?;
            return Ok(Self { uri, tls: scheme == "unixs", unix: true, authority: name.to_string() });
        }
        let uri: Uri = s.parse().map_err(|_| malformed())?;
        let tls = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => false,
            Some(s) if *s == Scheme::HTTPS => true,
            _ => return Err(malformed()),
        };
        let authority = uri.authority().ok_or_else(malformed)?;
        if authority.port_u16().is_none() || authority.host().is_empty() || authority.as_str().contains('@') {
            return Err(malformed());
        }
        let authority = authority.as_str().to_string();
        Ok(Self { uri, tls, unix: false, authority })
    }

    /// Parses an endpoint: a member URL, or a bare `host:port` taken as `http://`.
    ///
    /// # Errors
    ///
    /// As [`Url::parse`].
    pub fn parse_endpoint(s: &str) -> Result<Self, UrlError> {
        let s = s.trim();
        if s.contains("://") {
            Self::parse(s)
        } else {
            Self::parse(&format!("http://{s}")).map_err(|_| UrlError::Malformed(s.to_string()))
        }
    }

    /// `host:port`, what a listener binds and a client dials (for `unix://`,
    /// the socket file's name).
    pub fn host_port(&self) -> &str {
        &self.authority
    }

    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// `https://` or `unixs://`.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// `unix://` or `unixs://`: a socket file, not TCP.
    pub fn is_unix(&self) -> bool {
        self.unix
    }

    /// The host alone (an IPv6 address without its brackets).
    pub fn host(&self) -> &str {
        let host = self.uri.host().unwrap_or_default();
        host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
    }
}

impl fmt::Display for Url {
    /// `http(s)://host:port`, without a trailing slash, as etcd prints member URLs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.uri.path();
        let scheme = match (self.unix, self.tls) {
            (false, false) => "http",
            (false, true) => "https",
            (true, false) => "unix",
            (true, true) => "unixs",
        };
        if self.unix {
            return write!(f, "{scheme}://{}", self.authority);
        }
        write!(f, "{scheme}://{}{}", self.authority, if path == "/" { "" } else { path })
    }
}

/// Parses a comma-separated list of member URLs; empty items are skipped.
///
/// # Errors
///
/// The first URL that does not parse.
pub fn parse_list(s: &str) -> Result<Vec<Url>, UrlError> {
    s.split(',').map(str::trim).filter(|u| !u.is_empty()).map(Url::parse).collect()
}

/// Parses a comma-separated endpoint list (`host:port` or URLs).
///
/// # Errors
///
/// The first endpoint that does not parse.
pub fn parse_endpoints(s: &str) -> Result<Vec<Url>, UrlError> {
    s.split(',').map(str::trim).filter(|u| !u.is_empty()).map(Url::parse_endpoint).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_urls() {
        let ok = [
            ("http://127.0.0.1:2379", "127.0.0.1:2379", "http://127.0.0.1:2379"),
            ("http://localhost:2380/", "localhost:2380", "http://localhost:2380"),
            (" http://[::1]:2379 ", "[::1]:2379", "http://[::1]:2379"),
            ("http://m1.example:12379", "m1.example:12379", "http://m1.example:12379"),
            ("https://127.0.0.1:2379/", "127.0.0.1:2379", "https://127.0.0.1:2379"),
            ("unix://localhost:2379", "localhost:2379", "unix://localhost:2379"),
            ("unixs://m1.sock", "m1.sock", "unixs://m1.sock"),
        ];
        for (input, host_port, shown) in ok {
            let u = Url::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!((u.host_port(), u.to_string().as_str()), (host_port, shown), "{input}");
        }
        let bad = [
            ("127.0.0.1:2379", UrlError::Malformed("127.0.0.1:2379".into())),
            ("http://127.0.0.1", UrlError::Malformed("http://127.0.0.1".into())),
            ("http://:2379", UrlError::Malformed("http://:2379".into())),
            ("ftp://h:1", UrlError::Malformed("ftp://h:1".into())),
            ("http://u@h:1", UrlError::Malformed("http://u@h:1".into())),
            ("http://h:99999", UrlError::Malformed("http://h:99999".into())),
            ("unix://", UrlError::Malformed("unix://".into())),
            ("unix://a/b", UrlError::Malformed("unix://a/b".into())),
            ("", UrlError::Malformed(String::new())),
        ];
        for (input, want) in bad {
            assert_eq!(Url::parse(input), Err(want), "{input}");
        }
    }

    #[test]
    fn endpoint_lists() {
        let eps = parse_endpoints("127.0.0.1:1, http://h:2,,").unwrap();
        let shown: Vec<String> = eps.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["http://127.0.0.1:1", "http://h:2"]);
        assert_eq!(parse_endpoints("h"), Err(UrlError::Malformed("h".into())));
        assert_eq!(parse_list("http://a:1,b:2"), Err(UrlError::Malformed("b:2".into())));
    }
}
