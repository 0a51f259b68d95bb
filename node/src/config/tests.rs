//! Tests of `meridian node`'s settings.

use super::*;

#[test]
fn ids_match_etcd_for_the_same_flags() {
    // etcd 3.4 with --initial-cluster default=http://localhost:2380 and the
    // default token reports member id 8e9e05c52164694d, cluster cdf818194e3a8c32.
    let id = member_id(&["http://localhost:2380".to_string()], "etcd-cluster");
    assert_eq!(format!("{id:x}"), "8e9e05c52164694d");
    assert_eq!(format!("{:x}", cluster_id(&[id])), "cdf818194e3a8c32");
}

#[test]
fn go_style_flags_are_accepted() {
    let args = ["meridian", "-name", "x", "--data-dir", "d", "-1"].map(String::from);
    assert_eq!(normalize_args(args), ["meridian", "--name", "x", "--data-dir", "d", "-1"]);
}

#[test]
fn initial_cluster_parsing() {
    let mut cfg = Settings { name: "b".into(), ..Default::default() };
    cfg.initial_cluster = Some("a=http://127.0.0.1:1,b=http://127.0.0.1:2,b=http://127.0.0.1:3".into());
    let m = cfg.initial_members().unwrap();
    assert_eq!(m["b"], vec!["http://127.0.0.1:2", "http://127.0.0.1:3"]);
    cfg.name = "c".into();
    assert!(cfg.initial_members().unwrap_err().to_string().contains("couldn't find local name"));
    cfg.initial_cluster = Some("c=ftp://x:1".into());
    assert!(cfg.initial_members().is_err());
    cfg.initial_cluster = Some("c=https://x:1".into());
    assert_eq!(cfg.initial_members().unwrap()["c"], vec!["https://x:1"]);
    let lone = Settings::default();
    assert_eq!(lone.initial_members().unwrap()["default"], vec!["http://127.0.0.1:2380"]);
}

#[test]
fn durations() {
    for (s, ms) in [
        ("10m", 600_000),
        ("30s", 30_000),
        ("500ms", 500),
        ("1h", 3_600_000),
        ("1.5s", 1500),
        ("1h30m", 5_400_000),
        ("1m0.5s", 60_500),
        ("0", 0),
    ] {
        assert_eq!(parse_duration(s), Some(Duration::from_millis(ms)), "{s}");
    }
    assert_eq!(parse_duration("10"), None);
    assert_eq!(parse_duration("10x"), None);
    assert_eq!(parse_duration("1h30"), None);
    assert_eq!(parse_duration(""), None);
}

#[test]
fn defaults_are_etcds() {
    let c = Settings::default().check().unwrap();
    assert_eq!((c.max_request_bytes, c.max_txn_ops, c.snapshot_count), (1_572_864, 128, 100_000));
    assert_eq!((c.heartbeat, c.election), (Duration::from_millis(100), Duration::from_millis(1000)));
    assert_eq!(c.quota, Some(DEFAULT_QUOTA_BYTES));
    assert_eq!(c.data_dir, PathBuf::from("default.meridian"));
    assert_eq!(c.auto_compaction, None);
    assert_eq!((c.initial_role, c.primary_region.as_str()), (InitialRole::Primary, "default"));
}

