//! "Machines" for distribution tests: kiln states that share nothing but registries — each
//! its own `--root`, `kiln.toml` and Docker config, run as root or as the test user — and
//! what their runs tell (steps that ran, bytes moved).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::host::TEST_USER;

/// One kiln state.
#[derive(Debug, Clone)]
pub struct Machine {
    /// The `kiln` binary.
    pub kiln: PathBuf,
    pub root: PathBuf,
    pub config: PathBuf,
    /// `DOCKER_CONFIG`: the directory holding `config.json`.
    pub docker_config: PathBuf,
    pub as_test_user: bool,
}

/// A temporary directory everyone may use (the test user writes its state there).
pub fn world_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("temporary directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod the temporary directory");
    dir
}

/// Gives `path` (recursively) to the test user, as a checkout of that user would be.
pub fn give_to_test_user(path: &Path) {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{TEST_USER}:{TEST_USER}"))
        .arg(path)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown {} failed", path.display());
}

impl Machine {
    /// A machine under `dir/name` with this `kiln.toml` and Docker `config.json`.
    pub fn new(
        kiln: &Path,
        dir: &Path,
        name: &str,
        kiln_toml: &str,
        docker_config: &str,
        as_test_user: bool,
    ) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let home = dir.join(name);
        std::fs::create_dir_all(&home).expect("machine directory");
        let config = home.join("kiln.toml");
        std::fs::write(&config, kiln_toml).expect("write kiln.toml");
        let dc = home.join("docker");
        std::fs::create_dir_all(&dc).expect("docker config directory");
        std::fs::write(dc.join("config.json"), docker_config).expect("write config.json");
        for (p, mode) in [
            (&home, 0o777),
            (&dc, 0o755),
            (&config, 0o644),
            (&dc.join("config.json"), 0o644),
        ] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        Machine {
            kiln: kiln.to_owned(),
            root: home.join("root"),
            config,
            docker_config: dc,
            as_test_user,
        }
    }

    /// Runs `kiln --debug --root … --config … build --progress rawjson ARGS` (standard input
    /// from `stdin` when given).
    pub fn build(&self, args: &[String], stdin: Option<&Path>) -> Output {
        let mut command = if self.as_test_user {
            let mut c = Command::new("runuser");
            c.args(["-u", TEST_USER, "--", "env"])
                .arg(format!("HOME=/home/{TEST_USER}"))
                .arg(&self.kiln);
            c
        } else {
            Command::new(&self.kiln)
        };
        command
            .env("DOCKER_CONFIG", &self.docker_config)
            .arg("--debug")
            .arg("--root")
            .arg(&self.root)
            .arg("--config")
            .arg(&self.config)
            .args(["build", "--progress", "rawjson"])
            .args(args)
            .current_dir("/tmp")
            .stdin(match stdin {
                Some(path) => Stdio::from(std::fs::File::open(path).expect("open standard input")),
                None => Stdio::null(),
            });
        command.output().expect("run kiln")
    }
}

/// The standard error of a run, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `(digest, name)` of the vertices that ran (started, not cached) according to
/// `--progress rawjson`.
pub fn executed(output: &Output) -> Vec<(String, String)> {
    let mut started = Vec::new();
    let mut cached = HashSet::new();
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        for vertex in v["vertexes"].as_array().into_iter().flatten() {
            let digest = vertex["digest"].as_str().unwrap_or_default().to_owned();
            let name = vertex["name"].as_str().unwrap_or_default().to_owned();
            if vertex["cached"] == true {
                cached.insert(digest);
            } else if vertex.get("started").is_some() && !started.iter().any(|(d, _)| *d == digest)
            {
                started.push((digest, name));
            }
        }
    }
    started.retain(|(d, _)| !cached.contains(d));
    started
}

/// The Dockerfile steps (`RUN …`, `COPY …`) that ran, without their `[n/m]` prefix.
pub fn steps_run(output: &Output) -> Vec<String> {
    let mut steps: Vec<String> = executed(output)
        .into_iter()
        .map(|(_, name)| {
            name.split_once("] ")
                .map_or(name.clone(), |(_, rest)| rest.to_owned())
        })
        .filter(|n| n.starts_with("RUN ") || n.starts_with("COPY ") || n.starts_with("ADD "))
        .collect();
    steps.sort();
    steps
}

fn figure(o: &Output, word: &str) -> (u64, u64) {
    let text = stderr(o);
    let line = text
        .lines()
        .find(|l| l.contains("bodies downloaded"))
        .unwrap_or_else(|| panic!("no transfer figures (kiln --debug) in:\n{text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words
        .windows(2)
        .position(|w| w[0] == "bodies" && w[1].trim_end_matches(',') == word)
        .unwrap_or_else(|| panic!("no {word:?} figure in {line:?}"));
    let count = words[at - 1].parse().expect("a count");
    let bytes = words[at + 2]
        .trim_end_matches([',', ';'])
        .parse()
        .expect("bytes");
    (count, bytes)
}

/// `(bodies, bytes)` kiln says it downloaded from registries (`--debug`).
pub fn downloaded(o: &Output) -> (u64, u64) {
    figure(o, "downloaded")
}

/// `(bodies, bytes)` kiln says it uploaded to registries (`--debug`).
pub fn uploaded(o: &Output) -> (u64, u64) {
    figure(o, "uploaded")
}

/// Blobs in a state's content store that are gzip data (layers).
pub fn layer_blobs(root: &Path) -> usize {
    let dir = root.join("content/blobs/sha256");
    std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    std::fs::read(e.path())
                        .map(|b| b.starts_with(&[0x1f, 0x8b]))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    fn output(stderr: &str) -> Output {
        Output {
            status: std::process::ExitStatus::from_raw(0),
            stdout: Vec::new(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    #[test]
    fn reads_steps_and_figures() {
        let o = output(concat!(
            r#"{"vertexes":[{"digest":"a","name":"[2/3] RUN x","started":"t"}]}"#,
            "\n",
            r#"{"vertexes":[{"digest":"b","name":"[3/3] COPY y /y","started":"t","cached":true}]}"#,
            "\n",
            r#"{"vertexes":[{"digest":"c","name":"[internal] load build context","started":"t"}]}"#,
            "\n",
            "INFO registries: 4 bodies downloaded, 3557 bytes; 2 bodies uploaded, 99 bytes\n",
        ));
        assert_eq!(steps_run(&o), ["RUN x"]);
        assert_eq!(executed(&o).len(), 2);
        assert_eq!(downloaded(&o), (4, 3557));
        assert_eq!(uploaded(&o), (2, 99));
    }
}
