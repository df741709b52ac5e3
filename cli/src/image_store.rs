//! Opening `stargaze convert`'s SRC and DST: OCI layouts as they are,
//! registries through the registry client, archives unpacked into (or
//! packed from) a scratch layout.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use stargaze_oci::{
    ImageDest, ImageLocation, ImageSource, OciLayout, PlatformFilter, RegistryImage, archive,
};
use stargaze_registry::{Client, ClientOptions, DockerConfig, Hosts, Reference};

/// How to reach registries.
pub struct RegistryAccess {
    pub hosts_dir: PathBuf,
    pub plain_http: bool,
    pub insecure: bool,
    /// Where layers in transit are kept (one layer at a time).
    pub spill_dir: PathBuf,
    pub rt: Arc<tokio::runtime::Runtime>,
}

impl RegistryAccess {
    fn open(&self, reference: &str) -> Result<RegistryImage> {
        let r = Reference::parse(reference)?;
        let mut hosts = Hosts::new().with_hosts_dir(&self.hosts_dir);
        if self.plain_http {
            hosts = hosts.with_plain_http(&r.host);
        } else if self.insecure {
            hosts = hosts.with_skip_verify(&r.host);
        }
        let client = Client::new(hosts, DockerConfig::from_env(), ClientOptions::default());
        Ok(RegistryImage::new(
            client,
            r,
            self.rt.handle().clone(),
            &self.spill_dir,
        ))
    }
}

/// An opened source, with what it needs kept alive.
pub struct Source {
    pub image: Box<dyn ImageSource>,
    pub tag: Option<String>,
    /// The tag a destination gets when it names none.
    pub default_tag: Option<String>,
    /// A scratch directory holding an unpacked archive.
    _scratch: Option<tempfile::TempDir>,
}

pub fn open_source(loc: &ImageLocation, access: &RegistryAccess) -> Result<Source> {
    let scratch = || {
        tempfile::Builder::new()
            .prefix("stargaze-archive-")
            .tempdir_in(&access.spill_dir)
            .with_context(|| {
                format!(
                    "creating a scratch directory in {}",
                    access.spill_dir.display()
                )
            })
    };
    Ok(match loc {
        ImageLocation::Oci { dir, tag } => Source {
            image: Box::new(OciLayout::open(dir).with_context(|| format!("opening {loc}"))?),
            tag: tag.clone(),
            default_tag: tag.clone(),
            _scratch: None,
        },
        ImageLocation::Docker { reference } => {
            let r = access.open(reference)?;
            let default_tag = r.reference().tag.clone();
            Source {
                image: Box::new(r),
                tag: None,
                default_tag,
                _scratch: None,
            }
        }
        ImageLocation::OciArchive { path, reference } => {
            let s = scratch()?;
            let layout = archive::open_oci_archive(path, s.path())
                .with_context(|| format!("opening {loc}"))?;
            Source {
                image: Box::new(layout),
                tag: reference.clone(),
                default_tag: reference.clone(),
                _scratch: Some(s),
            }
        }
        ImageLocation::DockerArchive { path, reference } => {
            let s = scratch()?;
            let (layout, tag) = archive::open_docker_archive(path, reference.as_deref(), s.path())
                .with_context(|| format!("opening {loc}"))?;
            Source {
                image: Box::new(layout),
                default_tag: reference.clone().filter(|r| !r.starts_with('@')).map(|r| {
                    r.rsplit_once(':')
                        .map(|(_, t)| t.to_string())
                        .unwrap_or_else(|| "latest".into())
                }),
                tag: Some(tag),
                _scratch: Some(s),
            }
        }
    })
}

/// What to do once the converter has written the destination.
enum Finish {
    Nothing,
    OciArchive {
        path: PathBuf,
    },
    DockerArchive {
        path: PathBuf,
        repo_tag: Option<String>,
    },
}

/// An opened destination.
pub struct Dest {
    pub layout: Option<OciLayout>,
    pub registry: Option<RegistryImage>,
    /// The tag to write (`None`: the source's).
    pub tag: Option<String>,
    finish: Finish,
    /// The layout an archive is built in, removed when done.
    _scratch: Option<tempfile::TempDir>,
}

impl Dest {
    pub fn image(&self) -> &dyn ImageDest {
        match (&self.layout, &self.registry) {
            (Some(l), _) => l,
            (None, Some(r)) => r,
            (None, None) => unreachable!("a destination is a layout or a registry"),
        }
    }

    /// Pack an archive destination.
    pub fn finish(&self, tag: &str, platforms: &[PlatformFilter]) -> Result<()> {
        let Some(layout) = &self.layout else {
            return Ok(());
        };
        match &self.finish {
            Finish::Nothing => {}
            Finish::OciArchive { path } => archive::write_oci_archive(layout.root(), path)
                .with_context(|| format!("writing oci-archive:{}", path.display()))?,
            Finish::DockerArchive { path, repo_tag } => {
                archive::write_docker_archive(layout, tag, path, repo_tag.as_deref(), platforms)
                    .with_context(|| format!("writing docker-archive:{}", path.display()))?
            }
        }
        Ok(())
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

pub fn open_dest(loc: &ImageLocation, access: &RegistryAccess) -> Result<Dest> {
    // Archives are built beside where they go, so the final rename stays on
    // one filesystem and the layers are not copied across.
    let scratch_layout = |path: &Path| -> Result<(tempfile::TempDir, OciLayout)> {
        let s = tempfile::Builder::new()
            .prefix(".stargaze-archive-")
            .tempdir_in(parent_dir(path))
            .with_context(|| format!("creating a scratch directory beside {}", path.display()))?;
        let l = OciLayout::open_or_create(s.path())?;
        Ok((s, l))
    };
    Ok(match loc {
        ImageLocation::Oci { dir, tag } => Dest {
            layout: Some(OciLayout::open_or_create(dir).with_context(|| format!("opening {loc}"))?),
            registry: None,
            tag: tag.clone(),
            finish: Finish::Nothing,
            _scratch: None,
        },
        ImageLocation::Docker { reference } => {
            let r = access.open(reference)?;
            if r.reference().digest.is_some() {
                bail!(
                    "{loc}: a destination is a tag, not a digest (the digest is known only once converted)"
                );
            }
            let tag = r.reference().tag.clone();
            Dest {
                layout: None,
                registry: Some(r),
                tag,
                finish: Finish::Nothing,
                _scratch: None,
            }
        }
        ImageLocation::OciArchive { path, reference } => {
            let (s, l) = scratch_layout(path)?;
            Dest {
                layout: Some(l),
                registry: None,
                tag: reference.clone(),
                finish: Finish::OciArchive { path: path.clone() },
                _scratch: Some(s),
            }
        }
        ImageLocation::DockerArchive { path, reference } => {
            let (s, l) = scratch_layout(path)?;
            Dest {
                layout: Some(l),
                registry: None,
                tag: Some("image".into()),
                finish: Finish::DockerArchive {
                    path: path.clone(),
                    repo_tag: reference.clone(),
                },
                _scratch: Some(s),
            }
        }
    })
}
