use super::*;

fn perm(kind: PermKind, key: &str, end: &[u8]) -> Perm {
    Perm { kind, key: key.as_bytes().to_vec(), range_end: end.to_vec() }
}

/// A store with auth on: root, and alice holding the roles `reader` (a prefix, a single key)
/// and `writer` (a range).
fn store() -> AuthState {
    let mut a = AuthState::default();
    a.user_add(ROOT, Some("hash".into())).unwrap();
    a.user_add("alice", Some("hash".into())).unwrap();
    a.role_add("reader").unwrap();
    a.role_add("writer").unwrap();
    a.role_grant_permission("reader", perm(PermKind::Read, "app/", b"app0")).unwrap();
    a.role_grant_permission("reader", perm(PermKind::Read, "k1", b"")).unwrap();
    a.role_grant_permission("writer", perm(PermKind::ReadWrite, "b", b"d")).unwrap();
    a.user_grant_role("alice", "reader").unwrap();
    a.user_grant_role("alice", "writer").unwrap();
    assert_eq!(a.enable().unwrap_err().to_string(), "etcdserver: root user does not have root role");
    a.user_grant_role(ROOT, ROOT).unwrap();
    a.enable().unwrap();
    a
}

#[test]
fn enabling_needs_root_with_its_role() {
    let mut a = AuthState::default();
    assert_eq!(a.enable().unwrap_err().to_string(), "etcdserver: root user does not exist");
    let a = store();
    assert!(a.enabled);
    assert!(a.is_admin(ROOT) && !a.is_admin("alice"));
}

#[test]
fn etcds_refusals() {
    let mut a = store();
    assert_eq!(a.user_add("alice", None).unwrap_err().to_string(), "etcdserver: user name already exists");
    assert_eq!(a.user_add("", None).unwrap_err().to_string(), "etcdserver: user name is empty");
    assert_eq!(a.user_delete("bob").unwrap_err().to_string(), "etcdserver: user name not found");
    assert_eq!(a.user_delete(ROOT).unwrap_err().to_string(), "etcdserver: invalid auth management");
    assert_eq!(a.user_revoke_role(ROOT, ROOT).unwrap_err().to_string(), "etcdserver: invalid auth management");
    assert_eq!(a.role_delete(ROOT).unwrap_err().to_string(), "etcdserver: invalid auth management");
    assert_eq!(a.role_delete("nope").unwrap_err().to_string(), "etcdserver: role name not found");
    assert_eq!(a.user_grant_role("alice", "nope").unwrap_err().to_string(), "etcdserver: role name not found");
    assert_eq!(
        a.user_revoke_role("alice", "nope").unwrap_err().to_string(),
        "etcdserver: role is not granted to the user"
    );
    assert_eq!(a.role_add("reader").unwrap_err().to_string(), "etcdserver: role name already exists");
    assert_eq!(a.role_add("").unwrap_err().to_string(), "etcdserver: role name is empty");
    assert_eq!(
        a.role_revoke_permission("reader", b"x", b"").unwrap_err().to_string(),
        "etcdserver: permission is not granted to the role"
    );
    // Granting twice is no error and changes nothing.
    let rev = a.revision;
    a.user_grant_role("alice", "reader").unwrap();
    assert_eq!(a.revision, rev);
    // A refusal moves nothing either; a change does.
    let _ = a.user_delete("bob");
    assert_eq!(a.revision, rev);
    a.role_revoke_permission("reader", b"k1", b"").unwrap();
    assert_eq!(a.revision, rev + 1);
}

#[test]
fn deleting_a_role_takes_it_from_its_users() {
    let mut a = store();
    a.role_delete("writer").unwrap();
    assert_eq!(a.users["alice"].roles, ["reader"]);
    assert_eq!(a.check("alice", PermKind::Write, b"c", b"").unwrap_err().to_string(), "etcdserver: permission denied");
}

#[test]
fn a_permission_granted_again_changes_its_type() {
    let mut a = store();
    a.role_grant_permission("reader", perm(PermKind::Write, "k1", b"")).unwrap();
    assert_eq!(a.roles["reader"].perms.len(), 2);
    assert!(a.check("alice", PermKind::Read, b"k1", b"").is_err());
    a.check("alice", PermKind::Write, b"k1", b"").unwrap();
}

#[test]
fn ranges_are_checked_against_the_union_of_permissions() {
    let a = store();
    let ok = |kind, key: &str, end: &[u8]| a.check("alice", kind, key.as_bytes(), end).is_ok();
    // A key, a prefix, inside a range; READWRITE reads and writes.
    assert!(ok(PermKind::Read, "k1", b""));
    assert!(!ok(PermKind::Read, "k12", b""));
    assert!(ok(PermKind::Read, "app/x", b""));
    assert!(ok(PermKind::Read, "app/", b"app0"));
    assert!(ok(PermKind::Read, "app/a", b"app/b"));
    assert!(!ok(PermKind::Read, "app/", b"app1"), "past the prefix");
    assert!(!ok(PermKind::Write, "app/x", b""), "read only");
    assert!(ok(PermKind::Write, "b", b"d"));
    assert!(ok(PermKind::Read, "c", b""));
    assert!(!ok(PermKind::Write, "a", b"c"), "starts before the range");
    assert!(!ok(PermKind::Read, "b", b"\0"), "every key from b on");
    // Adjacent grants merge: [b, d) and [d, f) cover [c, e).
    let mut a = a;
    a.role_grant_permission("writer", perm(PermKind::Write, "d", b"f")).unwrap();
    a.check("alice", PermKind::Write, b"c", b"e").unwrap();
    // From a key on, to the end.
    a.role_grant_permission("writer", perm(PermKind::Read, "x", b"\0")).unwrap();
    a.check("alice", PermKind::Read, b"y", b"\0").unwrap();
    a.check("alice", PermKind::Read, b"zzz", b"").unwrap();
    // Root may do everything; nobody and strangers nothing.
    a.check(ROOT, PermKind::Write, b"", b"\0").unwrap();
    assert_eq!(a.check("", PermKind::Read, b"k", b"").unwrap_err().to_string(), "etcdserver: user name is empty");
    assert!(a.check("mallory", PermKind::Read, b"k1", b"").is_err());
    // With auth off, every call passes.
    a.disable().unwrap();
    a.check("", PermKind::Write, b"anything", b"").unwrap();
}
