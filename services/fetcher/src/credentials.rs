//! `RememberCredentials`: the credentials the kubelet gave the
//! snapshotter's CRI keychain with a `PullImage`, filed in the registry
//! client's keychain under the image's host and repository. They stay in
//! memory only, are never logged, and expire after the TTL the snapshotter
//! sends; until then the client tries them before the docker config for
//! that repository's manifests, TOCs and chunks.

use std::time::Duration;

use stargaze_proto::v1::{
    RegistryCredentials, RememberCredentialsRequest, RememberCredentialsResponse,
};
use stargaze_registry::Reference;
use stargaze_registry::auth::Credential;
use tonic::Status;

/// The client's credential for what the CRI handed over, or why not. The
/// order is containerd's CRI plugin's for the same fields (a user name,
/// then an identity token), so that the layers are read as the manifest
/// was; a registry token, which containerd 1.6 ignores, comes last.
fn credential_of(image: &str, c: &RegistryCredentials) -> Result<Credential, Status> {
    if !c.username.is_empty() {
        return Ok(Credential::Basic {
            username: c.username.clone(),
            password: c.password.clone(),
        });
    }
    if !c.identity_token.is_empty() {
        return Ok(Credential::IdentityToken(c.identity_token.clone()));
    }
    if !c.registry_token.is_empty() {
        return Ok(Credential::RegistryToken(c.registry_token.clone()));
    }
    Err(Status::invalid_argument(format!(
        "image {image}: the credentials are empty (no user name, identity token or registry token)"
    )))
}

/// File the request's credentials in `client`'s keychain.
pub fn remember(
    client: &stargaze_registry::Client,
    r: RememberCredentialsRequest,
) -> Result<RememberCredentialsResponse, Status> {
    let image = &r.image_ref;
    let reference = Reference::parse(image).map_err(|e| {
        Status::invalid_argument(format!(
            "{e}; the CRI keychain files credentials by the pulled image's reference"
        ))
    })?;
    // A zero TTL forgets (the snapshotter's answer to a RemoveImage): no
    // credentials needed, and what was made from them goes too.
    if r.ttl_millis == 0 {
        let client_remembered = client.keychain().remembered();
        if client.forget_credentials(&reference.host, &reference.repository) {
            tracing::info!(
                image,
                registry = reference.host,
                repository = reference.repository,
                "credentials from the CRI keychain forgotten (the image was removed)"
            );
        }
        return Ok(RememberCredentialsResponse {
            remembered: client_remembered.len() as u32,
            host: reference.host,
            repository: reference.repository,
        });
    }
    let credentials = r.credentials.as_ref().ok_or_else(|| {
        Status::invalid_argument(format!("image {image}: no credentials in the request"))
    })?;
    let credential = credential_of(image, credentials)?;
    let remembered = client.keychain().remembered();
    let ttl = Duration::from_millis(r.ttl_millis);
    // The snapshotter hands the same credentials over again every few
    // seconds (so that a restarted fetcher gets them back): logged once.
    if remembered.remember(&reference.host, &reference.repository, credential, ttl) {
        tracing::info!(
            image,
            registry = reference.host,
            repository = reference.repository,
            ?ttl,
            "credentials from the CRI keychain kept in memory"
        );
    }
    Ok(RememberCredentialsResponse {
        host: reference.host,
        repository: reference.repository,
        remembered: remembered.len() as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> stargaze_registry::Client {
        let dir = tempfile::tempdir().unwrap();
        stargaze_registry::Client::new(
            stargaze_registry::Hosts::new(),
            stargaze_registry::DockerConfig::in_dir(dir.path()),
            Default::default(),
        )
    }

    #[test]
    fn credentials_are_filed_by_host_and_repository_and_expire() {
        let c = client();
        let answer = remember(
            &c,
            RememberCredentialsRequest {
                image_ref: "127.0.0.1:5000/team/app:1".into(),
                credentials: Some(RegistryCredentials {
                    username: "u".into(),
                    password: "p".into(),
                    ..Default::default()
                }),
                ttl_millis: 50,
            },
        )
        .unwrap();
        assert_eq!(
            (
                answer.host.as_str(),
                answer.repository.as_str(),
                answer.remembered
            ),
            ("127.0.0.1:5000", "team/app", 1)
        );
        let lease = c.keychain().lookup("127.0.0.1:5000", "team/app").unwrap();
        assert_eq!(lease.unwrap().source, "cri");
        assert_eq!(
            c.keychain().lookup("127.0.0.1:5000", "team/other").unwrap(),
            None
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            c.keychain().lookup("127.0.0.1:5000", "team/app").unwrap(),
            None
        );
    }

    /// The kubelet names Docker Hub images briefly ("nginx:1"); containerd's
    /// layer labels name them in full ("docker.io/library/nginx:1"): both
    /// file under the same repository.
    #[test]
    fn short_docker_hub_names_file_under_the_full_repository() {
        let c = client();
        let answer = remember(
            &c,
            RememberCredentialsRequest {
                image_ref: "nginx:1".into(),
                credentials: Some(RegistryCredentials {
                    identity_token: "t".into(),
                    ..Default::default()
                }),
                ttl_millis: 60_000,
            },
        )
        .unwrap();
        assert_eq!(
            (answer.host.as_str(), answer.repository.as_str()),
            ("docker.io", "library/nginx")
        );
        let full = Reference::parse("docker.io/library/nginx:1").unwrap();
        let lease = c.keychain().lookup(&full.host, &full.repository).unwrap();
        assert_eq!(
            lease.unwrap().credential,
            Credential::IdentityToken("t".into())
        );
    }

    /// A zero TTL forgets the repository's credential (no credentials
    /// needed in the request) and leaves other repositories alone.
    #[test]
    fn a_zero_ttl_forgets_the_repository() {
        let c = client();
        let remember_for = |image: &str, ttl_millis| {
            remember(
                &c,
                RememberCredentialsRequest {
                    image_ref: image.into(),
                    credentials: Some(RegistryCredentials {
                        username: "u".into(),
                        password: "p".into(),
                        ..Default::default()
                    }),
                    ttl_millis,
                },
            )
            .unwrap()
        };
        remember_for("r.example/team/app:1", 60_000);
        remember_for("r.example/team/other:1", 60_000);
        let answer = remember(
            &c,
            RememberCredentialsRequest {
                image_ref: "r.example/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000".into(),
                credentials: None,
                ttl_millis: 0,
            },
        )
        .unwrap();
        assert_eq!(
            (answer.repository.as_str(), answer.remembered),
            ("team/app", 1)
        );
        assert_eq!(c.keychain().lookup("r.example", "team/app").unwrap(), None);
        assert!(
            c.keychain()
                .lookup("r.example", "team/other")
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn bad_requests_name_the_image() {
        let c = client();
        let empty = remember(
            &c,
            RememberCredentialsRequest {
                image_ref: "r.example/app:1".into(),
                credentials: Some(RegistryCredentials::default()),
                ttl_millis: 1000,
            },
        )
        .unwrap_err();
        assert!(empty.message().contains("r.example/app:1"), "{empty:?}");
        let bad_ref = remember(
            &c,
            RememberCredentialsRequest {
                image_ref: "UPPER/Case".into(),
                credentials: Some(RegistryCredentials::default()),
                ttl_millis: 1000,
            },
        )
        .unwrap_err();
        assert_eq!(bad_ref.code(), tonic::Code::InvalidArgument);
    }
}
