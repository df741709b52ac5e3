//! The layer stacks containers run on, as the fetcher learns them: an
//! image's layers when it is pulled (WarmLayers reads its manifest) and a
//! container's parent chain when its root filesystem is prepared (the
//! snapshotter sends it). A file's dependencies are looked up in the
//! stacks that hold its layer, most recent first.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;

/// Stacks remembered (most recent first); an older one is forgotten.
const MAX_STACKS: usize = 64;
/// Stacks one file's dependencies are looked up in.
pub const MAX_PER_FILE: usize = 2;

/// Known stacks: layer digests, top layer first.
#[derive(Default)]
pub struct Stacks {
    recent: Mutex<VecDeque<Arc<[String]>>>,
}

impl Stacks {
    /// Remember a stack (top layer first), as the most recent.
    pub fn note(&self, top_first: Vec<String>) {
        if top_first.is_empty() {
            return;
        }
        let stack: Arc<[String]> = top_first.into();
        let mut recent = self.recent.lock();
        recent.retain(|s| *s != stack);
        recent.push_front(stack);
        recent.truncate(MAX_STACKS);
    }

    /// The most recent stacks holding `layer` (at most [`MAX_PER_FILE`]);
    /// a layer no known stack holds is a stack of its own.
    pub fn holding(&self, layer: &str) -> Vec<Arc<[String]>> {
        let found: Vec<Arc<[String]>> = self
            .recent
            .lock()
            .iter()
            .filter(|s| s.iter().any(|d| d == layer))
            .take(MAX_PER_FILE)
            .cloned()
            .collect();
        if found.is_empty() {
            vec![Arc::from(vec![layer.to_string()])]
        } else {
            found
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_most_recent_stacks_holding_a_layer_come_first() {
        let stacks = Stacks::default();
        stacks.note(s(&["app1", "base"]));
        stacks.note(s(&["app2", "base"]));
        stacks.note(s(&["other"]));
        stacks.note(s(&["app1", "base"]));
        let base: Vec<Vec<String>> = stacks.holding("base").iter().map(|x| x.to_vec()).collect();
        assert_eq!(base, [s(&["app1", "base"]), s(&["app2", "base"])]);
        assert_eq!(stacks.holding("alone")[0].to_vec(), s(&["alone"]));
        for i in 0..100 {
            stacks.note(s(&[&format!("l{i}")]));
        }
        assert_eq!(stacks.recent.lock().len(), MAX_STACKS);
        assert_eq!(
            stacks.holding("app2")[0].to_vec(),
            s(&["app2"]),
            "forgotten"
        );
    }
}
