//! Which mtime the mount shows: the one containerd's unpack leaves on the
//! file, so that a lazily pulled rootfs equals the unpacked one.
//!
//! containerd 1.6's applier (`archive/tar.go` `createTarFile`, `time.go`
//! `boundTime`) sets a time before the epoch, or after the largest time a
//! 64-bit count of nanoseconds holds (2262-04-11T23:47:16.854775807Z), to
//! the epoch itself; it keeps nanoseconds.

/// The latest time containerd sets: Go's `time.Unix(0, 1<<63-1)`.
const MAX: (i64, u32) = (i64::MAX / 1_000_000_000, (i64::MAX % 1_000_000_000) as u32);

/// The mtime (seconds, nanoseconds) containerd's unpack gives an entry
/// whose header says `secs` and `nsec`.
pub(crate) fn unpacked_mtime(secs: i64, nsec: u32) -> (i64, u32) {
    if secs >= 0 && (secs, nsec) <= MAX {
        (secs, nsec)
    } else {
        (0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_containerd_can_set_stay() {
        for t in [
            (0, 0),
            (1, 1),
            (1_650_000_000, 123_456_789),
            (1 << 31, 0),
            (4_102_444_800, 0),
            (9_223_372_036, 854_775_807),
        ] {
            assert_eq!(unpacked_mtime(t.0, t.1), t);
        }
    }

    #[test]
    fn times_before_1970_or_after_2262_become_the_epoch() {
        for t in [
            (-1, 0),
            (-1, 999_999_999),
            (-86_400, 0),
            (i64::MIN, 0),
            (9_223_372_036, 854_775_808),
            (9_223_372_037, 0),
            (99_999_999_999, 0),
            (i64::MAX, 0),
        ] {
            assert_eq!(unpacked_mtime(t.0, t.1), (0, 0), "{t:?}");
        }
    }
}
