//! The CRI ImageService proxy on its own, without containerd or the
//! fetcher: what the kubelet sees when either is down. Calls are answered
//! UNAVAILABLE naming containerd's socket and the config key; a pull's
//! credentials that the fetcher could not take are counted (and kept to
//! hand over again: `tests/cri_keychain.rs` restarts a real fetcher).

use std::time::Duration;

use stargaze_proto::cri::image_service_client::ImageServiceClient;
use stargaze_proto::cri::{AuthConfig, ImageSpec, ListImagesRequest, PullImageRequest};
use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_snapshotter::cri_keychain::Keychain;
use stargaze_snapshotter::cri_proxy::CriProxy;

#[tokio::test]
async fn unavailable_backends_are_named_and_handover_failures_counted() {
    let dir = tempfile::tempdir().unwrap();
    let containerd = dir.path().join("containerd.sock");
    let fetcher_socket = dir.path().join("fetcher.sock");
    let socket = dir.path().join("cri.sock");
    let fetcher = FetcherClient::new(stargaze_proto::connect_unix(&fetcher_socket).unwrap());
    let keychain = Keychain::new(fetcher, Duration::from_secs(60));
    let stats = keychain.stats.clone();
    let proxy = CriProxy::new(&containerd, keychain).unwrap();
    let listener = stargaze_proto::bind_unix(&socket).await.unwrap();
    let served = socket.clone();
    tokio::spawn(async move { proxy.serve(listener, &served).await });

    let mut client = ImageServiceClient::new(stargaze_proto::connect_unix(&socket).unwrap());
    let e = client
        .list_images(ListImagesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(&containerd.display().to_string())
            && e.message().contains("containerd_image_service"),
        "the error names containerd's socket and the key: {e:?}"
    );

    let e = client
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: "registry.example/app:1".into(),
                ..Default::default()
            }),
            auth: Some(AuthConfig {
                username: "u".into(),
                password: "p".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.pulls_with_auth.load(Relaxed), 1);
    assert_eq!(stats.handover_failures.load(Relaxed), 1);
    assert_eq!(stats.live_credentials(), 0, "the fetcher has none yet");
    // Two calls passed on (ListImages, PullImage), both UNAVAILABLE.
    assert_eq!(stats.rpc.total(), 2);
}
