//! `--platform os/arch[/variant]`: which entries of an index to keep.

use std::fmt;

use serde_json::Value;

use crate::OciError;
use crate::layout::Descriptor;

/// One platform asked for; a missing variant matches any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformFilter {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl PlatformFilter {
    pub fn parse(s: &str) -> Result<PlatformFilter, OciError> {
        let parts: Vec<&str> = s.trim().split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(PlatformFilter {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => {
                Ok(PlatformFilter {
                    os: os.to_string(),
                    architecture: arch.to_string(),
                    variant: Some(v.to_string()),
                })
            }
            _ => Err(OciError::Invalid(format!(
                "platform {s:?}: write it as os/arch[/variant], e.g. linux/amd64 or linux/arm64/v8"
            ))),
        }
    }

    pub fn matches(&self, p: &Value) -> bool {
        p["os"] == self.os.as_str()
            && p["architecture"] == self.architecture.as_str()
            && match (&self.variant, p["variant"].as_str()) {
                (Some(v), Some(w)) => v == w,
                (Some(_), None) => false,
                (None, _) => true,
            }
    }

    /// Keep an index entry? Entries without a platform are kept; with no
    /// filter, everything is.
    pub fn keep(filters: &[PlatformFilter], platform: Option<&Value>) -> bool {
        match platform {
            Some(p) if !filters.is_empty() => filters.iter().any(|f| f.matches(p)),
            _ => true,
        }
    }

    pub fn list(filters: &[PlatformFilter]) -> String {
        filters
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The platforms of index entries, for error messages.
    pub fn describe(entries: &[Descriptor]) -> String {
        entries
            .iter()
            .filter_map(|e| e.extra.get("platform"))
            .map(|p| {
                let mut s = format!(
                    "{}/{}",
                    p["os"].as_str().unwrap_or("?"),
                    p["architecture"].as_str().unwrap_or("?")
                );
                if let Some(v) = p["variant"].as_str() {
                    s.push('/');
                    s.push_str(v);
                }
                s
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for PlatformFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filters_platforms() {
        let f = [PlatformFilter::parse("linux/arm64").unwrap()];
        assert!(PlatformFilter::keep(
            &f,
            Some(&json!({"os": "linux", "architecture": "arm64", "variant": "v8"}))
        ));
        assert!(!PlatformFilter::keep(
            &f,
            Some(&json!({"os": "linux", "architecture": "amd64"}))
        ));
        assert!(PlatformFilter::keep(&f, None));
        assert!(PlatformFilter::keep(
            &[],
            Some(&json!({"os": "linux", "architecture": "amd64"}))
        ));
        let v = PlatformFilter::parse("linux/arm/v7").unwrap();
        assert!(!v.matches(&json!({"os": "linux", "architecture": "arm", "variant": "v6"})));
        assert!(PlatformFilter::parse("linux").is_err());
        assert!(PlatformFilter::parse("linux//").is_err());
    }
}