#[test]
fn tls_settings_as_etcd_takes_them() {
    let https = |s: &mut Settings| {
        s.listen_client_urls = "https://127.0.0.1:2379".into();
        s.advertise_client_urls = "https://127.0.0.1:2379".into();
    };
    let mut s = Settings::default();
    https(&mut s);
    let e = s.clone().check().unwrap_err().to_string();
    assert!(e.contains("TLS key/cert (--cert-file, --key-file) must be provided for client url https://127.0.0.1:2379 with HTTPS scheme"), "{e}");
    s.auto_tls = true;
    assert_eq!(s.clone().check().unwrap().client_tls, ListenerTls::Auto);
    s.cert_file = Some("s.crt".into());
    assert!(s.clone().check().unwrap_err().to_string().contains("--cert-file and --key-file must be given together"));
    s.key_file = Some("s.key".into());
    s.client_cert_auth = true;
    assert!(s.clone().check().unwrap_err().to_string().contains("--client-cert-auth needs --trusted-ca-file"));
    s.trusted_ca_file = Some("ca.crt".into());
    let files = meridian_wire::tls::ServerFiles {
        cert: "s.crt".into(),
        key: "s.key".into(),
        trusted_ca: Some("ca.crt".into()),
        client_cert_auth: true,
        crl: None,
        policy: Default::default(),
    };
    // Files win over --auto-tls, as in etcd.
    assert_eq!(s.clone().check().unwrap().client_tls, ListenerTls::Files(files.clone()));
    // Files with plain URLs: a warning, and no TLS.
    let plain = Settings { cert_file: Some("s.crt".into()), key_file: Some("s.key".into()), ..Default::default() };
    let c = plain.check().unwrap();
    assert_eq!(c.client_tls, ListenerTls::Off);
    assert!(c.etcd_warnings.iter().any(|w| w.contains("ignored the key/cert files")), "{:?}", c.etcd_warnings);
    // etcd's YAML section, and peers under --peer-auto-tls dial without checking.
    let mut y = Settings::default();
    https(&mut y);
    y.client_transport_security = TransportSecurity {
        cert_file: files.cert.clone().into(),
        key_file: files.key.clone().into(),
        trusted_ca_file: files.trusted_ca.clone(),
        client_cert_auth: true,
        crl_file: None,
        auto_tls: false,
        allowed_cn: None,
        allowed_hostname: None,
    };
    y.listen_peer_urls = "https://127.0.0.1:2380".into();
    y.initial_advertise_peer_urls = "https://127.0.0.1:2380".into();
    let e = y.clone().check().unwrap_err().to_string();
    assert!(e.contains("cannot listen on TLS for 127.0.0.1:2380: KeyFile and CertFile are not presented"), "{e}");
    y.peer_auto_tls = true;
    let c = y.check().unwrap();
    assert_eq!((c.client_tls, c.peer_tls.clone()), (ListenerTls::Files(files), ListenerTls::Auto));
    assert!(c.peer_client.insecure_skip_verify);
}

/// Every refused value stops the member at startup with a message that names its flag.
#[test]
fn bad_values_are_refused_naming_the_flag() {
    type Set = fn(&mut Settings);
    let table: [(Set, &str); 16] = [
        (|s| s.max_peer_message_bytes = 1 << 20, "--max-peer-message-bytes"),
        (|s| s.max_concurrent_streams = 0, "--max-concurrent-streams"),
        (|s| s.grpc_keepalive_interval = "often".into(), "--grpc-keepalive-interval"),
        (|s| s.grpc_keepalive_timeout = "0".into(), "--grpc-keepalive-timeout"),
        (|s| s.auto_compaction_retention = "5ns".into(), "--auto-compaction-retention"),
        (|s| s.auto_compaction_retention = "1x".into(), "--auto-compaction-retention"),
        (|s| s.auto_compaction_mode = "daily".into(), "--auto-compaction-mode"),
        (|s| s.watch_progress_notify_interval = "0".into(), "--experimental-watch-progress-notify-interval"),
        (|s| s.watch_progress_notify_interval = "10".into(), "--experimental-watch-progress-notify-interval"),
        (|s| s.lease_checkpoint_interval = "soon".into(), "--experimental-lease-checkpoint-interval"),
        (|s| s.listen_client_urls = "127.0.0.1:2379".into(), "--listen-client-urls"),
        (|s| s.advertise_client_urls = "http://h".into(), "--advertise-client-urls"),
        (|s| s.listen_metrics_urls = "ftp://h:1".into(), "--listen-metrics-urls"),
        (|s| s.initial_advertise_peer_urls = "h:1".into(), "--initial-advertise-peer-urls"),
        (|s| s.initial_role = "tertiary".into(), "--initial-role"),
        (|s| s.log_level = "loud".into(), "--log-level"),
    ];
    for (set, flag) in table {
        let mut settings = Settings::default();
        set(&mut settings);
        let err = settings.clone().check().expect_err(&format!("{settings:?} must be refused")).to_string();
        assert!(err.contains(flag), "{err:?} does not name {flag}");
    }
    let mut ok = Settings { auto_compaction_retention: "1s".into(), ..Default::default() };
    assert_eq!(ok.clone().check().unwrap().auto_compaction, Some(Retention::Periodic(Duration::from_secs(1))));
    ok.auto_compaction_mode = "revision".into();
    ok.auto_compaction_retention = "100".into();
    assert_eq!(ok.check().unwrap().auto_compaction, Some(Retention::Revision(100)));
}
