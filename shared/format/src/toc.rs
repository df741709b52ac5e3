//! The TOC JSON (`stargz.index.json`) exactly as producers write it.
//!
//! Every field except `name` and `type` is optional because Go's encoder
//! omits zero values; unknown keys (`NumLink` in old writers, `accesstime`
//! in containers/storage) are ignored. This is the wire model; the checked,
//! normalised tree built from it is [`crate::tree::Toc`].

use std::collections::BTreeMap;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;

/// Name of the TOC entry in the TOC tar member.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The one byte a landmark file holds.
pub const LANDMARK_CONTENTS: u8 = 0x0f;

/// Top level of the TOC JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonToc {
    #[serde(default)]
    pub version: i64,
    #[serde(default)]
    pub entries: Vec<JsonEntry>,
    /// containers/storage: digest of the tar-split frame.
    #[serde(
        rename = "tarSplitDigest",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub tar_split_digest: String,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// One TOC entry. Field order follows the Go `TOCEntry` struct so that the
/// JSON we write looks like the reference converter's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub modtime: String,
    #[serde(rename = "linkName", default, skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mode: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: i64,
    #[serde(rename = "userName", default, skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    #[serde(
        rename = "groupName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub group_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: i64,
    /// containers/storage: end of the compressed payload of a `reg` entry.
    #[serde(rename = "endOffset", default, skip_serializing_if = "is_zero")]
    pub end_offset: i64,
    #[serde(rename = "innerOffset", default, skip_serializing_if = "is_zero")]
    pub inner_offset: i64,
    #[serde(rename = "devMajor", default, skip_serializing_if = "is_zero")]
    pub dev_major: i64,
    #[serde(rename = "devMinor", default, skip_serializing_if = "is_zero")]
    pub dev_minor: i64,
    /// Values are standard base64 (Go marshals `[]byte` that way).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(rename = "chunkOffset", default, skip_serializing_if = "is_zero")]
    pub chunk_offset: i64,
    #[serde(rename = "chunkSize", default, skip_serializing_if = "is_zero")]
    pub chunk_size: i64,
    #[serde(
        rename = "chunkDigest",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_digest: String,
    /// containers/storage: `""` (data) or `"zeros"` (a hole).
    #[serde(
        rename = "chunkType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_type: String,
}

impl JsonToc {
    /// Parse TOC JSON. Rejects malformed JSON and wrong versions; the
    /// entries themselves are checked by [`crate::tree::Toc::build`].
    pub fn parse(json: &[u8]) -> Result<JsonToc, ErrorKind> {
        let mut toc = parse_entries(json, JsonToc::default())?;
        toc.version = 1;
        Ok(toc)
    }

    /// Serialise like Go's `json.MarshalIndent(toc, "", "\t")`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        self.serialize(&mut ser)
            .expect("serialising a TOC to memory cannot fail");
        out
    }
}

fn check_version(version: i64) -> Result<(), ErrorKind> {
    if version != 1 {
        return Err(ErrorKind::TocJson(format!(
            "TOC version {version} is not supported (expected 1)"
        )));
    }
    Ok(())
}

/// What takes a TOC's entries as they are parsed.
pub(crate) trait TocSink {
    /// The next entry, in TOC order; an error ends the parse.
    fn entry(&mut self, entry: JsonEntry) -> Result<(), ErrorKind>;
    fn tar_split_digest(&mut self, _digest: String) {}
}

impl TocSink for JsonToc {
    fn entry(&mut self, entry: JsonEntry) -> Result<(), ErrorKind> {
        self.entries.push(entry);
        Ok(())
    }

    fn tar_split_digest(&mut self, digest: String) {
        self.tar_split_digest = digest;
    }
}

