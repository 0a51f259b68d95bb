//! etcd 3.4's backend file, both ways: a Meridian store written as the bbolt
//! file an etcd snapshot is (Maintenance.Snapshot, so `etcdctl snapshot
//! save/status/restore` and a real etcd take it), and such a file read back
//! into a new Meridian store (a data directory `etcdctl snapshot restore`
//! made boots `meridian node`).
//!
//! # etcd's buckets
//!
//! ```text
//!   key              main:u64be '_' sub:u64be ['t' if a tombstone]
//!                      -> mvccpb.KeyValue (a tombstone's holds only the key)
//!   meta             consistent_index -> u64be (the applied raft index)
//!                    finishedCompactRev, scheduledCompactRev -> revision bytes
//!   lease            id:i64be -> leasepb.Lease {ID, TTL, RemainingTTL}
//!   alarm            etcdserverpb.AlarmMember -> empty
//!   cluster          clusterVersion -> "3.4.0"
//!   members          id in hex -> {"id","peerURLs","name","clientURLs","isLearner"} (JSON)
//!   members_removed  (empty)
//!   auth             authRevision -> u64be; authEnabled -> 0/1 once ever enabled
//!   authUsers        name -> authpb.User {name, bcrypt hash, roles (sorted), options}
//!   authRoles        name -> authpb.Role {name, permissions sorted by key}
//! ```
//!
//! Meridian keeps the same history, so the mapping is one record to one
//! `key` entry with the same revisions, versions and leases; watchers and
//! mirrors resume across it without a relist.

pub mod bbolt;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use meridian_proto::authpb::{Permission, Role, User, UserAddOptions};
use meridian_proto::etcdserverpb::AlarmMember;
use meridian_proto::meridian::v1::KvRecord;
use meridian_proto::mvccpb::KeyValue;
use prost::Message;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::mvcc::{Marks, Mvcc, StoreImage};
use crate::server::auth::store::META_KEY as AUTH_META_KEY;
use crate::server::auth::{AuthState, Perm, PermKind};
use crate::server::cluster::{Alarms, Members};
use crate::server::lease::{decode_lease_meta, encode_lease_meta, LEASE_META_PREFIX};
use crate::server::maintenance::ETCD_CLUSTER_VERSION;

/// Where `etcdctl snapshot restore` leaves the backend in a data directory.
pub const RESTORED_DB: &str = "member/snap/db";

/// etcd's on-disk lease record (leasepb.Lease).
#[derive(Clone, PartialEq, Message)]
struct LeaseRecord {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
    #[prost(int64, tag = "3")]
    remaining_ttl: i64,
}

/// A member as etcd 3.4 stores it in the `members` bucket.
#[derive(Serialize)]
struct EtcdMember<'a> {
    id: u64,
    #[serde(rename = "peerURLs")]
    peer_urls: &'a [String],
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(rename = "clientURLs", skip_serializing_if = "<[String]>::is_empty")]
    client_urls: &'a [String],
    #[serde(rename = "isLearner", skip_serializing_if = "std::ops::Not::not")]
    is_learner: bool,
}

