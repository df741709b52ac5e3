//! The `stargaze-fs` binary end to end: a fetcher service (in this test
//! process, on a private socket) backed by a real registry, layers attached
//! over gRPC, overlayfs stacked on their directories, detach refused while
//! the overlay uses them, eviction sparing attached layers and taking
//! detached ones (which attach again), clean shutdown. Needs root and
//! /dev/fuse.

#[path = "support/estargz.rs"]
mod estargz;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stargaze_cache::{Cache, EvictOptions};
use stargaze_fetcher::FetchOptions;
use stargaze_fetcher::service::FetcherService;
use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_proto::v1::fetcher_server::FetcherServer;
use stargaze_proto::v1::fs_client::FsClient;
use stargaze_proto::v1::*;
use stargaze_registry::{Client, ClientOptions, DockerConfig, Hosts};
use stargaze_testkit::{Registry, image, run, unmount_below};

struct FsProcess {
    child: Child,
    dir: PathBuf,
}

impl Drop for FsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        unmount_below(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_attach_stack_under_overlayfs_and_detach_safely() {
    stargaze_testkit::require_root_fuse();
    let reg = Registry::start();
    let work = tempfile::Builder::new()
        .prefix("sg-fst-")
        .tempdir_in("/tmp")
        .unwrap();
    let w = work.path();

    // A two-layer eStargz image in the registry.
    let (data, files) = image::data_layer(3);
    let (image_ref, manifest) =
        estargz::push(&reg, w, &[image::busybox_layer(), data], "stargaze/fs");

    // The fetcher, served from this process.
    let fetcher_sock = w.join("fetcher.sock");
    let cache = Arc::new(Cache::open_writer(&w.join("cache")).unwrap());
    let client = Client::new(
        Hosts::new(),
        DockerConfig::in_dir(w),
        ClientOptions::default(),
    );
    // A cache limit of one byte: every eviction pass wants everything out.
    let fetcher = FetcherService::new(cache, client, FetchOptions::default(), 0, false)
        .with_cache_limit(EvictOptions {
            limit: 1,
            keep_unused: Duration::ZERO,
            ..Default::default()
        });
    let evictor = fetcher.clone();
    let listener = stargaze_proto::bind_unix(&fetcher_sock).await.unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(FetcherServer::new(fetcher))
            .serve_with_incoming(stargaze_proto::incoming(listener)),
    );

    // The fs binary.
    let fs_sock = w.join("fs.sock");
    let mnt = w.join("mnt");
    let config = w.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[fetcher]\nsocket = \"{}\"\ncache_dir = \"{}\"\n[fs]\nsocket = \"{}\"\nmountpoint = \"{}\"\n",
            fetcher_sock.display(),
            w.join("cache").display(),
            fs_sock.display(),
            mnt.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(w.join("fs.log")).unwrap();
    let mut fs = FsProcess {
        child: Command::new(env!("CARGO_BIN_EXE_stargaze-fs"))
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
        dir: w.to_path_buf(),
    };
    let start = Instant::now();
    while !fs_sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            std::fs::read_to_string(w.join("fs.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut fetch = FetcherClient::new(stargaze_proto::connect_unix(&fetcher_sock).unwrap());
    let mut fsc = FsClient::new(stargaze_proto::connect_unix(&fs_sock).unwrap());

    // Resolve and attach each layer, as the snapshotter will.
    let mut dirs = Vec::new();
    for desc in manifest["layers"].as_array().unwrap() {
        dirs.push(resolve_and_attach(&mut fetch, &mut fsc, &image_ref, desc).await);
    }
    for (_, dir) in &dirs {
        assert!(dir.starts_with(&mnt));
    }
    assert_eq!(
        fsc.list(ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .layers
            .len(),
        2
    );

    // overlayfs on top, upper layer first, as containerd mounts a rootfs.
    let (upper, workdir, merged) = (w.join("upper"), w.join("work"), w.join("merged"));
    for d in [&upper, &workdir, &merged] {
        std::fs::create_dir_all(d).unwrap();
    }
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        dirs[1].1.display(),
        dirs[0].1.display(),
        upper.display(),
        workdir.display()
    );
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged));
    let merged2 = merged.clone();
    let files2 = files.clone();
    let checked = tokio::task::spawn_blocking(move || {
        for (name, data) in &files2 {
            assert!(
                std::fs::read(merged2.join(name)).unwrap() == *data,
                "{name}"
            );
        }
        assert!(merged2.join("bin/busybox").exists());
        assert!(
            !merged2.join("bin/wc").exists(),
            "the whiteout hides /bin/wc"
        );
        assert!(
            merged2
                .join("bin/sh")
                .symlink_metadata()
                .unwrap()
                .file_type()
                .is_symlink()
        );
        files2.len()
    })
    .await
    .unwrap();
    assert!(checked > 5);

    let busybox = std::fs::read(dirs[0].1.join("bin/busybox")).unwrap();
    // Attached layers are pinned: an eviction pass leaves them alone.
    let pass = evictor.evict_now().await.unwrap();
    assert_eq!(
        (pass.layers_evicted, pass.layers_pinned),
        (0, 2),
        "{pass:?}"
    );

    // In use by the overlay: detaching is refused with the reason.
    let e = fsc
        .detach(DetachRequest {
            layer_digest: dirs[0].0.clone(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains(&merged.display().to_string()),
        "{}",
        e.message()
    );
    run(Command::new("umount").arg(&merged));
    fsc.detach(DetachRequest {
        layer_digest: dirs[0].0.clone(),
        force: false,
    })
    .await
    .unwrap();
    assert!(!dirs[0].1.exists(), "a detached layer's directory is gone");

    // A malformed digest is refused where it enters, naming it: it never
    // becomes a path in the cache or a name in the mount.
    let bad = "sha256:../../../etc".to_string();
    let e = fsc
        .attach(AttachRequest {
            layer_digest: bad.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains(&bad), "{}", e.message());
    let e = fsc
        .detach(DetachRequest {
            layer_digest: bad.clone(),
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains(&bad), "{}", e.message());

    // Detached, it is evicted with its files at the next pass; the layer
    // still attached keeps serving every file.
    let layer_dir = |d: &str| w.join("cache/layers").join(&d[7..]);
    let pass = evictor.evict_now().await.unwrap();
    assert_eq!(
        (pass.layers_evicted, pass.layers_pinned),
        (1, 1),
        "{pass:?}"
    );
    assert!(pass.files_evicted > 0, "{pass:?}");
    assert!(!layer_dir(&dirs[0].0).exists());
    assert!(layer_dir(&dirs[1].0).exists());
    for (name, data) in &files {
        assert!(
            std::fs::read(dirs[1].1.join(name)).unwrap() == *data,
            "{name}"
        );
    }
    let st = fetch.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((st.cache_limit_bytes, st.evicted_layers), (1, 1));
    assert_eq!(st.evicted_bytes, pass.bytes_freed);
    // Pulled again: resolved from the registry anew, attached, same bytes.
    let desc = &manifest["layers"][0];
    let (digest, dir) = resolve_and_attach(&mut fetch, &mut fsc, &image_ref, desc).await;
    assert_eq!(digest, dirs[0].0);
    assert!(std::fs::read(dir.join("bin/busybox")).unwrap() == busybox);
    dirs[0].1 = dir;
    let st = fsc.status(FsStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.layers, 2);
    assert!(st.bytes_after_fetch > 0);
    assert_eq!(st.fetch_errors, 0);

    // SIGTERM: unmounted and gone.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fs.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = fs.child.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(w.join("fs.log")).unwrap()
    );
    let mounts = stargaze_service::mountinfo::read();
    assert!(
        stargaze_service::mountinfo::mount_points_under(&mounts, &mnt).is_empty(),
        "unmounted on exit: {mounts:#?}"
    );
}

/// Resolve a layer in the fetcher and attach it in fs, as the snapshotter
/// does; returns its digest and directory.
async fn resolve_and_attach(
    fetch: &mut FetcherClient<tonic::transport::Channel>,
    fsc: &mut FsClient<tonic::transport::Channel>,
    image_ref: &str,
    desc: &serde_json::Value,
) -> (String, PathBuf) {
    let annotations: HashMap<String, String> =
        serde_json::from_value(desc["annotations"].clone()).unwrap();
    let r = fetch
        .resolve_layer(ResolveLayerRequest {
            layer: Some(LayerSource {
                image_ref: image_ref.to_string(),
                digest: desc["digest"].as_str().unwrap().into(),
                annotations,
                ..Default::default()
            }),
            allow_unverified: false,
        })
        .await
        .unwrap()
        .into_inner();
    let a = fsc
        .attach(AttachRequest {
            layer_digest: r.layer_digest.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    (r.layer_digest, PathBuf::from(a.dir))
}
