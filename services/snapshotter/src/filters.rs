//! containerd list filters, the subset snapshot listing uses:
//! `field==value`, `field!=value`, and presence (`labels."key"`), with `,`
//! joining conditions (AND) and several filters OR'ed. Fields: `name`,
//! `parent`, `kind` (`view`, `active`, `committed`), `labels.KEY` or
//! `labels."KEY"`. Values may be quoted.

use std::collections::BTreeMap;

use crate::store::{Kind, SnapError};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq(String),
    Ne(String),
    Present,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Cond {
    field: Vec<String>,
    op: Op,
}

/// A parsed filter list.
#[derive(Debug, Default)]
pub struct Filter {
    any_of: Vec<Vec<Cond>>,
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2
        && (s.starts_with('"') && s.ends_with('"') || s.starts_with('\'') && s.ends_with('\''))
    {
        s[1..s.len() - 1].replace("\\\"", "\"")
    } else {
        s.to_string()
    }
}

/// Split on `sep` outside double quotes.
fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in s.chars() {
        if ch == '"' {
            quoted = !quoted;
        }
        if ch == sep && !quoted {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(ch);
        }
    }
    out.push(cur);
    out
}

fn parse_field(f: &str) -> Vec<String> {
    let f = f.trim();
    match f.split_once('.') {
        Some((head, rest)) => vec![head.to_string(), unquote(rest)],
        None => vec![f.to_string()],
    }
}

impl Filter {
    pub fn parse(filters: &[String]) -> Result<Filter, SnapError> {
        let mut any_of = Vec::new();
        for f in filters.iter().filter(|f| !f.trim().is_empty()) {
            let mut all = Vec::new();
            for part in split_outside_quotes(f, ',') {
                let part = part.trim();
                let cond = if let Some((l, r)) = part.split_once("!=") {
                    Cond {
                        field: parse_field(l),
                        op: Op::Ne(unquote(r)),
                    }
                } else if let Some((l, r)) = part.split_once("==") {
                    Cond {
                        field: parse_field(l),
                        op: Op::Eq(unquote(r)),
                    }
                } else if part.contains("~=") {
                    return Err(SnapError::InvalidArgument(format!(
                        "filter {f:?}: regular expressions (~=) are not supported"
                    )));
                } else if !part.is_empty() {
                    Cond {
                        field: parse_field(part),
                        op: Op::Present,
                    }
                } else {
                    continue;
                };
                if !matches!(
                    cond.field[0].as_str(),
                    "name" | "parent" | "kind" | "labels"
                ) {
                    return Err(SnapError::InvalidArgument(format!(
                        "filter {f:?}: unknown field {:?}",
                        cond.field[0]
                    )));
                }
                all.push(cond);
            }
            any_of.push(all);
        }
        Ok(Filter { any_of })
    }

    /// Does a snapshot match?
    pub fn matches(
        &self,
        name: &str,
        parent: &str,
        kind: Kind,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        if self.any_of.is_empty() {
            return true;
        }
        let kind_name = match kind {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        };
        self.any_of.iter().any(|all| {
            all.iter().all(|c| {
                let value: Option<&str> = match c.field[0].as_str() {
                    "name" => Some(name),
                    // Present even when empty, as in containerd's adaptor:
                    // its unpacker walks with `parent==""` for base layers.
                    "parent" => Some(parent),
                    "kind" => Some(kind_name),
                    _ => c
                        .field
                        .get(1)
                        .and_then(|k| labels.get(k))
                        .map(String::as_str),
                };
                match &c.op {
                    Op::Present => value.is_some(),
                    Op::Eq(v) => value == Some(v.as_str()),
                    Op::Ne(v) => value.unwrap_or("") != v.as_str(),
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let mut labels = BTreeMap::new();
        labels.insert(
            "containerd.io/snapshot/remote".to_string(),
            "remote snapshot".to_string(),
        );
        let m = |f: &[&str]| {
            Filter::parse(&f.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
                .matches("a", "p", Kind::Committed, &labels)
        };
        assert!(m(&[]));
        assert!(m(&["kind==committed"]));
        assert!(!m(&["kind==active"]));
        assert!(m(&["kind==active", "name==a"]), "OR across filters");
        assert!(!m(&["kind==committed,name==b"]), "AND within a filter");
        assert!(m(&[r#"labels."containerd.io/snapshot/remote""#]));
        assert!(m(&[
            r#"labels."containerd.io/snapshot/remote"=="remote snapshot""#
        ]));
        assert!(m(&["parent!=x"]));
        // containerd's unpacker after a remote Prepare, for a base layer.
        let base = Filter::parse(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:ab,parent=="""#.to_string(),
        ])
        .unwrap();
        let mut l = BTreeMap::new();
        l.insert(
            "containerd.io/snapshot.ref".to_string(),
            "sha256:ab".to_string(),
        );
        assert!(base.matches("sha256:ab", "", Kind::Committed, &l));
        assert!(!base.matches("sha256:ab", "p", Kind::Committed, &l));
        assert!(Filter::parse(&["name~=a.*".into()]).is_err());
        assert!(Filter::parse(&["size==1".into()]).is_err());
    }
}