/// etcd's revision key: 17 bytes, 18 with a tombstone's 't'.
fn revision_key(main: i64, sub: i64, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&main.to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&sub.to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

fn parse_revision_key(k: &[u8]) -> Result<(i64, i64, bool)> {
    let bad = || Error::Corrupt(format!("etcd backend: key bucket entry {k:?} is not a revision"));
    if !(k.len() == 17 || k.len() == 18 && k[17] == b't') || k[8] != b'_' {
        return Err(bad());
    }
    let main = i64::from_be_bytes(k[..8].try_into().map_err(|_| bad())?);
    let sub = i64::from_be_bytes(k[9..17].try_into().map_err(|_| bad())?);
    Ok((main, sub, k.len() == 18))
}

/// Writes `image` into `file` as etcd 3.4's backend; the file's size. For
/// long writes: call it from a blocking thread.
///
/// # Errors
///
/// IO and storage errors.
pub fn write_etcd_db(image: &StoreImage, file: File) -> Result<u64> {
    let meta = &image.meta;
    let marks = image.marks;
    let mut w = bbolt::Writer::new(file)?;

    w.bucket(b"alarm")?;
    let mut alarms: Vec<Vec<u8>> = meta
        .get(Alarms::META_KEY)
        .map(|b| Alarms::decode(b).0)
        .unwrap_or_default()
        .iter()
        .map(AlarmMember::encode_to_vec)
        .collect();
    alarms.sort();
    alarms.dedup();
    for a in alarms {
        w.put(&a, b"")?;
    }
    let auth: AuthState = meta.get(AUTH_META_KEY).and_then(|b| serde_json::from_slice(b).ok()).unwrap_or_default();
    w.bucket(b"auth")?;
    if auth.enabled {
        w.put(b"authEnabled", &[1])?;
    }
    w.put(b"authRevision", &auth.revision.to_be_bytes())?;
    w.bucket(b"authRoles")?;
    for (name, role) in &auth.roles {
        let perms = role.perms.iter().map(|p| Permission {
            perm_type: match p.kind {
                PermKind::Read => 0,
                PermKind::Write => 1,
                PermKind::ReadWrite => 2,
            },
            key: p.key.clone(),
            range_end: p.range_end.clone(),
        });
        let role = Role { name: name.as_bytes().to_vec(), key_permission: perms.collect() };
        w.put(name.as_bytes(), &role.encode_to_vec())?;
    }
    w.bucket(b"authUsers")?;
    for (name, user) in &auth.users {
        let record = User {
            name: name.as_bytes().to_vec(),
            password: user.password.clone().unwrap_or_default().into_bytes(),
            roles: user.roles.clone(),
            options: user.password.is_none().then_some(UserAddOptions { no_password: true }),
        };
        w.put(name.as_bytes(), &record.encode_to_vec())?;
    }
    w.bucket(b"cluster")?;
    w.put(b"clusterVersion", ETCD_CLUSTER_VERSION.as_bytes())?;

    w.bucket(b"key")?;
    let mut failed = None;
    image.for_each(|rec| {
        let key = revision_key(rec.main, rec.sub, rec.tombstone);
        let kv = if rec.tombstone {
            KeyValue { key: rec.key, ..Default::default() }
        } else {
            KeyValue {
                key: rec.key,
                create_revision: rec.create_revision,
                mod_revision: rec.main,
                version: rec.version,
                value: rec.value,
                lease: rec.lease,
            }
        };
        match w.put(&key, &kv.encode_to_vec()) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }

    w.bucket(b"lease")?;
    let mut leases: Vec<(i64, i64, i64)> = meta
        .iter()
        .filter_map(|(name, b)| {
            let id = name.strip_prefix(LEASE_META_PREFIX)?.parse::<i64>().ok()?;
            let (ttl, remaining) = decode_lease_meta(b)?;
            Some((id, ttl, remaining))
        })
        .collect();
    leases.sort_unstable();
    for (id, ttl, remaining_ttl) in leases {
        w.put(&id.to_be_bytes(), &LeaseRecord { id, ttl, remaining_ttl }.encode_to_vec())?;
    }

    w.bucket(b"members")?;
    let members: Members = meta.get(Members::META_KEY).and_then(|b| serde_json::from_slice(b).ok()).unwrap_or_default();
    let mut by_key: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for m in &members.0 {
        let json = EtcdMember {
            id: m.id,
            peer_urls: &m.peer_urls,
            name: &m.name,
            client_urls: &m.client_urls,
            is_learner: m.is_learner,
        };
        by_key.insert(format!("{:x}", m.id), serde_json::to_vec(&json).expect("a member encodes"));
    }
    for (k, v) in by_key {
        w.put(k.as_bytes(), &v)?;
    }
    w.bucket(b"members_removed")?;

    w.bucket(b"meta")?;
    w.put(b"consistent_index", &marks.applied.to_be_bytes())?;
    if marks.compacted > 0 {
        let rev = revision_key(marks.compacted, 0, false);
        w.put(b"finishedCompactRev", &rev)?;
        w.put(b"scheduledCompactRev", &rev)?;
    }
    w.finish()
}

/// What an import brought in.
#[derive(Debug)]
pub struct Imported {
    pub marks: Marks,
    /// Entries of the `key` bucket: every retained revision of every key.
    pub revisions: u64,
    pub leases: usize,
}

/// Imports an etcd 3.4 backend file (`member/snap/db`) into `mvcc`, staged
/// in `batch` (visible after it commits and [`Mvcc::publish`]). The records
/// stream from the file's pages into a keyspace of their own, as a raft
/// snapshot's do, so only the key index is held in memory.
///
/// # Errors
///
/// IO errors; [`Error::Corrupt`] for a file that is not etcd's backend.
/// Its users, roles and grants come with it, auth on or off as it was.
pub fn import_etcd_db(path: &Path, mvcc: &Mvcc, batch: &mut fjall::OwnedWriteBatch) -> Result<Imported> {
    let db = bbolt::Reader::open(path)?;
    let auth = read_auth(&db)?;
    let mut compacted = 0;
    db.for_each(b"meta", |k, v| {
        if k == b"finishedCompactRev" {
            compacted = parse_revision_key(v)?.0;
        }
        Ok(())
    })?;
    let mut meta = BTreeMap::new();
    db.for_each(b"lease", |_, v| {
        let l = LeaseRecord::decode(v).map_err(|e| Error::Corrupt(format!("etcd backend: lease: {e}")))?;
        meta.insert(format!("{LEASE_META_PREFIX}{}", l.id), encode_lease_meta(l.ttl, l.remaining_ttl));
        Ok(())
    })?;
    let (mut current, mut revisions, mut found) = (1, 0u64, false);
    let mut received = mvcc.ingest_with(0, &mut |push| {
        found = db.for_each(b"key", |k, v| {
            let (main, sub, tombstone) = parse_revision_key(k)?;
            let kv = KeyValue::decode(v).map_err(|e| Error::Corrupt(format!("etcd backend: revision {main}: {e}")))?;
            current = current.max(main);
            revisions += 1;
            push(KvRecord {
                key: kv.key,
                main,
                sub,
                tombstone,
                value: kv.value,
                create_revision: kv.create_revision,
                version: kv.version,
                lease: kv.lease,
            })
        })?;
        Ok(())
    })?;
    if !found {
        return Err(Error::Corrupt(format!("{} has no key bucket: not an etcd backend", path.display())));
    }
    let leases = meta.len();
    meta.insert(AUTH_META_KEY.to_string(), serde_json::to_vec(&auth).expect("the auth store encodes"));
    received.meta = meta;
    let marks = Marks { current: current.max(compacted), compacted, applied: 0 };
    mvcc.install_received(received, marks, batch)?;
    Ok(Imported { marks, revisions, leases })
}

/// The auth store of an etcd backend: the `auth`, `authUsers` and
/// `authRoles` buckets.
fn read_auth(db: &bbolt::Reader) -> Result<AuthState> {
    let bad = |what: &str, e: &dyn std::fmt::Display| Error::Corrupt(format!("etcd backend: {what}: {e}"));
    let text = |b: Vec<u8>, what: &str| String::from_utf8(b).map_err(|e| bad(what, &e));
    let mut auth = AuthState::default();
    db.for_each(b"auth", |k, v| {
        match k {
            b"authEnabled" => auth.enabled = v.first() == Some(&1),
            b"authRevision" => {
                let bytes: [u8; 8] = v.try_into().map_err(|_| bad("authRevision", &"not 8 bytes"))?;
                auth.revision = u64::from_be_bytes(bytes);
            }
            _ => {}
        }
        Ok(())
    })?;
    db.for_each(b"authUsers", |_, v| {
        let u = User::decode(v).map_err(|e| bad("authUsers", &e))?;
        let no_password = u.options.is_some_and(|o| o.no_password) || u.password.is_empty();
        let mut roles = u.roles;
        roles.sort();
        let password = (!no_password).then(|| text(u.password, "a password hash")).transpose()?;
        auth.users.insert(text(u.name, "a user name")?, crate::server::auth::User { password, roles });
        Ok(())
    })?;
    db.for_each(b"authRoles", |_, v| {
        let r = Role::decode(v).map_err(|e| bad("authRoles", &e))?;
        let mut perms: Vec<Perm> = r
            .key_permission
            .into_iter()
            .map(|p| Perm {
                kind: match p.perm_type {
                    1 => PermKind::Write,
                    2 => PermKind::ReadWrite,
                    _ => PermKind::Read,
                },
                key: p.key,
                range_end: p.range_end,
            })
            .collect();
        perms.sort_by(|a, b| (&a.key, &a.range_end).cmp(&(&b.key, &b.range_end)));
        auth.roles.insert(text(r.name, "a role name")?, crate::server::auth::Role { perms });
        Ok(())
    })?;
    Ok(auth)
}

#[cfg(test)]
mod tests;
