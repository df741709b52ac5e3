//! What an operator sees of a node: `stargaze status` (table and JSON) and
//! the three services' Prometheus metrics, after a lazy pull, a container
//! run and a plain image that falls back, all with the real components
//! (Debian containerd 1.6, runc, docker-registry, our three services); the
//! cache's size limit evicting the layers of a removed image (and only
//! those); then with the fs service killed, status reports it down and
//! exits 1.
//!
//! Needs root, /dev/fuse and the Debian packages `make deps` installs.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

mod common;

use common::{Node, Setup, layer_digests, sh_in_container, skopeo_copy, stargaze_rpull};
use stargaze_testkit::stack::{Service, Stack, workspace_bin};
use stargaze_testkit::{free_port, image};

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the series `line_start` (name and labels) in `text`.
fn value(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{line_start} missing from:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn status(config: &Path, json: bool) -> (bool, String) {
    let mut cmd = Command::new(workspace_bin("stargaze"));
    cmd.arg("status").arg("--config").arg(config);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn status_and_metrics_describe_a_lazy_pull() {
    let setup = Setup::new("sg-operate-", &["runc", "skopeo"]);
    let (data, files) = image::data_layer(7);
    let lazy = setup.push_esgz_image("operate", &[image::busybox_layer(), data]);
    let repo = format!("{}/stargaze/operate", setup.registry.addr);
    let src = setup.dir().join("src");
    let plain = format!("{repo}:plain");
    skopeo_copy(
        &format!("oci:{}:src", src.display()),
        &format!("docker://{plain}"),
    );

    let ports = [free_port(), free_port(), free_port()];
    let metrics = |p: u16| format!("metrics_address = \"127.0.0.1:{p}\"");
    let (m0, m1, m2) = (metrics(ports[0]), metrics(ports[1]), metrics(ports[2]));
    // A cache limit of one byte: only what is in use may stay.
    let m0 = format!("{m0}\ncache_size_limit = 1\ncache_keep_unused = \"2s\"");
    let Node { ctd, mut stack } = Node::on(Stack::start(
        setup.dir(),
        &[("fetcher", &m0), ("fs", &m1), ("snapshotter", &m2)],
    ));

    // A lazy pull and a container that reads one file of the data layer.
    stargaze_rpull(&ctd, &lazy);
    let (name, bytes) = files
        .iter()
        .find(|(_, b)| b.len() > 4096)
        .expect("a file larger than a page");
    // A container that counts the file's bytes (busybox by name: the data
    // layer whites out /bin/wc).
    let count_bytes = |run: &str| {
        let o = sh_in_container(
            &ctd,
            &lazy,
            &format!("sg-operate-{run}"),
            &format!("busybox wc -c < /{name}"),
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(count_bytes("first"), bytes.len().to_string());
    // A plain gzip image: both layers fall back to an ordinary unpack.
    stargaze_rpull(&ctd, &plain);

    let (ok, text) = status(&stack.config, true);
    assert!(ok, "status exits 0 while every service is up:\n{text}");
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    for s in r["services"].as_array().unwrap() {
        assert_eq!(s["up"], true, "{s}");
    }
    let images = r["images"].as_array().unwrap();
    let image = images
        .iter()
        .find(|i| i["image"] == lazy.as_str())
        .unwrap_or_else(|| panic!("{lazy} missing from status:\n{text}"));
    let layers = image["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{text}");
    for l in layers {
        assert_eq!(l["attached"], true, "{l}");
        assert!(l["snapshot"].is_string(), "{l}");
        assert!(l["chunks"].as_u64().unwrap() > 0, "{l}");
        assert!(
            l["bytes_fetched"].as_u64().unwrap() <= l["bytes_total"].as_u64().unwrap(),
            "{l}"
        );
    }
    // The container read a file of the data layer: its bytes were fetched.
    let fetched = image["bytes_fetched"].as_u64().unwrap();
    assert!(fetched >= bytes.len() as u64, "{text}");
    assert!(image["bytes_total"].as_u64().unwrap() >= fetched, "{text}");
    assert!(r["fs"]["bytes_after_fetch"].as_u64().unwrap() > 0, "{text}");
    assert_eq!(r["fs"]["read_errors"], 0, "{text}");
    assert!(
        r["cache"]["registry_requests"].as_u64().unwrap() > 0,
        "{text}"
    );
    assert!(r["cache"]["bytes_on_disk"].as_u64().unwrap() > 0, "{text}");
    let snap = &r["snapshotter"];
    assert_eq!(snap["remote_prepared"], 2, "{text}");
    assert!(snap["fallbacks"].as_u64().unwrap() >= 2, "{text}");
    // Each plain layer's fallback reason is listed once.
    let manifest_layers = layer_digests(&ctd, &plain);
    let errors = r["recent_errors"].as_array().unwrap();
    for d in &manifest_layers {
        let n = errors
            .iter()
            .filter(|e| e["service"] == "snapshotter" && e["subject"] == d.as_str())
            .count();
        assert_eq!(n, 1, "fallback of {d} in recent errors:\n{text}");
    }

    // The table says the same for people.
    let (ok, table) = status(&stack.config, false);
    eprintln!("stargaze status:\n{table}");
    assert!(ok);
    assert!(table.contains(&lazy), "{table}");
    assert!(table.contains("unpacked instead"), "{table}");
    for svc in ["fetcher", "fs", "snapshotter"] {
        assert!(
            table
                .lines()
                .any(|l| l.trim_start().starts_with(svc) && l.contains(" up ")),
            "{svc} up:\n{table}"
        );
    }

    // Prometheus: each service counts what just happened.
    let f = scrape(ports[0]);
    assert!(
        value(
            &f,
            "stargaze_fetcher_grpc_requests_total{method=\"ResolveLayer\",code=\"OK\"}"
        ) >= 2.0
    );
    assert!(f.contains("stargaze_fetcher_grpc_request_duration_seconds_bucket{"));
    let fs = scrape(ports[1]);
    assert_eq!(value(&fs, "stargaze_fs_layers_attached"), 2.0);
    assert!(
        value(
            &fs,
            "stargaze_fs_operation_duration_seconds_count{op=\"lookup\"}"
        ) > 0.0
    );
    assert!(
        value(
            &fs,
            "stargaze_fs_operation_duration_seconds_count{op=\"read\"}"
        ) > 0.0
    );
    assert!(value(&fs, "stargaze_fs_bytes_served_total{source=\"fetch\"}") > 0.0);
    assert_eq!(value(&fs, "stargaze_fs_read_errors_total"), 0.0);
    assert_eq!(value(&fs, "stargaze_fs_fuse_threads"), 4.0);
    assert_eq!(
        value(
            &fs,
            "stargaze_fs_grpc_requests_total{method=\"Attach\",code=\"OK\"}"
        ),
        2.0
    );
    let sn = scrape(ports[2]);
    assert_eq!(
        value(&sn, "stargaze_snapshotter_remote_prepared_total"),
        2.0
    );
    assert!(value(&sn, "stargaze_snapshotter_fallbacks_total") >= 2.0);
    assert_eq!(
        value(&sn, "stargaze_snapshotter_snapshots{kind=\"remote\"}"),
        2.0
    );
    // containerd's answer to a lazily mounted layer is AlreadyExists.
    assert_eq!(
        value(
            &sn,
            "stargaze_snapshotter_grpc_requests_total{method=\"Prepare\",code=\"AlreadyExists\"}"
        ),
        2.0
    );

    // The cache limit: attached layers are never evicted; once the image
    // is removed (containerd's GC removes the snapshots, the snapshotter
    // detaches the layers), they are, and pulling the image again works.
    assert_eq!(value(&f, "stargaze_fetcher_cache_limit_bytes"), 1.0);
    assert_eq!(
        value(&f, "stargaze_fetcher_cache_evicted_layers_total"),
        0.0
    );
    ctd.ctr(&["image", "rm", "--sync", &lazy]);
    let start = std::time::Instant::now();
    let r = loop {
        let (_, text) = status(&stack.config, true);
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        if r["cache"]["evicted_layers"].as_u64().unwrap() >= 2 {
            break r;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "the removed image's layers were not evicted:\n{text}\n{}",
            stack.log(Service::Fetcher)
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert_eq!(r["cache"]["limit_bytes"], 1, "{r}");
    assert!(r["cache"]["evicted_bytes"].as_u64().unwrap() > 0, "{r}");
    let (_, table) = status(&stack.config, false);
    assert!(table.contains("evicted since start"), "{table}");
    assert!(
        stack
            .log(Service::Fetcher)
            .contains("evicted least recently used layers")
    );
    stargaze_rpull(&ctd, &lazy);
    assert_eq!(
        count_bytes("again"),
        bytes.len().to_string(),
        "after eviction:\n{}",
        stack.log(Service::Snapshotter)
    );

    // With fs down, status still answers, says so, and exits 1.
    stack.kill(Service::Fs);
    let (ok, text) = status(&stack.config, true);
    assert!(!ok, "status must exit 1 with a service down:\n{text}");
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let fs_state = r["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "fs")
        .unwrap();
    assert_eq!(fs_state["up"], false, "{text}");
    assert!(fs_state["error"].is_string(), "{text}");
    assert_eq!(r["services"][0]["up"], true, "{text}");
    // The snapshotter still lists the image; its layers are not attached.
    let image = r["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image"] == lazy.as_str())
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(image["layers"][0]["attached"], false, "{text}");

    drop(ctd);
    drop(stack);
}
