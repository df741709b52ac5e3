//! Kill points for the restart tests: with `STARGAZE_FS_TEST_KILL` set to
//! `<point>:<path>`, the process kills itself (SIGKILL, as `kill -9` does)
//! when it reaches `<point>` for the file at `<path>` in its layer, so a
//! test can take the connection over from a process that died exactly
//! there: a window of microseconds otherwise. The variable is read once;
//! unset, a kill point costs a load.

use std::sync::OnceLock;

use crate::FsShared;

/// The variable that arms a kill point.
pub const ENV: &str = "STARGAZE_FS_TEST_KILL";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Point {
    /// An open recorded in the open-file table, its answer not written.
    OpenRecorded,
    /// A release of a passthrough handle that cleared its record, nothing
    /// else done.
    ReleaseUnrecorded,
    /// A release that closed its handle's backing id, not answered.
    ReleaseClosedBacking,
}

impl Point {
    fn name(self) -> &'static str {
        match self {
            Point::OpenRecorded => "open-recorded",
            Point::ReleaseUnrecorded => "release-unrecorded",
            Point::ReleaseClosedBacking => "release-closed-backing",
        }
    }
}

/// The point and the file's path (without its leading `/`), when armed.
static ARMED: OnceLock<Option<(String, String)>> = OnceLock::new();

/// Die here when armed for `point` and the file of node `ino`.
pub(crate) fn reached(shared: &FsShared, point: Point, ino: u64) {
    let armed = ARMED.get_or_init(|| {
        let v = std::env::var(ENV).ok()?;
        let (p, path) = v.split_once(':')?;
        Some((p.to_string(), path.trim_start_matches('/').to_string()))
    });
    let Some((p, path)) = armed else {
        return;
    };
    if p != point.name() {
        return;
    }
    let Some((a, local)) = shared.layers.resolve(ino) else {
        return;
    };
    if a.index.path_of(local).trim_start_matches('/') != path.as_str() {
        return;
    }
    eprintln!("{ENV}: killed at {} of {path}", point.name());
    // SAFETY: raise has no preconditions; SIGKILL ends the whole process.
    unsafe {
        libc::raise(libc::SIGKILL);
    }
}
