//! Rendering solve progress like buildctl: `plain` (numbered vertices, CACHED / DONE with
//! times, timestamped output lines), `tty` (a live view redrawn in place with the tail of
//! each running step's output), `rawjson` (one SolveStatus-shaped JSON object per event),
//! and `auto` (tty on an interactive terminal outside CI, plain otherwise).
//!
//! Steps that ran a process also show what it used: `#3 DONE 1.2s (cpu 0.9s, peak 84 MiB)`
//! in plain and tty, a `resources` object on the completed vertex in rawjson; the renderer
//! returns every step's figures for `--metadata-file`.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use kiln_executor::limits::format_bytes;
use kiln_proto::Digest;
use kiln_solver::progress::{LogStream, ProgressEvent, ResourceUsage};
use tokio::sync::mpsc;

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Plain,
    Tty,
    RawJson,
}

impl Mode {
    /// `auto`, `plain`, `tty` or `rawjson` (buildctl's names).
    pub fn parse(name: &str) -> Self {
        match name {
            "plain" => Mode::Plain,
            "tty" => Mode::Tty,
            "rawjson" => Mode::RawJson,
            _ => {
                let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
                let ci = std::env::var_os("CI").is_some();
                let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
                if interactive && !ci && !dumb {
                    Mode::Tty
                } else {
                    Mode::Plain
                }
            }
        }
    }
}

#[derive(Debug)]
struct VertexView {
    number: usize,
    name: String,
    started: Option<Instant>,
    finished: Option<Duration>,
    cached: bool,
    error: Option<String>,
    /// Bytes of an unfinished output line.
    partial: Vec<u8>,
    /// Last lines of output (tty view).
    tail: Vec<String>,
    /// What its process used.
    usage: Option<ResourceUsage>,
}

/// What one step's process used, for `--metadata-file`.
#[derive(Clone, Debug)]
pub struct StepUsage {
    pub digest: Digest,
    pub name: String,
    pub usage: ResourceUsage,
}

/// The figures of `usage` as JSON (seconds and bytes), in rawjson and `--metadata-file`.
pub fn usage_json(usage: &ResourceUsage) -> serde_json::Value {
    serde_json::json!({
        "wallSeconds": usage.wall.as_secs_f64(),
        "userCpuSeconds": usage.user_cpu.as_secs_f64(),
        "systemCpuSeconds": usage.system_cpu.as_secs_f64(),
        "peakMemoryBytes": usage.peak_memory,
        // "cgroup": all the step's processes at once; "process": its largest process.
        "peakMemoryScope": if usage.peak_memory_total { "cgroup" } else { "process" },
        "readBytes": usage.read_bytes,
        "writtenBytes": usage.written_bytes,
    })
}

/// `(cpu 0.9s, peak 84 MiB)`.
fn usage_text(usage: &ResourceUsage) -> String {
    format!(
        "(cpu {:.1}s, peak {})",
        usage.cpu().as_secs_f64(),
        format_bytes(usage.peak_memory)
    )
}

/// Turns progress events into text on standard error.
#[derive(Debug)]
pub struct Renderer {
    mode: Mode,
    start: Instant,
    vertices: HashMap<Digest, VertexView>,
    order: Vec<Digest>,
    drawn_lines: usize,
    /// Usage not yet attached to a completed vertex (rawjson).
    pending_usage: HashMap<Digest, ResourceUsage>,
    /// Every step's usage, in the order they finished.
    usages: Vec<StepUsage>,
    /// Vertex names as events bring them (every mode).
    names: HashMap<Digest, String>,
    /// Plain and rawjson output not written yet: written once the events at hand are
    /// handled (one write for many lines, not one per piece of a line).
    out: Vec<u8>,
}

const TAIL: usize = 6;

fn rfc3339(at: SystemTime) -> String {
    kiln_proto::gojson::rfc3339_nanos(at)
}

impl Renderer {
    pub fn new(mode: Mode) -> Self {
        Renderer {
            mode,
            start: Instant::now(),
            vertices: HashMap::new(),
            order: Vec::new(),
            drawn_lines: 0,
            pending_usage: HashMap::new(),
            usages: Vec::new(),
            names: HashMap::new(),
            out: Vec::new(),
        }
    }

    fn view(&mut self, vertex: &Digest, name: Option<&str>) -> &mut VertexView {
        if !self.vertices.contains_key(vertex) {
            self.order.push(vertex.clone());
            let number = self.order.len();
            self.vertices.insert(
                vertex.clone(),
                VertexView {
                    number,
                    name: name.unwrap_or_default().to_owned(),
                    started: None,
                    finished: None,
                    cached: false,
                    error: None,
                    partial: Vec::new(),
                    tail: Vec::new(),
                    usage: None,
                },
            );
        }
        let view = self
            .vertices
            .get_mut(vertex)
            .unwrap_or_else(|| unreachable!("inserted above"));
        if let Some(name) = name {
            if view.name.is_empty() {
                name.clone_into(&mut view.name);
            }
        }
        view
    }

