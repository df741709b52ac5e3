//! containerd's snapshot semantics through the gRPC API, and real
//! containerd 1.6 using the binary as its proxy snapshotter.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stargaze_proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use stargaze_proto::containerd::services::snapshots::v1::snapshots_server::SnapshotsServer;
use stargaze_proto::containerd::services::snapshots::v1::*;
use stargaze_snapshotter::service::SnapshotService;
use stargaze_snapshotter::store::Store;
use stargaze_testkit::{Containerd, image, require};
use tonic::Code;

mod common;

use common::{sh_in_container, work_dir};

async fn serve(dir: &std::path::Path) -> SnapshotsClient<tonic::transport::Channel> {
    let sock = dir.join("snap.sock");
    let store = Store::open(&dir.join("root")).unwrap();
    let listener = stargaze_proto::bind_unix(&sock).await.unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SnapshotsServer::new(SnapshotService::new(
                Arc::new(store),
                None,
            )))
            .serve_with_incoming(stargaze_proto::incoming(listener)),
    );
    SnapshotsClient::new(stargaze_proto::connect_unix(&sock).unwrap())
}

fn prep(key: &str, parent: &str) -> PrepareSnapshotRequest {
    PrepareSnapshotRequest {
        snapshotter: "stargaze".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    }
}

