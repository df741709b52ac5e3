//! Entrypoint prefetch: the program every container of an image runs
//! first, and what it loads, fetched before the first container asks.
//!
//! Before the first container runs, the fetcher already has everything it
//! takes to start the chain of files an exec reads (`loads.rs`): the image
//! config ([`Command`]: entrypoint, command, `PATH`, working directory) and
//! the index of every layer (`Stack`). [`prefetch`] resolves the program
//! through the stack and follows it as the runtime dependency prefetch
//! follows any program on its first read: its interpreter, its libraries
//! through the image's own loader cache, each fetched at once and examined
//! as soon as it is in. Two more kinds of files every start reads are
//! fetched with it: the ones containerd reads from every image's root
//! filesystem when it creates a container (`/etc/passwd`, `/etc/group`),
//! and files named as arguments of the command (`perl app.pl`). Nothing in
//! here knows a program by its name: what a program reads beyond what its
//! headers say is learned from traces, not guessed.

use crate::loads::{Followed, Found, Loads, What};
use crate::stack::Stack;

/// The `PATH` runtimes use when the image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The program an image's containers run by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// `Entrypoint[0]`, else `Cmd[0]`.
    pub program: String,
    /// The rest of the command line (the entrypoint's, then `Cmd`).
    pub args: Vec<String>,
    /// The directories of the config's `PATH`.
    pub path: Vec<String>,
    pub workdir: String,
    /// The config's `Env` (`NAME=value`; the last of a name wins).
    pub env: Vec<(String, String)>,
}

impl Command {
    /// Read from an image config's execution parameters (`None` when they
    /// name no program).
    pub fn from_config(c: &oci_spec::image::Config) -> Option<Command> {
        let words = |w: &Option<Vec<String>>| w.clone().unwrap_or_default();
        let (entrypoint, cmd) = (words(c.entrypoint()), words(c.cmd()));
        let first = |w: &[String]| w.first().filter(|s| !s.is_empty()).cloned();
        let program = first(&entrypoint).or_else(|| first(&cmd))?;
        let args = entrypoint.into_iter().chain(cmd).skip(1).collect();
        let env: Vec<(String, String)> = words(c.env())
            .iter()
            .filter_map(|v| {
                let (k, v) = v.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect();
        let path = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
        Some(Command {
            program,
            args,
            path: path
                .split(':')
                .filter(|d| d.starts_with('/'))
                .map(str::to_string)
                .collect(),
            workdir: c
                .working_dir()
                .as_deref()
                .filter(|w| w.starts_with('/'))
                .unwrap_or("/")
                .to_string(),
            env,
        })
    }

    /// The value of `name` in the config's environment.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Arguments that name files relative to the working directory or
    /// absolute (`app.py`, `/srv/run.sh`), not options.
    fn file_arguments(&self) -> Vec<String> {
        self.args
            .iter()
            .filter(|a| !a.starts_with('-') && !a.is_empty() && !a.contains(char::is_whitespace))
            .map(|a| {
                if a.starts_with('/') {
                    a.clone()
                } else {
                    format!("{}/{a}", self.workdir.trim_end_matches('/'))
                }
            })
            .collect()
    }

    /// The absolute paths the runtime would try for the program, in order.
    pub fn candidates(&self) -> Vec<String> {
        if self.program.starts_with('/') {
            vec![self.program.clone()]
        } else if self.program.contains('/') {
            vec![format!("{}/{}", self.workdir, self.program)]
        } else {
            self.path
                .iter()
                .map(|d| format!("{d}/{}", self.program))
                .collect()
        }
    }
}

/// Read by containerd itself from every image's root filesystem when it
/// creates a container (the user and its additional groups).
const CONTAINERD_READS: [&str; 2] = ["/etc/passwd", "/etc/group"];

/// Largest file named as an argument that is fetched (a script, not a
/// data set).
const MAX_ARGUMENT_FILE: u64 = 16 << 20;

/// Fetch the program `command` runs and everything it loads, with the
/// files containerd reads at every start and the files its arguments name.
pub async fn prefetch(loads: &Loads, stack: &Stack, command: &Command) -> Followed {
    let Some((path, at, ino)) = stack.first_file(&command.candidates()) else {
        return Followed::default();
    };
    let mut start = vec![Found {
        path,
        at,
        ino,
        what: What::Program,
    }];
    for f in CONTAINERD_READS {
        start.extend(
            stack
                .first_file(&[f.to_string()])
                .map(|(path, at, ino)| Found {
                    path,
                    at,
                    ino,
                    what: What::Data,
                }),
        );
    }
    for f in command.file_arguments() {
        if let Some((path, at, ino)) = stack.first_file(&[f])
            && stack
                .layer(at)
                .index
                .inode(ino)
                .is_some_and(|n| n.size() <= MAX_ARGUMENT_FILE)
        {
            start.push(Found {
                path,
                at,
                ino,
                what: What::Program,
            });
        }
    }
    let done = loads.follow(stack, start, &command.path).await;
    loads.count(done.files.len(), done.bytes);
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(v: serde_json::Value) -> oci_spec::image::Config {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn command_comes_from_entrypoint_then_cmd_with_the_config_path() {
        let c = config(serde_json::json!({
            "Cmd": ["python3"], "Env": ["LANG=C", "PATH=/opt/bin:/usr/bin:relative"], "WorkingDir": "/srv"}));
        let cmd = Command::from_config(&c).unwrap();
        assert_eq!(cmd.program, "python3");
        assert_eq!(cmd.path, ["/opt/bin", "/usr/bin"]);
        assert_eq!(cmd.candidates(), ["/opt/bin/python3", "/usr/bin/python3"]);
        let c = config(serde_json::json!({
            "Entrypoint": ["./run.sh"], "Cmd": ["x"], "WorkingDir": "/app"}));
        let cmd = Command::from_config(&c).unwrap();
        assert_eq!(cmd.candidates(), ["/app/./run.sh"]);
        assert!(Command::from_config(&config(serde_json::json!({}))).is_none());
        let c = config(serde_json::json!({"Cmd": ["sh"]}));
        assert_eq!(Command::from_config(&c).unwrap().path.len(), 6);
    }

    #[test]
    fn command_line_and_environment() {
        let c = config(serde_json::json!({
            "Entrypoint": ["python3", "-u"], "Cmd": ["app.py", "--port", "80", "/srv/x.conf"],
            "Env": ["LANG=C.UTF-8", "TZ=", "LANG=de_DE.UTF-8"], "WorkingDir": "/srv/"}));
        let cmd = Command::from_config(&c).unwrap();
        assert_eq!(cmd.args, ["-u", "app.py", "--port", "80", "/srv/x.conf"]);
        assert_eq!(cmd.var("LANG"), Some("de_DE.UTF-8"), "the last wins");
        assert_eq!(cmd.var("TZ"), Some(""));
        assert_eq!(
            cmd.file_arguments(),
            ["/srv/app.py", "/srv/80", "/srv/x.conf"]
        );
    }
}
