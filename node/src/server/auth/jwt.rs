//! JWT tokens, etcd 3.4's: `--auth-token
//! jwt,pub-key=FILE,priv-key=FILE,sign-method=ALG[,ttl=DURATION]`.
//!
//! A token's claims are `username`, `revision` (the auth revision when it
//! was signed) and `exp` (Unix seconds, `ttl` after signing; 5m by
//! default). The member that checked the password signs it; any member
//! checks it with the public key (RS*, PS*, ES*) or the shared secret in
//! `priv-key` (HS*), and the algorithm must be the configured one. Nothing
//! goes through raft, and a token outlives restarts. Once the auth store
//! changes, a token signed before is stale: KV calls answer `etcdserver:
//! revision of auth store is old` and clients authenticate again (admin
//! calls do not look at the revision, as in etcd). Without `priv-key` a
//! member only checks tokens.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

pub struct Jwt {
    algorithm: Algorithm,
    signing: Option<EncodingKey>,
    checking: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("algorithm", &self.algorithm)
            .field("signs", &self.signing.is_some())
            .field("ttl", &self.ttl)
            .finish()
    }
}

fn read(option: &str, path: &str) -> std::result::Result<Vec<u8>, String> {
    std::fs::read(Path::new(path)).map_err(|e| format!("{option} {path}: {e}"))
}

impl Jwt {
    /// The options after `jwt,` in `--auth-token`.
    ///
    /// # Errors
    ///
    /// What is wrong with them, etcd's words where it has them.
    pub fn parse(options: &str) -> std::result::Result<Self, String> {
        let (mut public, mut private, mut method, mut ttl) = (None, None, None, Duration::from_secs(300));
        for item in options.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').ok_or("auth: invalid auth options")?;
            match key {
                "pub-key" => public = Some(read("pub-key", value)?),
                "priv-key" => private = Some(read("priv-key", value)?),
                "sign-method" => method = Some(value.to_string()),
                "ttl" => {
                    ttl = meridian_wire::duration::parse_duration(value)
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| format!("ttl {value:?}: want a duration like 5m"))?;
                }
                other => tracing::warn!(option = other, "unknown JWT option; ignored"),
            }
        }
        let method = method.ok_or("auth: invalid auth signature method")?;
        let algorithm: Algorithm = method.parse().map_err(|_| "auth: invalid auth signature method".to_string())?;
        if public.is_none() && private.is_none() {
            return Err("auth: missing key data".into());
        }
        let bad = |what: &str, e: jsonwebtoken::errors::Error| format!("{what} for {method}: {e}");
        let (signing, checking) = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                let secret = private.or(public).unwrap_or_default();
                (Some(EncodingKey::from_secret(&secret)), DecodingKey::from_secret(&secret))
            }
            Algorithm::ES256 | Algorithm::ES384 => {
                let public = public.ok_or_else(|| format!("pub-key is needed for {method}"))?;
                let signing =
                    private.map(|k| EncodingKey::from_ec_pem(&k)).transpose().map_err(|e| bad("priv-key", e))?;
                (signing, DecodingKey::from_ec_pem(&public).map_err(|e| bad("pub-key", e))?)
            }
            Algorithm::EdDSA => return Err("auth: invalid auth signature method".into()),
            _ => {
                let public = public.ok_or_else(|| format!("pub-key is needed for {method}"))?;
                let signing =
                    private.map(|k| EncodingKey::from_rsa_pem(&k)).transpose().map_err(|e| bad("priv-key", e))?;
                (signing, DecodingKey::from_rsa_pem(&public).map_err(|e| bad("pub-key", e))?)
            }
        };
        Ok(Self { algorithm, signing, checking, ttl })
    }

    /// A token for `user` at auth revision `revision`.
    ///
    /// # Errors
    ///
    /// [`Error::JwtVerifyOnly`] without a private key.
    pub fn sign(&self, user: &str, revision: u64) -> Result<String> {
        let key = self.signing.as_ref().ok_or(Error::JwtVerifyOnly)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let claims = Claims { username: user.to_string(), revision, exp: (now + self.ttl).as_secs() };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key)
            .map_err(|e| Error::Internal(format!("jwt: {e}")))
    }

    /// The user and revision a valid, unexpired token names.
    pub fn check(&self, token: &str) -> Option<(String, u64)> {
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.checking, &validation).ok()?.claims;
        Some((claims.username, claims.revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (String, String) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/jwt");
        (dir.join("rs256.pub").display().to_string(), dir.join("rs256.key").display().to_string())
    }

    #[test]
    fn options_are_etcds() {
        let (public, private) = keys();
        for (options, want) in [
            (format!("pub-key={public},priv-key={private}"), "auth: invalid auth signature method"),
            (format!("pub-key={public},sign-method=XS256"), "auth: invalid auth signature method"),
            ("sign-method=RS256".to_string(), "auth: missing key data"),
            ("sign-method".to_string(), "auth: invalid auth options"),
            (format!("priv-key={private},sign-method=RS256"), "pub-key is needed for RS256"),
            ("pub-key=/nonexistent,sign-method=RS256".to_string(), "pub-key /nonexistent"),
        ] {
            let err = Jwt::parse(&options).unwrap_err();
            assert!(err.contains(want), "{options}: {err}");
        }
    }

    #[test]
    fn a_token_is_checked_with_the_configured_method_and_key() {
        let (public, private) = keys();
        let jwt = Jwt::parse(&format!("pub-key={public},priv-key={private},sign-method=RS256,ttl=1m")).unwrap();
        let token = jwt.sign("alice", 7).unwrap();
        assert_eq!(jwt.check(&token), Some(("alice".to_string(), 7)));
        assert_eq!(jwt.check(&token[..token.len() - 2]), None, "a damaged signature");
        let other = Jwt::parse("priv-key=/dev/null,sign-method=HS256").unwrap();
        assert_eq!(other.check(&token), None, "another method and key");
        assert_eq!(jwt.check(&other.sign("alice", 7).unwrap()), None, "HS256 is not the configured RS256");
        let verify_only = Jwt::parse(&format!("pub-key={public},sign-method=RS256")).unwrap();
        assert_eq!(verify_only.check(&token), Some(("alice".to_string(), 7)));
        assert_eq!(
            verify_only.sign("alice", 7).unwrap_err().to_string(),
            "auth: token signing attempted with verify-only key"
        );
    }
}