    /// Consumes events until the channel closes; returns what each step used.
    pub async fn run(mut self, mut events: mpsc::Receiver<ProgressEvent>) -> Vec<StepUsage> {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => {
                        self.handle(event);
                        // Whatever else is already queued goes out with it.
                        while let Ok(event) = events.try_recv() {
                            self.handle(event);
                        }
                        self.flush();
                    }
                    None => break,
                },
                _ = tick.tick(), if self.mode == Mode::Tty => self.draw(false),
            }
        }
        self.finish();
        self.usages
    }

    fn flush(&mut self) {
        if !self.out.is_empty() {
            let _ = std::io::stderr().lock().write_all(&self.out);
            self.out.clear();
        }
    }

    fn handle(&mut self, event: ProgressEvent) {
        match &event {
            ProgressEvent::Started { vertex, name, .. } => {
                self.names.insert(vertex.clone(), name.clone());
            }
            ProgressEvent::Usage { vertex, usage, .. } => {
                let name = self.names.get(vertex).cloned().unwrap_or_default();
                self.usages.push(StepUsage {
                    digest: vertex.clone(),
                    name,
                    usage: *usage,
                });
            }
            _ => {}
        }
        match self.mode {
            Mode::RawJson => self.json(&event),
            Mode::Plain => self.plain(event),
            Mode::Tty => self.track(event),
        }
    }

    fn json(&mut self, event: &ProgressEvent) {
        let resources = |pending: &mut HashMap<Digest, ResourceUsage>, vertex: &Digest| {
            pending.remove(vertex).map(|u| usage_json(&u))
        };
        let line = match event {
            ProgressEvent::Started { vertex, name, at } => serde_json::json!({
                "vertexes": [{"digest": vertex.as_str(), "name": name, "started": rfc3339(*at)}]
            }),
            ProgressEvent::Done { vertex, name, at } => {
                let mut v = serde_json::json!({
                    "digest": vertex.as_str(), "name": name, "completed": rfc3339(*at)
                });
                if let Some(r) = resources(&mut self.pending_usage, vertex) {
                    v["resources"] = r;
                }
                serde_json::json!({ "vertexes": [v] })
            }
            ProgressEvent::Cached { vertex, name, at } => serde_json::json!({
                "vertexes": [{"digest": vertex.as_str(), "name": name, "cached": true,
                              "started": rfc3339(*at), "completed": rfc3339(*at)}]
            }),
            ProgressEvent::Error {
                vertex,
                name,
                at,
                error,
            } => {
                let mut v = serde_json::json!({
                    "digest": vertex.as_str(), "name": name,
                    "completed": rfc3339(*at), "error": error
                });
                if let Some(r) = resources(&mut self.pending_usage, vertex) {
                    v["resources"] = r;
                }
                serde_json::json!({ "vertexes": [v] })
            }
            // Shown with the vertex's completion.
            ProgressEvent::Usage { vertex, usage, .. } => {
                self.pending_usage.insert(vertex.clone(), *usage);
                return;
            }
            ProgressEvent::Log {
                vertex,
                stream,
                data,
                at,
            } => serde_json::json!({
                "logs": [{"vertex": vertex.as_str(),
                          "stream": if *stream == LogStream::Stdout { 1 } else { 2 },
                          "data": base64::engine::general_purpose::STANDARD.encode(data),
                          "timestamp": rfc3339(*at)}]
            }),
        };
        let _ = writeln!(self.out, "{line}");
    }

    fn plain(&mut self, event: ProgressEvent) {
        let mut out = std::mem::take(&mut self.out);
        self.plain_into(&mut out, event);
        self.out = out;
    }

    fn plain_into(&mut self, err: &mut Vec<u8>, event: ProgressEvent) {
        let elapsed = self.start.elapsed();
        match event {
            ProgressEvent::Started { vertex, name, .. } => {
                let v = self.view(&vertex, Some(&name));
                v.started = Some(Instant::now());
                let _ = writeln!(err, "\n#{} {}", v.number, v.name);
            }
            ProgressEvent::Cached { vertex, name, .. } => {
                let v = self.view(&vertex, Some(&name));
                v.cached = true;
                let _ = writeln!(err, "\n#{} {}\n#{} CACHED", v.number, v.name, v.number);
            }
            ProgressEvent::Log { vertex, data, .. } => {
                let v = self.view(&vertex, None);
                v.partial.extend_from_slice(&data);
                while let Some(pos) = v.partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = v.partial.drain(..=pos).collect();
                    let _ = writeln!(
                        err,
                        "#{} {:.3} {}",
                        v.number,
                        elapsed.as_secs_f64(),
                        String::from_utf8_lossy(&line[..line.len() - 1])
                    );
                }
            }
            ProgressEvent::Done { vertex, name, .. } => {
                let v = self.view(&vertex, Some(&name));
                flush_partial(err, v, elapsed);
                let took = v.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
                match &v.usage {
                    Some(usage) => {
                        let _ =
                            writeln!(err, "#{} DONE {took:.1}s {}", v.number, usage_text(usage));
                    }
                    None => {
                        let _ = writeln!(err, "#{} DONE {took:.1}s", v.number);
                    }
                }
            }
            ProgressEvent::Usage { vertex, usage, .. } => {
                self.view(&vertex, None).usage = Some(usage);
            }
            ProgressEvent::Error {
                vertex,
                name,
                error,
                ..
            } => {
                let v = self.view(&vertex, Some(&name));
                flush_partial(err, v, elapsed);
                let _ = writeln!(err, "#{} ERROR: {}", v.number, error);
            }
        }
    }

    fn track(&mut self, event: ProgressEvent) {
        match event {
            ProgressEvent::Started { vertex, name, .. } => {
                self.view(&vertex, Some(&name)).started = Some(Instant::now());
            }
            ProgressEvent::Cached { vertex, name, .. } => {
                let v = self.view(&vertex, Some(&name));
                v.cached = true;
                v.finished = Some(Duration::ZERO);
            }
            ProgressEvent::Log { vertex, data, .. } => {
                let v = self.view(&vertex, None);
                v.partial.extend_from_slice(&data);
                while let Some(pos) = v.partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = v.partial.drain(..=pos).collect();
                    v.tail
                        .push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
                    if v.tail.len() > TAIL {
                        v.tail.remove(0);
                    }
                }
            }
            ProgressEvent::Done { vertex, name, .. } => {
                let v = self.view(&vertex, Some(&name));
                v.finished = Some(v.started.map_or(Duration::ZERO, |s| s.elapsed()));
                v.tail.clear();
            }
            ProgressEvent::Usage { vertex, usage, .. } => {
                self.view(&vertex, None).usage = Some(usage);
            }
            ProgressEvent::Error {
                vertex,
                name,
                error,
                ..
            } => {
                let v = self.view(&vertex, Some(&name));
                v.finished = Some(v.started.map_or(Duration::ZERO, |s| s.elapsed()));
                v.error = Some(error);
            }
        }
    }

    /// Redraws the tty view over the previous one.
    fn draw(&mut self, last: bool) {
        let mut out = String::new();
        if self.drawn_lines > 0 {
            out.push_str(&format!("\x1b[{}A\x1b[J", self.drawn_lines));
        }
        let done = self
            .vertices
            .values()
            .filter(|v| v.finished.is_some())
            .count();
        let mut lines = vec![format!(
            "[+] Building {:.1}s ({}/{}){}",
            self.start.elapsed().as_secs_f64(),
            done,
            self.vertices.len(),
            if last { " FINISHED" } else { "" }
        )];
        for digest in &self.order {
            let Some(v) = self.vertices.get(digest) else {
                continue;
            };
            let time = match (v.finished, v.started) {
                (Some(d), _) if v.error.is_none() && v.usage.is_some() => format!(
                    "{:.1}s {}",
                    d.as_secs_f64(),
                    v.usage.as_ref().map(usage_text).unwrap_or_default()
                ),
                (Some(d), _) => format!("{:.1}s", d.as_secs_f64()),
                (None, Some(s)) => format!("{:.1}s", s.elapsed().as_secs_f64()),
                (None, None) => String::new(),
            };
            let status = if v.cached {
                "CACHED ".to_owned()
            } else if v.error.is_some() {
                "ERROR ".to_owned()
            } else {
                String::new()
            };
            lines.push(format!(" => {status}{} {time}", v.name));
            if v.finished.is_none() && v.started.is_some() {
                lines.extend(v.tail.iter().map(|l| format!(" => => # {l}")));
            }
            if let Some(error) = &v.error {
                lines.push(format!(" => => # ERROR: {error}"));
            }
        }
        for line in &lines {
            out.push_str(line);
            out.push('\n');
        }
        self.drawn_lines = lines.len();
        let _ = std::io::stderr().lock().write_all(out.as_bytes());
    }

    fn finish(&mut self) {
        self.flush();
        if self.mode == Mode::Tty {
            self.draw(true);
        }
    }
}

fn flush_partial(err: &mut impl Write, v: &mut VertexView, elapsed: Duration) {
    if !v.partial.is_empty() {
        let _ = writeln!(
            err,
            "#{} {:.3} {}",
            v.number,
            elapsed.as_secs_f64(),
            String::from_utf8_lossy(&v.partial)
        );
        v.partial.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000000Z"
        );
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.000000005Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000000Z");
    }
}
