//! `sha256:<hex>` digests as they appear in TOCs, descriptors and annotations,
//! and as layer and blob digests cross the cache, the OCI layout and the
//! services (parsed once where the text enters; [`DigestParseError`] names
//! a malformed one).

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A sha256 content digest. Only sha256 appears in eStargz TOCs and in the
/// images we produce; other algorithms are rejected when parsed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Digest of the given bytes.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// Digest of the empty input (the `digest` of an empty regular file).
    pub fn empty() -> Digest {
        Digest::of(&[])
    }

    /// Lower-case hex without the algorithm prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a digest string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestParseError {
    #[error("digest {0:?} is not of the form sha256:<64 hex digits>")]
    Malformed(String),
    #[error("digest {0:?} uses an unsupported algorithm (only sha256 is supported)")]
    Algorithm(String),
}

/// Marks a byte that is not a lower-case hex digit in [`HEX_VALUE`].
const NOT_HEX: u8 = 0x80;

/// Value of each byte as a lower-case hex digit, or [`NOT_HEX`].
const HEX_VALUE: [u8; 256] = {
    let mut t = [NOT_HEX; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((algo, hex_part)) = s.split_once(':') else {
            return Err(DigestParseError::Malformed(s.to_string()));
        };
        if algo != "sha256" {
            return Err(DigestParseError::Algorithm(s.to_string()));
        }
        // Lower-case hex only, as the OCI spec writes digests. One pass
        // through a table: a TOC holds two digests per file, and parsing
        // them was a sixth of building a TOC's tree with a validating pass
        // and `hex::decode_to_slice`.
        let hex_part = hex_part.as_bytes();
        if hex_part.len() != 64 {
            return Err(DigestParseError::Malformed(s.to_string()));
        }
        let mut out = [0u8; 32];
        let mut bad = 0u8;
        for (o, pair) in out.iter_mut().zip(hex_part.chunks_exact(2)) {
            let (hi, lo) = (HEX_VALUE[pair[0] as usize], HEX_VALUE[pair[1] as usize]);
            bad |= hi | lo;
            *o = hi << 4 | (lo & 0x0f);
        }
        if bad & NOT_HEX != 0 {
            return Err(DigestParseError::Malformed(s.to_string()));
        }
        Ok(Digest(out))
    }
}

/// Incremental sha256 with a byte count, for streams (blobs, diffIDs).
#[derive(Clone, Default)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    pub fn new() -> Hasher {
        Hasher::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Number of bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> Digest {
        Digest(self.inner.finalize().into())
    }
}

/// A writer that hashes and counts everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: std::io::Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Hasher::new(),
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.hasher.len()
    }

    pub fn finish(self) -> (W, Digest, u64) {
        let len = self.hasher.len();
        (self.inner, self.hasher.finish(), len)
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_digest_matches_the_well_known_value() {
        assert_eq!(
            Digest::empty().to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn parse_round_trip_and_rejections() {
        let d = Digest::of(b"x");
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert!(matches!(
            "sha512:00".parse::<Digest>(),
            Err(DigestParseError::Algorithm(_))
        ));
        assert!("sha256:zz".parse::<Digest>().is_err());
        assert!("nocolon".parse::<Digest>().is_err());
        let upper = format!("sha256:{}", d.hex().to_uppercase());
        assert!(upper.parse::<Digest>().is_err());
        for bad in [
            format!("sha256:{}g", "0".repeat(63)),
            format!("sha256:{}é", "0".repeat(62)),
            format!("sha256:{}", "0".repeat(65)),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }
}