fn commit(name: &str, key: &str) -> CommitSnapshotRequest {
    CommitSnapshotRequest {
        snapshotter: "stargaze".into(),
        name: name.into(),
        key: key.into(),
        labels: [("l".to_string(), "1".to_string())].into(),
        parent: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_overlay_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = serve(dir.path()).await;

    // A base layer: active bind mount, then committed.
    let m = c
        .prepare(prep("ns/1/a", ""))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "bind");
    assert!(m[0].options.contains(&"rw".to_string()));
    std::fs::write(
        std::path::Path::new(&m[0].source).join("f"),
        vec![1u8; 10_000],
    )
    .unwrap();
    assert_eq!(
        c.prepare(prep("ns/1/a", "")).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    c.commit(commit("base", "ns/1/a")).await.unwrap();
    let u = c
        .usage(UsageRequest {
            snapshotter: String::new(),
            key: "base".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(u.size >= 10_000 && u.inodes == 1, "{u:?}");
    let info = c
        .stat(StatSnapshotRequest {
            snapshotter: String::new(),
            key: "base".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.kind, Kind::Committed as i32);
    assert_eq!(info.labels["l"], "1");
    // Committing creates the snapshot: both times are the commit's.
    assert_eq!(info.created_at, info.updated_at);

    // Parents must exist and be committed.
    assert_eq!(
        c.prepare(prep("ns/2/x", "nope")).await.unwrap_err().code(),
        Code::NotFound
    );
    c.prepare(prep("ns/2/act", "")).await.unwrap();
    assert_eq!(
        c.prepare(prep("ns/2/y", "ns/2/act"))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    // The commit name must be free.
    assert_eq!(
        c.commit(commit("base", "ns/2/act"))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );

    // A container: overlay with upper, work and the parent as lower.
    let m = c
        .prepare(prep("ns/3/ctr", "base"))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "overlay");
    assert!(m[0].options.iter().any(|o| o.starts_with("upperdir=")));
    assert!(
        m[0].options
            .iter()
            .any(|o| o.starts_with("lowerdir=") && o.ends_with("/fs"))
    );
    let again = c
        .mounts(MountsRequest {
            snapshotter: String::new(),
            key: "ns/3/ctr".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(again, m);
    assert_eq!(
        c.mounts(MountsRequest {
            snapshotter: String::new(),
            key: "base".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::FailedPrecondition
    );
    // A view of one committed parent: read-only bind of it.
    let v = c
        .view(ViewSnapshotRequest {
            snapshotter: String::new(),
            key: "ns/4/view".into(),
            parent: "base".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(v[0].r#type, "bind");
    assert!(v[0].options.contains(&"ro".to_string()));
    // Views cannot be committed.
    assert_eq!(
        c.commit(commit("nv", "ns/4/view"))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );

    // A parent with children cannot go; children first.
    assert_eq!(
        c.remove(RemoveSnapshotRequest {
            snapshotter: String::new(),
            key: "base".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::FailedPrecondition
    );

    // Update touches labels only.
    let mut i = info.clone();
    i.labels = [("new".to_string(), "v".to_string())].into();
    let up = c
        .update(UpdateSnapshotRequest {
            snapshotter: String::new(),
            info: Some(i.clone()),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.new".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(up.labels.len(), 2);
    let e = c
        .update(UpdateSnapshotRequest {
            snapshotter: String::new(),
            info: Some(i),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["parent".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // List with filters, streamed.
    let list = |filters: Vec<String>| {
        let mut c = c.clone();
        async move {
            let mut s = c
                .list(ListSnapshotsRequest {
                    snapshotter: String::new(),
                    filters,
                })
                .await
                .unwrap()
                .into_inner();
            let mut names = Vec::new();
            while let Some(batch) = s.message().await.unwrap() {
                names.extend(batch.info.into_iter().map(|i| i.name));
            }
            names.sort();
            names
        }
    };
    assert_eq!(list(vec![]).await.len(), 4);
    assert_eq!(list(vec!["kind==committed".into()]).await, ["base"]);
    assert_eq!(
        list(vec!["parent==base".into()]).await,
        ["ns/3/ctr", "ns/4/view"]
    );
    assert_eq!(list(vec!["labels.new==v".into()]).await, ["base"]);

    // Remove children, then the parent; Cleanup collects orphans.
    for k in ["ns/3/ctr", "ns/4/view", "base", "ns/2/act"] {
        c.remove(RemoveSnapshotRequest {
            snapshotter: String::new(),
            key: k.into(),
        })
        .await
        .unwrap();
    }
    assert_eq!(
        c.stat(StatSnapshotRequest {
            snapshotter: String::new(),
            key: "base".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    std::fs::create_dir_all(dir.path().join("root/snapshots/999/fs")).unwrap();
    c.cleanup(CleanupRequest {
        snapshotter: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path().join("root/snapshots"))
            .unwrap()
            .count(),
        0
    );
}

struct Snapshotter(Child);

impl Drop for Snapshotter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn containerd_unpacks_and_runs_an_image_on_it() {
    require("runc");
    let work = work_dir("sg-snap-");
    let sock = work.path().join("snap.sock");
    let root = work.path().join("root");
    // Written before the service starts: it reads the file at once.
    std::fs::write(
        work.path().join("none.toml"),
        "[snapshotter]\nlazy_pull = false\n",
    )
    .unwrap();
    let _snap = Snapshotter(
        Command::new(env!("CARGO_BIN_EXE_stargaze-snapshotter"))
            .arg("--address")
            .arg(&sock)
            .arg("--root")
            .arg(&root)
            .env("STARGAZE_CONFIG", work.path().join("none.toml"))
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(work.path().join("snap.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            std::fs::read_to_string(work.path().join("snap.log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ctd = Containerd::start(&format!(
        "[proxy_plugins]\n  [proxy_plugins.stargaze]\n    type = \"snapshot\"\n    address = \"{}\"\n",
        sock.display()
    ));
    let layout = work.path().join("img");
    let (data, files) = image::data_layer(12);
    image::write_layout(
        &layout,
        "stargaze.test/snap:v1",
        "v1",
        &[image::busybox_layer(), data],
    );
    let archive = work.path().join("img.tar");
    image::layout_tar(&layout, &archive);
    ctd.ctr(&[
        "image",
        "import",
        "--snapshotter",
        "stargaze",
        archive.to_str().unwrap(),
    ]);
    let out = sh_in_container(
        &ctd,
        "stargaze.test/snap:v1",
        "sg-snap",
        "echo written > /tmp/x && cat /tmp/x && sha256sum /data/file5 && [ -e /bin/wc ] || echo no-wc",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("written"), "{text}");
    let file5 = &files.iter().find(|(n, _)| n == "data/file5").unwrap().1;
    assert!(
        text.contains(&stargaze_format::Digest::of(file5).hex()),
        "{text}"
    );
    assert!(
        text.contains("no-wc"),
        "the second layer's whiteout applies: {text}"
    );
    let snaps = String::from_utf8_lossy(
        &ctd.ctr(&["snapshots", "--snapshotter", "stargaze", "ls"])
            .stdout,
    )
    .to_string();
    assert!(
        snaps.lines().filter(|l| l.contains("Committed")).count() >= 2,
        "{snaps}"
    );
    // Removing the image frees its snapshots through containerd's GC.
    ctd.ctr(&["image", "rm", "--sync", "stargaze.test/snap:v1"]);
}
