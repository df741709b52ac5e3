use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, Path::new("/etc/test/config.toml"))
}

fn parse_err(text: &str) -> String {
    let err = parse(text).expect_err("config should be rejected");
    let msg = err.to_string();
    assert!(
        msg.contains("/etc/test/config.toml"),
        "error does not name the file: {msg}"
    );
    msg
}

#[test]
fn defaults_are_valid() {
    Config::default().validate().unwrap();
}

#[test]
fn empty_file_gives_defaults() {
    assert_eq!(parse("").unwrap(), Config::default());
    assert_eq!(parse("# nothing\n\n").unwrap(), Config::default());
}

#[test]
fn documented_defaults_match_code() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        Config::from_toml_str(&text, &path).unwrap(),
        Config::default(),
        "deploy/config.toml does not parse to Config::default()"
    );
    // Every key is written out, so a new key cannot go undocumented.
    let doc: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(
        doc,
        default_table(),
        "deploy/config.toml must set every key"
    );
}

#[test]
fn to_toml_round_trips() {
    let mut c = Config::default();
    c.fetcher.request_timeout = Duration::from_millis(1500);
    c.fetcher.metrics_address = "127.0.0.1:9101".into();
    c.fs.passthrough = true;
    c.fs.entry_timeout = Duration::ZERO;
    c.log.format = LogFormat::Json;
    c.log.level = "info,stargaze_fs=debug".into();
    let text = c.to_toml();
    assert!(text.contains("[fetcher]"), "{text}");
    assert!(text.contains("request_timeout = \"1s 500ms\""), "{text}");
    assert!(text.contains("format = \"json\""), "{text}");
    assert_eq!(parse(&text).unwrap(), c);
    assert_eq!(
        parse(&Config::default().to_toml()).unwrap(),
        Config::default()
    );
}

#[test]
fn partial_sections_keep_other_defaults() {
    let c = parse("[fetcher]\nretries = 2\n[log]\nformat = \"json\"\n").unwrap();
    assert_eq!(c.fetcher.retries, 2);
    assert_eq!(c.fetcher.socket, FetcherConfig::default().socket);
    assert_eq!(c.fs, FsConfig::default());
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.log.level, "info");
}

#[test]
fn durations() {
    let c = parse("[fetcher]\nrequest_timeout = \"1m 30s\"\n[fs]\nentry_timeout = \"250ms\"\nattr_timeout = \"0s\"\n")
        .unwrap();
    assert_eq!(c.fetcher.request_timeout, Duration::from_secs(90));
    assert_eq!(c.fs.entry_timeout, Duration::from_millis(250));
    assert_eq!(c.fs.attr_timeout, Duration::ZERO);

    let msg = parse_err("[fetcher]\nrequest_timeout = 30\n");
    assert!(msg.contains("\"30s\""), "{msg}");
    assert!(msg.contains("line 2"), "{msg}");
    let msg = parse_err("[fs]\nattr_timeout = \"soon\"\n");
    assert!(msg.contains("invalid duration \"soon\""), "{msg}");
    let msg = parse_err("[fetcher]\nrequest_timeout = \"0s\"\n");
    assert!(msg.contains("[fetcher] request_timeout"), "{msg}");
    assert!(msg.contains("line 2"), "{msg}");
}

#[test]
fn sizes_take_bytes_or_a_unit() {
    let c = parse("[fetcher]\ncache_size_limit = \"20GiB\"\nmerge_gap = 4096\nmax_merged_range = \"1.5M\"\nbackground_bandwidth = \"100 MB\"\n")
        .unwrap();
    assert_eq!(c.fetcher.cache_size_limit, 20 << 30);
    assert_eq!(c.fetcher.merge_gap, 4096);
    assert_eq!(c.fetcher.max_merged_range, 3 << 19);
    assert_eq!(c.fetcher.background_bandwidth, 100_000_000);
    // Written back as plain bytes, which read back the same.
    assert_eq!(parse(&c.to_toml()).unwrap(), c);
    let msg = parse_err("[fetcher]\ncache_size_limit = \"lots\"\n");
    assert!(msg.contains("invalid size \"lots\""), "{msg}");
    assert!(msg.contains("line 2"), "{msg}");
    let msg = parse_err("[fetcher]\ncache_size_limit = -1\n");
    assert!(msg.contains("negative"), "{msg}");
}

