//! Which mtime the mount shows: the one containerd's unpack leaves on the
//! file, so that a lazily pulled rootfs equals the unpacked one.
//!
//! containerd 1.6's applier (`archive/tar.go` `createTarFile`, `time.go`
//! `boundTime`) sets a time before the epoch, or after the largest time a
//! 64-bit count of nanoseconds holds (2262-04-11T23:47:16.854775807Z), to
//! the epoch itself.

/// The latest time containerd sets: Go's `time.Unix(0, 1<<63-1)`.
const MAX_SECS: i64 = i64::MAX / 1_000_000_000;

/// The mtime containerd's unpack gives an entry whose header says `secs`.
pub(crate) fn unpacked_mtime(secs: i64) -> i64 {
    if (0..=MAX_SECS).contains(&secs) {
        secs
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_containerd_can_set_stay() {
        for t in [0, 1, 1_650_000_000, 1 << 31, 4_102_444_800, 9_223_372_036] {
            assert_eq!(unpacked_mtime(t), t);
        }
    }

    #[test]
    fn times_before_1970_or_after_2262_become_the_epoch() {
        for t in [
            -1,
            -86_400,
            i64::MIN,
            9_223_372_037,
            99_999_999_999,
            i64::MAX,
        ] {
            assert_eq!(unpacked_mtime(t), 0, "{t}");
        }
    }
}
