//! `make install` of the files in `deploy/` (systemd units, the containerd
//! snippet, the default config) into a scratch root, checked the way an operator's node
//! would see it: the files and modes, the units through `systemd-analyze
//! verify` and `systemd-analyze security`, the installed binaries reading the
//! installed config, idempotence, an edited config surviving install and
//! uninstall, and uninstall removing the rest.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::SystemTime;

use stargaze_testkit::{repo_root, run, stack::workspace_bin};

/// The units `make install` puts in place, in start order.
const UNITS: [&str; 3] = [
    "stargaze-fetcher.service",
    "stargaze-fs.service",
    "stargaze-snapshotter.service",
];

const BINARIES: [&str; 4] = [
    "stargaze",
    "stargaze-fetcher",
    "stargaze-fs",
    "stargaze-snapshotter",
];

fn make(root: &Path, target: &str) -> String {
    let bin_dir = workspace_bin("stargaze")
        .parent()
        .expect("binary directory")
        .to_path_buf();
    for b in BINARIES {
        workspace_bin(b);
    }
    let out = run(Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(repo_root())
        .arg(target)
        .env("DESTDIR", root)
        .env("STARGAZE_BINARIES", &bin_dir));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every regular file under `dir` with its modification time.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, SystemTime> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.insert(e.path(), e.metadata().unwrap().modified().unwrap());
            }
        }
    }
    out
}

fn systemd_analyze(args: &[&str]) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("systemd-analyze is missing: install the systemd package (make deps does)")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn install_verify_and_uninstall() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let bindir = root.join("usr/local/bin");
    let unitdir = root.join("usr/local/lib/systemd/system");
    let config = root.join("etc/stargaze/config.toml");
    let default_config = std::fs::read_to_string(repo_root().join("deploy/config.toml")).unwrap();

    // Install: binaries, units with the real binary path, config, snippet.
    let first = make(root, "install");
    for b in BINARIES {
        assert_eq!(mode(&bindir.join(b)), 0o755, "{b}");
    }
    for u in UNITS {
        let p = unitdir.join(u);
        assert_eq!(mode(&p), 0o644, "{u}");
        let text = std::fs::read_to_string(&p).unwrap();
        let service = u.trim_end_matches(".service");
        assert!(
            text.contains(&format!("\nExecStart=/usr/local/bin/{service}\n")),
            "{u} must start /usr/local/bin/{service}:\n{text}"
        );
        assert!(text.contains("\nType=notify\n"), "{u}");
        assert!(text.contains("\nRestart=on-failure\n"), "{u}");
        assert!(!text.contains('@'), "{u} has an unreplaced placeholder");
    }
    assert_eq!(std::fs::read_to_string(&config).unwrap(), default_config);
    let snippet = root.join("usr/local/share/stargaze/containerd.toml");
    assert!(
        std::fs::read_to_string(&snippet)
            .unwrap()
            .contains("[proxy_plugins.stargaze]")
    );
    assert!(
        first.contains("merge /usr/local/share/stargaze/containerd.toml"),
        "install must tell the operator about containerd's config:\n{first}"
    );

    // Start order fetcher → fs → snapshotter → containerd.
    let unit = |u: &str| std::fs::read_to_string(unitdir.join(u)).unwrap();
    assert!(unit("stargaze-fs.service").contains("\nAfter=stargaze-fetcher.service\n"));
    assert!(
        unit("stargaze-snapshotter.service")
            .contains("\nAfter=stargaze-fetcher.service stargaze-fs.service\n")
    );
    assert!(unit("stargaze-snapshotter.service").contains("\nBefore=containerd.service\n"));

    // The installed binaries accept the installed config.
    let printed = run(Command::new(bindir.join("stargaze-snapshotter"))
        .arg("--config")
        .arg(&config)
        .arg("--print-config"));
    assert!(String::from_utf8_lossy(&printed.stdout).contains("[snapshotter]"));

    // systemd's own checks, against a root holding systemd's stock units (the
    // targets ours depend on) and ours. verify exits 0 on unknown keys and bad
    // values, so any output at all is a failure.
    let stock = Path::new("/lib/systemd/system");
    assert!(
        stock.is_dir(),
        "systemd's units are missing: install the systemd package (make deps does)"
    );
    std::fs::create_dir_all(root.join("lib/systemd")).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg(stock)
        .arg(root.join("lib/systemd/")));
    let root_arg = format!("--root={}", root.display());
    let units: Vec<String> = UNITS
        .iter()
        .map(|u| unitdir.join(u).display().to_string())
        .collect();
    let mut args = vec!["verify", root_arg.as_str()];
    args.extend(units.iter().map(String::as_str));
    let out = systemd_analyze(&args);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}\n{said}",
        out.status
    );
    // Exposure scores (0 = locked down, 10 = unprotected): the fetcher, which
    // parses what registries send, must stay tightly boxed; fs and the
    // snapshotter need the host's mount namespace and keep a medium score.
    for (u, threshold) in [
        ("stargaze-fetcher.service", "40"),
        ("stargaze-fs.service", "60"),
        ("stargaze-snapshotter.service", "60"),
    ] {
        let unit_path = unitdir.join(u).display().to_string();
        let out = systemd_analyze(&[
            "security",
            "--offline=yes",
            &root_arg,
            &format!("--threshold={threshold}"),
            &unit_path,
        ]);
        assert!(
            out.status.success(),
            "{u} is more exposed than {threshold}/100:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // A second install changes nothing.
    let before = snapshot(root);
    let second = make(root, "install");
    assert!(
        !second.contains("wrote"),
        "second install rewrote files:\n{second}"
    );
    assert_eq!(snapshot(root), before);

    // An operator's edit survives install (the defaults land beside it) and
    // uninstall; everything else goes.
    let edited = default_config.replace("level = \"info\"", "level = \"debug\"");
    assert_ne!(edited, default_config);
    std::fs::write(&config, &edited).unwrap();
    let third = make(root, "install");
    assert!(third.contains("kept your edited"), "{third}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert_eq!(
        std::fs::read_to_string(config.with_extension("toml.default")).unwrap(),
        default_config
    );
    make(root, "uninstall");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert!(!config.with_extension("toml.default").exists());
    for b in BINARIES {
        assert!(!bindir.join(b).exists(), "{b} left behind");
    }
    for u in UNITS {
        assert!(!unitdir.join(u).exists(), "{u} left behind");
    }
    assert!(!root.join("usr/local/share/stargaze").exists());

    // With an unedited config, uninstall leaves nothing of ours in /etc.
    std::fs::remove_file(&config).unwrap();
    make(root, "install");
    make(root, "uninstall");
    assert!(!root.join("etc/stargaze").exists());
    // Uninstalling twice is fine.
    make(root, "uninstall");
}
