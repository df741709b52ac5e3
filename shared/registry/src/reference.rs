//! Image references as containerd and docker read them.

use std::fmt;

use crate::RegistryError;

/// `[host[:port]/]path[:tag][@sha256:...]`
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// The host as written (`docker.io` when none was).
    pub host: String,
    /// The repository path (`library/` added to single names on docker.io).
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

fn is_host(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost" || first.starts_with('[')
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, RegistryError> {
        let bad = |why: &str| RegistryError::Reference {
            reference: s.to_string(),
            reason: why.to_string(),
        };
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                d.parse::<stargaze_format::Digest>()
                    .map_err(|e| bad(&e.to_string()))?;
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (host, path) = match rest.split_once('/') {
            Some((first, path)) if is_host(first) => (first.to_string(), path.to_string()),
            _ => ("docker.io".to_string(), rest.to_string()),
        };
        // A tag follows the last ':' of the path (the host's port was split off).
        let (path, tag) = match path.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p.to_string(), Some(t.to_string())),
            _ => (path, None),
        };
        if path.is_empty()
            || path.split('/').any(|c| {
                c.is_empty()
                    || !c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            })
        {
            return Err(bad(
                "the repository must be lower-case letters, digits, '.', '_', '-' and '/'",
            ));
        }
        if let Some(t) = &tag
            && (t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        {
            return Err(bad("invalid tag"));
        }
        let repository = if host == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            host,
            repository,
            tag,
            digest,
        })
    }

    /// The host the registry API is served on.
    pub fn api_host(&self) -> &str {
        if self.host == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.host
        }
    }

    /// Tag or digest, whichever identifies the manifest (digest wins).
    pub fn object(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// localhost and loopback addresses default to plain HTTP, as in containerd.
    pub fn is_localhost(&self) -> bool {
        let h = self.host.as_str();
        let name = if let Some(rest) = h.strip_prefix('[') {
            rest.split(']').next().unwrap_or("")
        } else {
            h.rsplit_once(':').map(|(n, _)| n).unwrap_or(h)
        };
        name == "localhost" || name == "::1" || name.starts_with("127.")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_docker() {
        let r = Reference::parse("python:3.11").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/python", Some("3.11"))
        );
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r = Reference::parse("127.0.0.1:5000/a/b").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "a/b", Some("latest"))
        );
        assert!(r.is_localhost());
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("ghcr.io/x/y:1@{d}")).unwrap();
        assert_eq!(r.object(), d);
        assert!(!r.is_localhost());
        assert!(Reference::parse("localhost/x").unwrap().is_localhost());
        assert!(Reference::parse("[::1]:5000/x").unwrap().is_localhost());
        assert_eq!(Reference::parse("user/app").unwrap().repository, "user/app");
        for bad in ["", "UPPER/x", "x@sha256:zz", "host.io/", "a//b", "x:t@g"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Reference::parse("r.io/a:1").unwrap().to_string(),
            "r.io/a:1"
        );
    }
}