#[test]
fn unknown_key_names_key_section_and_line() {
    let msg = parse_err("[fetcher]\nretries = 1\nmerge_gab = 10\n");
    assert!(msg.contains("line 3"), "{msg}");
    assert!(msg.contains("unknown key `merge_gab`"), "{msg}");
    assert!(msg.contains("[fetcher]"), "{msg}");
    assert!(msg.contains("did you mean `merge_gap`?"), "{msg}");

    let msg = parse_err("[fs]\ncompletely_different = true\n");
    assert!(
        msg.contains("unknown key `completely_different` in section [fs]"),
        "{msg}"
    );
    assert!(
        msg.contains("valid keys: `attr_timeout`, `entry_timeout`"),
        "{msg}"
    );

    let msg = parse_err("[snapshotter]\ncache_dir = \"/x\"\n");
    assert!(msg.contains("belongs in section [fetcher]"), "{msg}");

    // Dotted and inline forms are checked too.
    let msg = parse_err("fs.n_thread = 3\n");
    assert!(
        msg.contains("unknown key `n_thread` in section [fs]"),
        "{msg}"
    );
    let msg = parse_err("log = { levle = \"debug\" }\n");
    assert!(
        msg.contains("unknown key `levle` in section [log]"),
        "{msg}"
    );
}

#[test]
fn unknown_section() {
    let msg = parse_err("\n[fetchr]\nretries = 1\n");
    assert!(msg.contains("line 2"), "{msg}");
    assert!(msg.contains("unknown section [fetchr]"), "{msg}");
    assert!(msg.contains("did you mean [fetcher]?"), "{msg}");

    // A Go Stargz Snapshotter-style top-level key.
    let msg = parse_err("metrics_address = \"127.0.0.1:9000\"\n");
    assert!(msg.contains("unknown section [metrics_address]"), "{msg}");
    assert!(
        msg.contains("[fetcher] and [fs] and [snapshotter]"),
        "{msg}"
    );

    let msg = parse_err("[resolver]\nrequest_timeout_sec = 30\n");
    assert!(
        msg.contains("valid sections: [cri_keychain], [fetcher], [fs], [log], [snapshotter]"),
        "{msg}"
    );
}

#[test]
fn type_errors_name_the_line() {
    let msg = parse_err("[fs]\npassthrough = \"yes\"\n");
    assert!(msg.contains("line 2"), "{msg}");
    assert!(msg.contains("passthrough"), "{msg}");
    let msg = parse_err("[log]\nformat = \"xml\"\n");
    assert!(msg.contains("xml"), "{msg}");
    let msg = parse_err("[fetcher]\nretries = -1\n");
    assert!(msg.contains("line 2"), "{msg}");
    let msg = parse_err("fetcher = 3\n");
    assert!(msg.contains("fetcher"), "{msg}");
}

#[test]
fn syntax_error() {
    let msg = parse_err("[fetcher\nretries = 1\n");
    assert!(msg.contains("line 1"), "{msg}");
}

#[test]
fn invalid_values() {
    let cases = [
        ("[fetcher]\nsocket = \"run/f.sock\"\n", "[fetcher] socket"),
        (
            "[fetcher]\ncache_dir = \"cache\"\n",
            "must be an absolute path",
        ),
        (
            "[fetcher]\nmax_connections_per_host = 0\n",
            "must be at least 1",
        ),
        (
            "[fetcher]\nmax_merged_range = 0\nmerge_gap = 0\n",
            "[fetcher] max_merged_range",
        ),
        (
            "[fetcher]\nmerge_gap = 100\nmax_merged_range = 10\n",
            "must not exceed",
        ),
        (
            "[fetcher]\nmetrics_address = \"9100\"\n",
            "expected host:port",
        ),
        ("[fs]\nn_threads = 0\n", "[fs] n_threads"),
        ("[fs]\nmountpoint = \"\"\n", "[fs] mountpoint"),
        ("[snapshotter]\nroot = \"./x\"\n", "[snapshotter] root"),
        (
            "[snapshotter]\nsocket = \"/run/stargaze/fs.sock\"\n",
            "is also [fs] socket",
        ),
        (
            "[log]\nlevel = \"verbose\"\n",
            "unknown log level `verbose`",
        ),
        ("[log]\nlevel = \"info,,debug\"\n", "empty log directive"),
    ];
    for (text, want) in cases {
        let msg = parse_err(text);
        assert!(msg.contains(want), "{text:?}: {msg}");
    }
    let long = format!("[fs]\nsocket = \"/{}\"\n", "s".repeat(120));
    assert!(parse_err(&long).contains("at most 107 bytes"));
}