/// Parse TOC JSON and hand each entry to `sink`, in order, as soon as it is
/// parsed. The version must be 1; unknown keys are ignored, repeated ones
/// rejected. The first error the sink returns ends the parse and is what
/// the caller gets.
pub(crate) fn parse_entries<S: TocSink>(json: &[u8], mut sink: S) -> Result<S, ErrorKind> {
    let mut rejected = None;
    let mut de = serde_json::Deserializer::from_slice(json);
    let visitor = TocVisitor {
        sink: &mut sink,
        rejected: &mut rejected,
    };
    let parsed = de::Deserializer::deserialize_map(&mut de, visitor).and_then(|()| de.end());
    if let Some(kind) = rejected {
        return Err(kind);
    }
    parsed.map_err(|e| ErrorKind::TocJson(e.to_string()))?;
    Ok(sink)
}

struct TocVisitor<'a, S> {
    sink: &'a mut S,
    /// Why `add` or the version check stopped the parse.
    rejected: &'a mut Option<ErrorKind>,
}

impl<S: TocSink> TocVisitor<'_, S> {
    fn reject<E: de::Error>(&mut self, kind: ErrorKind) -> E {
        *self.rejected = Some(kind);
        E::custom("TOC rejected")
    }
}

impl<'de, S: TocSink> Visitor<'de> for TocVisitor<'_, S> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a TOC object")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let (mut version, mut entries, mut tar_split) = (None, false, false);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "version" => {
                    if version.is_some() {
                        return Err(de::Error::duplicate_field("version"));
                    }
                    let v: i64 = map.next_value()?;
                    if let Err(kind) = check_version(v) {
                        return Err(self.reject(kind));
                    }
                    version = Some(v);
                }
                "entries" => {
                    if entries {
                        return Err(de::Error::duplicate_field("entries"));
                    }
                    entries = true;
                    map.next_value_seed(EntriesSeed {
                        sink: &mut *self.sink,
                        rejected: &mut *self.rejected,
                    })?;
                }
                "tarSplitDigest" => {
                    if tar_split {
                        return Err(de::Error::duplicate_field("tarSplitDigest"));
                    }
                    tar_split = true;
                    self.sink.tar_split_digest(map.next_value()?);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if version.is_none() {
            let kind = check_version(0).expect_err("0 is not a supported version");
            return Err(self.reject(kind));
        }
        Ok(())
    }
}

struct EntriesSeed<'a, S> {
    sink: &'a mut S,
    rejected: &'a mut Option<ErrorKind>,
}

impl<'de, S: TocSink> DeserializeSeed<'de> for EntriesSeed<'_, S> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, S: TocSink> Visitor<'de> for EntriesSeed<'_, S> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of TOC entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(entry) = seq.next_element::<JsonEntry>()? {
            if let Err(kind) = self.sink.entry(entry) {
                *self.rejected = Some(kind);
                return Err(de::Error::custom("TOC entry rejected"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sparse_go_style_json_and_ignores_unknown_keys() {
        let json = br#"{"version":1,"entries":[
            {"name":"bin/","type":"dir","modtime":"2020-01-01T00:00:00Z","mode":16877,"NumLink":0},
            {"name":"bin/sh","type":"reg","size":3,"offset":52,"digest":"sha256:x","accesstime":"x"}]}"#;
        let toc = JsonToc::parse(json).unwrap();
        assert_eq!(toc.entries.len(), 2);
        assert_eq!(toc.entries[0].uid, 0);
        assert_eq!(toc.entries[1].offset, 52);
    }

    #[test]
    fn rejects_wrong_version_and_bad_json() {
        assert!(JsonToc::parse(br#"{"version":2,"entries":[]}"#).is_err());
        assert!(JsonToc::parse(br#"{"version":1,"entries":[{"type":"reg"}]}"#).is_err());
        assert!(JsonToc::parse(b"not json").is_err());
    }

    #[test]
    fn writes_tab_indented_json_without_zero_fields() {
        let toc = JsonToc {
            version: 1,
            entries: vec![JsonEntry {
                name: "a".into(),
                kind: "reg".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let s = String::from_utf8(toc.to_json()).unwrap();
        assert!(s.contains("\n\t\"entries\""), "{s}");
        assert!(!s.contains("size"));
    }
}
