//! Generate the gRPC code from `proto/` with protox (a Rust protobuf
//! compiler), so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "stargaze/v1/fetcher.proto",
        "stargaze/v1/fs.proto",
        "stargaze/v1/snapshotter.proto",
        "stargaze/v1/common.proto",
        "containerd/types/mount.proto",
        "containerd/types/descriptor.proto",
        "containerd/services/snapshots/v1/snapshots.proto",
        "containerd/services/content/v1/content.proto",
        "containerd/services/images/v1/images.proto",
        "containerd/services/leases/v1/leases.proto",
        "containerd/services/diff/v1/diff.proto",
        "cri/api.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed=proto/{p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        // Messages that carry registry secrets get a redacting Debug
        // (written in lib.rs) instead of the derived one, so that no
        // `{:?}` of a request can put a password into a log.
        .skip_debug([".runtime.v1.AuthConfig", ".stargaze.v1.RegistryCredentials"])
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
