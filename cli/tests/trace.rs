//! `stargaze trace show`: an image's trace found in the configured cache
//! by reference or manifest digest, printed in order; a missing one is an
//! error that says how traces are made.

use std::process::Command;

use stargaze_cache::{Cache, Trace, TraceRead};

#[test]
fn trace_show_prints_the_reads_of_the_image_named() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[fetcher]\ncache_dir = \"{}\"\n", cache_dir.display()),
    )
    .unwrap();
    let cache = Cache::open_reader(&cache_dir);
    let manifest = format!("sha256:{}", "e1".repeat(32));
    let mut t = Trace::new(
        "registry.example:5000/tools/gcc:12",
        &manifest,
        vec![
            format!("sha256:{}", "a0".repeat(32)),
            format!("sha256:{}", "b0".repeat(32)),
        ],
    );
    t.merge([
        TraceRead {
            layer: 1,
            path: "/usr/bin/gcc".into(),
            offset: 0,
            length: 4096,
        },
        TraceRead {
            layer: 0,
            path: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
            offset: 0,
            length: 1 << 20,
        },
    ]);
    t.spans = vec![stargaze_cache::TraceSpan {
        layer: 0,
        start: 4096,
        end: 4096 + (3 << 19),
    }];
    t.write(&cache.trace_path(&manifest).unwrap()).unwrap();
    // Garbage beside it is skipped.
    std::fs::write(cache.traces_dir().join("sha256-junk.json"), b"junk").unwrap();

    let run = |image: &str| {
        Command::new(env!("CARGO_BIN_EXE_stargaze"))
            .args(["trace", "show", image, "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    for name in ["registry.example:5000/tools/gcc:12", manifest.as_str()] {
        let out = run(name);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let gcc = text.find("/usr/bin/gcc").expect(&text);
        let libc = text.find("libc.so.6").expect(&text);
        assert!(gcc < libc, "in trace order: {text}");
        assert!(text.contains("reads     2 (1.0 MiB)"), "{text}");
        assert!(text.contains("spans     1 (1.5 MiB"), "{text}");
    }
    let out = run("registry.example:5000/other:1");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no trace of") && err.contains("learn_traces"),
        "{err}"
    );
}
