//! Revisions: the (main, sub) pair that orders every change in the store.

use std::fmt;

/// A point in the store's history.
///
/// `main` is the revision a whole write transaction commits at; `sub` numbers
/// the changes inside that transaction from 0. Ordering is lexicographic, so
/// sorting by `Revision` sorts changes in the order they were applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

/// Length of a revision encoded as a storage key.
pub const REVISION_KEY_LEN: usize = 16;

impl Revision {
    pub const fn new(main: i64, sub: i64) -> Self {
        Self { main, sub }
    }

    /// Encodes the revision as a 16-byte big-endian key, so byte order in the
    /// LSM equals revision order.
    pub fn to_key(self) -> [u8; REVISION_KEY_LEN] {
        let mut out = [0u8; REVISION_KEY_LEN];
        out[..8].copy_from_slice(&(self.main as u64).to_be_bytes());
        out[8..].copy_from_slice(&(self.sub as u64).to_be_bytes());
        out
    }

    /// Decodes a key written by [`Revision::to_key`]; `None` if the length is wrong.
    pub fn from_key(key: &[u8]) -> Option<Self> {
        if key.len() != REVISION_KEY_LEN {
            return None;
        }
        let main = u64::from_be_bytes(key[..8].try_into().ok()?) as i64;
        let sub = u64::from_be_bytes(key[8..].try_into().ok()?) as i64;
        Some(Self { main, sub })
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.main, self.sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_is_revision_order() {
        let revs = [
            Revision::new(1, 0),
            Revision::new(1, 1),
            Revision::new(2, 0),
            Revision::new(256, 0),
            Revision::new(256, 300),
            Revision::new(i64::MAX, 0),
        ];
        for pair in revs.windows(2) {
            assert!(pair[0] < pair[1]);
            assert!(pair[0].to_key() < pair[1].to_key(), "{} vs {}", pair[0], pair[1]);
        }
        for r in revs {
            assert_eq!(Revision::from_key(&r.to_key()), Some(r));
        }
        assert_eq!(Revision::from_key(b"short"), None);
    }
}
