//! What `stargaze convert` shows while it works: a bar per layer on a
//! terminal (pulling, converting, pushing), plain lines otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use stargaze_oci::{Direction, LayerEvent, LayerOutcome};

pub fn short(d: &str) -> &str {
    &d[..d.len().min(19)]
}

pub fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

pub struct Progress {
    tty: bool,
    multi: MultiProgress,
    style: ProgressStyle,
    bars: Mutex<HashMap<String, (ProgressBar, &'static str)>>,
    /// Layers whose transfer was announced on a plain line already, by phase.
    announced: Mutex<HashMap<String, &'static str>>,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            multi: MultiProgress::new(),
            style: ProgressStyle::with_template(
                "{prefix} {msg:10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
            bars: Mutex::new(HashMap::new()),
            announced: Mutex::new(HashMap::new()),
        }
    }

    pub fn println(&self, line: &str) {
        if self.tty {
            let _ = self.multi.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    /// Move `layer`'s bar to `phase` (a new bar on first sight).
    fn phase(&self, layer: &str, phase: &'static str, done: u64, total: u64) {
        if !self.tty {
            let mut a = self.announced.lock().expect("announced");
            if a.get(layer) != Some(&phase) && phase != "converting" {
                a.insert(layer.to_string(), phase);
                eprintln!("{phase} {} ({:.1} MB)", short(layer), mb(total));
            }
            return;
        }
        let mut bars = self.bars.lock().expect("bars");
        let (bar, current) = bars.entry(layer.to_string()).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(total));
            bar.set_style(self.style.clone());
            bar.set_prefix(short(layer).to_string());
            bar.set_message(phase);
            (bar, phase)
        });
        if *current != phase {
            *current = phase;
            bar.set_message(phase);
            bar.reset();
        }
        bar.set_length(total);
        bar.set_position(done);
    }

    pub fn event(&self, ev: LayerEvent<'_>) {
        match ev {
            LayerEvent::Started { layer, size } => {
                if self.tty {
                    self.phase(layer, "converting", 0, size);
                } else {
                    eprintln!("converting {} ({:.1} MB)", short(layer), mb(size));
                }
            }
            LayerEvent::Progress { layer, done, total } => {
                self.phase(layer, "converting", done, total)
            }
            LayerEvent::Transfer {
                layer,
                direction,
                done,
                total,
            } => {
                let phase = match direction {
                    Direction::Pull => "pulling",
                    Direction::Push => "pushing",
                };
                self.phase(layer, phase, done, total)
            }
            LayerEvent::Finished { layer, outcome } => {
                if let Some((bar, _)) = self.bars.lock().expect("bars").remove(layer) {
                    bar.finish_and_clear();
                }
                self.println(&finished_line(layer, outcome));
            }
        }
    }
}

fn finished_line(layer: &str, outcome: &LayerOutcome) -> String {
    match outcome {
        LayerOutcome::Converted {
            old_size,
            new,
            toc_digest,
            uncompressed_size,
            seconds,
            missing_prioritized,
        } => {
            let mut line = String::new();
            for m in missing_prioritized {
                line.push_str(&format!(
                    "warning: layer {}: prioritized file {m:?} is not in the layer\n",
                    short(layer)
                ));
            }
            line.push_str(&format!(
                "{} {:.1} MB -> {} {:.1} MB, TOC {}, {:.1} s, {:.0} MB/s",
                short(layer),
                mb(*old_size),
                short(&new.digest),
                mb(new.size),
                short(toc_digest),
                seconds,
                mb(*uncompressed_size) / seconds.max(1e-6)
            ));
            line
        }
        LayerOutcome::AlreadyLazy { toc_digest } => format!(
            "{} already lazily pullable (TOC {}), kept",
            short(layer),
            short(toc_digest)
        ),
        LayerOutcome::Kept { reason } => format!("{} kept: {reason}", short(layer)),
    }
}