#[test]
fn listen_addresses() {
    for ok in [
        "",
        "127.0.0.1:9100",
        "[::1]:9100",
        "localhost:9100",
        ":9100",
        "0.0.0.0:0",
    ] {
        check_listen("fs", "metrics_address", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in [
        "9100",
        "localhost",
        "host:port",
        "a b:1",
        "::1:9100",
        "h:70000",
    ] {
        assert!(check_listen("fs", "metrics_address", bad).is_err(), "{bad}");
    }
}

#[test]
fn log_levels() {
    assert_eq!(log_filter("info").unwrap(), "info");
    assert_eq!(log_filter("WARNING").unwrap(), "warn");
    assert_eq!(log_filter("fatal").unwrap(), "error");
    assert_eq!(
        log_filter("debug, stargaze_fetcher=trace ,h2=warning").unwrap(),
        "debug,stargaze_fetcher=trace,h2=warn"
    );
    assert_eq!(
        log_filter("stargaze_fs::fuse=off").unwrap(),
        "stargaze_fs::fuse=off"
    );
    assert!(log_filter("").is_err());
    assert!(log_filter("=debug").is_err());
    assert!(log_filter("x=loud").is_err());
    assert!(log_filter("a b=info").is_err());
}

#[test]
fn load_rules() {
    let dir = tempfile::tempdir().unwrap();

    // An explicit path must exist.
    let missing = dir.path().join("missing.toml");
    let err = Config::load(Some(&missing)).unwrap_err();
    assert!(matches!(err, ConfigError::NotFound { .. }));
    assert!(
        err.to_string().contains(&*missing.to_string_lossy()),
        "{err}"
    );

    // An optional path may be absent.
    let (c, origin) = Config::load_optional(&missing).unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(origin, None);

    // A present file is read.
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "[fs]\nn_threads = 2\n").unwrap();
    let c = Config::load(Some(&file)).unwrap();
    assert_eq!(c.fs.n_threads, 2);
    let (c2, origin) = Config::load_optional(&file).unwrap();
    assert_eq!((c2, origin), (c, Some(file.clone())));

    // A directory is not a file, and the error names it.
    let err = Config::load(Some(dir.path())).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&*dir.path().to_string_lossy()),
        "{err}"
    );

    // Errors in a loaded file name it.
    std::fs::write(&file, "[fs]\nn_threads = \"many\"\n").unwrap();
    let err = Config::load(Some(&file)).unwrap_err();
    assert!(err.to_string().contains(&*file.to_string_lossy()), "{err}");
}

#[test]
fn suggestions() {
    assert_eq!(edit_distance("kitten", "sitting"), 3);
    assert_eq!(edit_distance("", "abc"), 3);
    assert_eq!(edit_distance("same", "same"), 0);
    assert_eq!(
        suggestion("sockt", &["socket", "root"], "`", "`", "keys"),
        "; did you mean `socket`?"
    );
    assert_eq!(
        suggestion("zzzzzz", &["socket", "root"], "`", "`", "keys"),
        "; valid keys: `root`, `socket`"
    );
}

/// One parser for config files and the CLI: SI units are powers of 1000,
/// IEC units (and Kubernetes' `Mi`) and bare letters powers of 1024.
#[test]
fn size_units() {
    use crate::parse_size;
    for (text, bytes) in [
        ("4194304", 4194304),
        ("0", 0),
        ("12B", 12),
        ("64KiB", 64 << 10),
        ("64kib", 64 << 10),
        ("4MiB", 4 << 20),
        ("4Mi", 4 << 20),
        ("2GiB", 2 << 30),
        ("1TiB", 1 << 40),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("4M", 4 << 20),
        ("1G", 1 << 30),
        ("1T", 1 << 40),
        ("1KB", 1_000),
        ("100MB", 100_000_000),
        ("100 mb", 100_000_000),
        ("3GB", 3_000_000_000),
        ("2TB", 2_000_000_000_000),
        ("1.5M", 3 << 19),
        ("0.5KB", 500),
        (" 7 MiB ", 7 << 20),
    ] {
        assert_eq!(parse_size(text), Ok(bytes), "{text:?}");
    }
    for bad in [
        "",
        "MiB",
        "4XB",
        "4 4M",
        "-1",
        "1.2.3M",
        "99999999999999999999",
        "20000000T",
    ] {
        assert!(parse_size(bad).is_err(), "{bad:?} parsed");
    }
    let e = parse_size("4XB").unwrap_err();
    assert!(e.contains("\"xb\"") && e.contains("MiB"), "{e}");
}
