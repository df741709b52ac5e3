//! Image locations in skopeo's transport syntax.

use std::fmt;
use std::path::PathBuf;

use crate::OciError;

/// Where an image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLocation {
    /// `oci:DIR[:TAG]`: an OCI image layout directory.
    Oci { dir: PathBuf, tag: Option<String> },
    /// `docker://REF`: a registry.
    Docker { reference: String },
    /// `oci-archive:PATH[:REF]`: a tar of an OCI layout.
    OciArchive {
        path: PathBuf,
        reference: Option<String>,
    },
    /// `docker-archive:PATH[:REF|:@N]`: a `docker save` tar.
    DockerArchive {
        path: PathBuf,
        reference: Option<String>,
    },
}

/// `PATH[:REF]`, split at the first ':' as skopeo does for archives.
fn archive(s: &str, rest: &str) -> Result<(PathBuf, Option<String>), OciError> {
    let (path, reference) = match rest.split_once(':') {
        Some((p, r)) => (p, Some(r.to_string())),
        None => (rest, None),
    };
    if path.is_empty() {
        return Err(OciError::Invalid(format!(
            "{s:?}: missing the archive path"
        )));
    }
    if reference.as_deref() == Some("") {
        return Err(OciError::Invalid(format!("{s:?}: empty image reference")));
    }
    Ok((PathBuf::from(path), reference))
}

impl ImageLocation {
    pub fn parse(s: &str) -> Result<ImageLocation, OciError> {
        if let Some(rest) = s.strip_prefix("oci:") {
            // DIR may not contain ':' in skopeo's syntax; the tag follows the
            // last ':' (a tag cannot contain '/').
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t.to_string())),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(OciError::Invalid(format!(
                    "{s:?}: missing the layout directory (oci:DIR[:TAG])"
                )));
            }
            if let Some(t) = &tag
                && t.is_empty()
            {
                return Err(OciError::Invalid(format!("{s:?}: empty tag")));
            }
            return Ok(ImageLocation::Oci {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (path, reference) = archive(s, rest)?;
            return Ok(ImageLocation::OciArchive { path, reference });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (path, reference) = archive(s, rest)?;
            return Ok(ImageLocation::DockerArchive { path, reference });
        }
        if let Some(reference) = s.strip_prefix("docker://") {
            if reference.is_empty() {
                return Err(OciError::Invalid(format!(
                    "{s:?}: missing the image reference"
                )));
            }
            return Ok(ImageLocation::Docker {
                reference: reference.to_string(),
            });
        }
        Err(OciError::Invalid(format!(
            "{s:?}: unknown transport; use oci:DIR[:TAG], docker://REF, oci-archive:PATH[:REF] or docker-archive:PATH[:REF] (as skopeo does)"
        )))
    }
}

impl fmt::Display for ImageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageLocation::Oci { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            ImageLocation::Oci { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            ImageLocation::Docker { reference } => write!(f, "docker://{reference}"),
            ImageLocation::OciArchive { path, reference } => {
                write!(f, "oci-archive:{}", path.display())?;
                reference.iter().try_for_each(|r| write!(f, ":{r}"))
            }
            ImageLocation::DockerArchive { path, reference } => {
                write!(f, "docker-archive:{}", path.display())?;
                reference.iter().try_for_each(|r| write!(f, ":{r}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_skopeo_syntax() {
        assert_eq!(
            ImageLocation::parse("oci:/tmp/img:v1").unwrap(),
            ImageLocation::Oci {
                dir: "/tmp/img".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageLocation::parse("oci:rel/dir").unwrap(),
            ImageLocation::Oci {
                dir: "rel/dir".into(),
                tag: None
            }
        );
        assert!(matches!(
            ImageLocation::parse("docker://registry:5000/a/b:c").unwrap(),
            ImageLocation::Docker { .. }
        ));
        assert!(ImageLocation::parse("oci:").is_err());
        assert!(ImageLocation::parse("oci:dir:").is_err());
        assert!(ImageLocation::parse("/just/a/path").is_err());
        let l = ImageLocation::parse("oci:/x:y").unwrap();
        assert_eq!(l.to_string(), "oci:/x:y");
        assert_eq!(
            ImageLocation::parse("docker-archive:/tmp/a.tar:busybox:1").unwrap(),
            ImageLocation::DockerArchive {
                path: "/tmp/a.tar".into(),
                reference: Some("busybox:1".into())
            }
        );
        let l = ImageLocation::parse("oci-archive:/tmp/o.tar").unwrap();
        assert_eq!(l.to_string(), "oci-archive:/tmp/o.tar");
        assert!(ImageLocation::parse("oci-archive:").is_err());
        assert!(ImageLocation::parse("docker-archive:/a.tar:").is_err());
    }
}
