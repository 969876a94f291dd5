//! Typed Dockerfile instructions (BuildKit v0.11.6 `frontend/dockerfile/instructions`):
//! every instruction of the dockerfile 1.5 syntax with its flags (`BFlags`), argument
//! validation, `RUN --mount` specifications, and the grouping of instructions into build
//! stages. Error texts are BuildKit's, which is why they are not all lower-case.

use crate::gocompat;
use crate::parser::{self, Arg, Heredoc, Node, Parsed};

/// Errors from turning parsed nodes into instructions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstructionError {
    /// An instruction could not be parsed (BuildKit's `parseError`).
    #[error("dockerfile parse error on line {line}: {message}")]
    Parse {
        line: usize,
        message: String,
        location: Vec<(usize, usize)>,
    },
    /// A single instruction (an `ONBUILD` trigger) could not be parsed; BuildKit reports
    /// these without the line prefix.
    #[error("{message}")]
    Invalid {
        message: String,
        location: Vec<(usize, usize)>,
    },
    /// An instruction appears before the first `FROM`.
    #[error("no build stage in current context")]
    NoBuildStage { location: Vec<(usize, usize)> },
    /// An `ONBUILD` trigger is not a command (e.g. `FROM`).
    #[error("*instructions.Stage is not a command type")]
    NotACommand { location: Vec<(usize, usize)> },
    /// A `RUN --mount` value is invalid.
    #[error("{0}")]
    Mount(String),
}

impl InstructionError {
    /// The source lines the error refers to.
    pub fn location(&self) -> &[(usize, usize)] {
        match self {
            InstructionError::Parse { location, .. }
            | InstructionError::Invalid { location, .. }
            | InstructionError::NoBuildStage { location }
            | InstructionError::NotACommand { location } => location,
            InstructionError::Mount(_) => &[],
        }
    }
}

/// Options that change which flags exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseOptions {
    /// The labs channel (BuildKit build tags `dfrunsecurity dfaddgit dfaddchecksum`):
    /// `RUN --security`, `ADD --checksum` and `ADD <git ref>`.
    pub labs: bool,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions { labs: true }
    }
}

/// A name/value pair in source order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

impl KeyValue {
    pub fn display(&self) -> String {
        format!("{}={}", self.key, self.value)
    }
}

/// An `ARG` entry, whose value is optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValueOptional {
    pub key: String,
    pub value: Option<String>,
    pub comment: String,
}

impl KeyValueOptional {
    pub fn value_string(&self) -> String {
        self.value.clone().unwrap_or_default()
    }
}

/// What every command carries: its source text, name as written and location.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Code {
    /// The trimmed original line (BuildKit's `String()` of a command).
    pub code: String,
    pub name: String,
    pub location: Vec<(usize, usize)>,
}

/// An inline file of a `COPY`/`ADD` (`<<EOF` source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceContent {
    pub path: String,
    pub data: String,
    pub expand: bool,
}

/// Sources and destination of `COPY`/`ADD`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourcesAndDest {
    pub dest_path: String,
    pub source_paths: Vec<String>,
    pub source_contents: Vec<SourceContent>,
}

/// An inline file of a `RUN` (heredoc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellInlineFile {
    pub name: String,
    pub data: String,
    pub chomp: bool,
}

/// A command line that is run through the shell unless given in JSON form.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShellDependantCmdLine {
    /// `None` where BuildKit keeps a nil slice (an empty `ENTRYPOINT`).
    pub cmd_line: Option<Vec<String>>,
    pub files: Vec<ShellInlineFile>,
    pub prepend_shell: bool,
}

impl ShellDependantCmdLine {
    pub fn args(&self) -> Vec<String> {
        self.cmd_line.clone().unwrap_or_default()
    }
}

/// A `RUN --mount` specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_type: String,
    pub from: String,
    pub source: String,
    pub target: String,
    pub read_only: bool,
    pub size_limit: i64,
    pub cache_id: String,
    pub cache_sharing: String,
    pub required: bool,
    pub mode: Option<u64>,
    pub uid: Option<u64>,
    pub gid: Option<u64>,
}

/// `HEALTHCHECK` settings (durations in nanoseconds).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HealthConfig {
    pub test: Vec<String>,
    pub interval: i64,
    pub timeout: i64,
    pub start_period: i64,
    pub retries: i64,
}

/// `RUN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCommand {
    pub code: Code,
    pub cmd: ShellDependantCmdLine,
    /// The raw `--mount` values; expanded and parsed again at dispatch.
    pub mount_specs: Vec<String>,
    /// Mounts as parsed without expansion (only `from` is known at this point).
    pub mounts: Vec<Mount>,
    pub network: String,
    pub security: String,
    pub flags_used: Vec<String>,
}

/// `ADD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddCommand {
    pub code: Code,
    pub sources: SourcesAndDest,
    pub chown: String,
    pub chmod: String,
    pub link: bool,
    pub keep_git_dir: bool,
    pub checksum: String,
}

/// `COPY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyCommand {
    pub code: Code,
    pub sources: SourcesAndDest,
    pub from: String,
    pub chown: String,
    pub chmod: String,
    pub link: bool,
}

/// A Dockerfile command (everything but `FROM`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Env {
        code: Code,
        env: Vec<KeyValue>,
    },
    Maintainer {
        code: Code,
        maintainer: String,
    },
    Label {
        code: Code,
        labels: Vec<KeyValue>,
    },
    Add(AddCommand),
    Copy(CopyCommand),
    Onbuild {
        code: Code,
        expression: String,
    },
    Workdir {
        code: Code,
        path: String,
    },
    Run(RunCommand),
    Cmd {
        code: Code,
        cmd: ShellDependantCmdLine,
    },
    Healthcheck {
        code: Code,
        health: HealthConfig,
    },
    Entrypoint {
        code: Code,
        cmd: ShellDependantCmdLine,
    },
    Expose {
        code: Code,
        ports: Vec<String>,
    },
    User {
        code: Code,
        user: String,
    },
    Volume {
        code: Code,
        volumes: Vec<String>,
    },
    StopSignal {
        code: Code,
        signal: String,
    },
    Arg {
        code: Code,
        args: Vec<KeyValueOptional>,
    },
    Shell {
        code: Code,
        shell: Vec<String>,
    },
}

impl Command {
    pub fn code(&self) -> &Code {
        match self {
            Command::Env { code, .. }
            | Command::Maintainer { code, .. }
            | Command::Label { code, .. }
            | Command::Onbuild { code, .. }
            | Command::Workdir { code, .. }
            | Command::Cmd { code, .. }
            | Command::Healthcheck { code, .. }
            | Command::Entrypoint { code, .. }
            | Command::Expose { code, .. }
            | Command::User { code, .. }
            | Command::Volume { code, .. }
            | Command::StopSignal { code, .. }
            | Command::Arg { code, .. }
            | Command::Shell { code, .. } => code,
            Command::Add(c) => &c.code,
            Command::Copy(c) => &c.code,
            Command::Run(c) => &c.code,
        }
    }

    pub fn location(&self) -> &[(usize, usize)] {
        &self.code().location
    }
}

/// A build stage: a `FROM` and the commands up to the next one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stage {
    /// Lower-cased `AS` name, or empty.
    pub name: String,
    pub commands: Vec<Command>,
    pub base_name: String,
    pub platform: String,
    pub comment: String,
    pub source_code: String,
    pub location: Vec<(usize, usize)>,
}

/// A parsed instruction: a stage start or a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    Stage(Stage),
    Command(Command),
}

/// The stages and the `ARG`s before the first `FROM`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dockerfile {
    pub stages: Vec<Stage>,
    pub meta_args: Vec<(Code, Vec<KeyValueOptional>)>,
}

const ALL_INSTRUCTIONS: [&str; 18] = [
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// Parses all instructions of `parsed` with the labs channel on.
pub fn parse(parsed: &Parsed) -> Result<Dockerfile, InstructionError> {
    parse_with(parsed, ParseOptions::default())
}

/// Parses all instructions of `parsed` into stages.
pub fn parse_with(parsed: &Parsed, opts: ParseOptions) -> Result<Dockerfile, InstructionError> {
    let mut out = Dockerfile::default();
    for node in &parsed.children {
        let instruction =
            parse_instruction(node, opts).map_err(|message| InstructionError::Parse {
                line: node.start_line,
                message,
                location: node.location(),
            })?;
        match instruction {
            Instruction::Command(Command::Arg { code, args }) if out.stages.is_empty() => {
                out.meta_args.push((code, args));
            }
            Instruction::Stage(stage) => out.stages.push(stage),
            Instruction::Command(cmd) => match out.stages.last_mut() {
                Some(stage) => stage.commands.push(cmd),
                None => {
                    return Err(InstructionError::NoBuildStage {
                        location: node.location(),
                    });
                }
            },
        }
    }
    Ok(out)
}

/// Parses a single node that must be a command (used for `ONBUILD` triggers).
pub fn parse_command(node: &Node, opts: ParseOptions) -> Result<Command, InstructionError> {
    match parse_instruction(node, opts) {
        Ok(Instruction::Command(c)) => Ok(c),
        Ok(Instruction::Stage(_)) => Err(InstructionError::NotACommand {
            location: node.location(),
        }),
        Err(message) => Err(InstructionError::Invalid {
            message,
            location: node.location(),
        }),
    }
}

/// The arguments of a node, flattening an `ONBUILD` sub-command.
fn node_args(args: &[Arg]) -> Vec<String> {
    let mut out = Vec::new();
    for arg in args {
        match arg {
            Arg::Word(w) => out.push(w.clone()),
            Arg::Sub(child) => {
                out.push(child.value.clone());
                out.extend(node_args(&child.args));
            }
        }
    }
    out
}

struct Request<'a> {
    command: String,
    args: Vec<String>,
    heredocs: &'a [Heredoc],
    json: bool,
    flags: BFlags,
    original: &'a str,
    location: Vec<(usize, usize)>,
    comments: &'a [String],
}

impl Request<'_> {
    fn code(&self) -> Code {
        Code {
            code: self.original.trim().to_owned(),
            name: self.command.clone(),
            location: self.location.clone(),
        }
    }
}

type R<T> = Result<T, String>;

/// Parses one node into an instruction; errors are the bare BuildKit messages.
pub fn parse_instruction(node: &Node, opts: ParseOptions) -> R<Instruction> {
    let mut req = Request {
        command: node.value.clone(),
        args: node_args(&node.args),
        heredocs: &node.heredocs,
        json: node.json,
        flags: BFlags::new(node.flags.clone()),
        original: &node.original,
        location: node.location(),
        comments: &node.prev_comment,
    };
    let cmd = match node.value.to_lowercase().as_str() {
        "env" => parse_env(&mut req)?,
        "maintainer" => parse_maintainer(&mut req)?,
        "label" => parse_label(&mut req)?,
        "add" => parse_add(&mut req)?,
        "copy" => parse_copy(&mut req)?,
        "from" => return parse_from(&mut req).map(Instruction::Stage),
        "onbuild" => parse_onbuild(&mut req)?,
        "workdir" => parse_workdir(&mut req)?,
        "run" => parse_run(&mut req, opts)?,
        "cmd" => parse_cmd(&mut req)?,
        "healthcheck" => parse_healthcheck(&mut req)?,
        "entrypoint" => parse_entrypoint(&mut req)?,
        "expose" => parse_expose(&mut req)?,
        "user" => parse_user(&mut req)?,
        "volume" => parse_volume(&mut req)?,
        "stopsignal" => parse_stop_signal(&req)?,
        "arg" => parse_arg(&req)?,
        "shell" => parse_shell(&mut req)?,
        _ => {
            return Err(gocompat::with_suggestion(
                format!("unknown instruction: {}", node.value),
                &node.value,
                ALL_INSTRUCTIONS,
                false,
            ));
        }
    };
    Ok(Instruction::Command(cmd))
}

fn at_least_one(command: &str) -> String {
    format!("{command} requires at least one argument")
}

fn exactly_one(command: &str) -> String {
    format!("{command} requires exactly one argument")
}

fn parse_kvps(args: &[String], command: &str) -> R<Vec<KeyValue>> {
    if args.is_empty() {
        return Err(at_least_one(command));
    }
    if args.len() % 2 != 0 {
        return Err(format!("Bad input to {command}, too many arguments"));
    }
    args.chunks(2)
        .map(|pair| {
            if pair[0].is_empty() {
                return Err(format!("{command} names can not be blank"));
            }
            Ok(KeyValue {
                key: pair[0].clone(),
                value: pair[1].clone(),
            })
        })
        .collect()
}

fn parse_env(req: &mut Request) -> R<Command> {
    req.flags.parse()?;
    Ok(Command::Env {
        env: parse_kvps(&req.args, "ENV")?,
        code: req.code(),
    })
}

fn parse_maintainer(req: &mut Request) -> R<Command> {
    if req.args.len() != 1 {
        return Err(exactly_one("MAINTAINER"));
    }
    req.flags.parse()?;
    Ok(Command::Maintainer {
        maintainer: req.args[0].clone(),
        code: req.code(),
    })
}

fn parse_label(req: &mut Request) -> R<Command> {
    req.flags.parse()?;
    Ok(Command::Label {
        labels: parse_kvps(&req.args, "LABEL")?,
        code: req.code(),
    })
}

fn parse_sources_and_dest(req: &Request, command: &str) -> R<SourcesAndDest> {
    let (dest, srcs) = match req.args.split_last() {
        Some((dest, srcs)) => (dest.clone(), srcs),
        None => (String::new(), &[][..]),
    };
    if parser::must_parse_heredoc(&dest).is_some() {
        return Err(format!(
            "{command} cannot accept a heredoc as a destination"
        ));
    }
    let mut out = SourcesAndDest {
        dest_path: dest,
        ..Default::default()
    };
    for src in srcs {
        match parser::must_parse_heredoc(src) {
            Some(doc) => {
                // The last heredoc of that name wins, as in BuildKit's lookup map.
                let mut content = req
                    .heredocs
                    .iter()
                    .rev()
                    .find(|h| h.name == doc.name)
                    .map(|h| h.content.clone())
                    .unwrap_or_default();
                if doc.chomp {
                    content = parser::chomp_heredoc_content(&content);
                }
                out.source_contents.push(SourceContent {
                    data: content,
                    path: doc.name,
                    expand: doc.expand,
                });
            }
            None => out.source_paths.push(src.clone()),
        }
    }
    Ok(out)
}

fn no_destination(command: &str) -> String {
    format!(
        "{command} requires at least two arguments, but only one was provided. Destination could not be determined"
    )
}

fn parse_add(req: &mut Request) -> R<Command> {
    if req.args.len() < 2 {
        return Err(no_destination("ADD"));
    }
    req.flags.add_string("chown", "");
    req.flags.add_string("chmod", "");
    req.flags.add_bool("link", false);
    req.flags.add_bool("keep-git-dir", false);
    req.flags.add_string("checksum", "");
    req.flags.parse()?;
    let sources = parse_sources_and_dest(req, "ADD")?;
    Ok(Command::Add(AddCommand {
        code: req.code(),
        sources,
        chown: req.flags.value("chown"),
        chmod: req.flags.value("chmod"),
        link: req.flags.value("link") == "true",
        keep_git_dir: req.flags.value("keep-git-dir") == "true",
        checksum: req.flags.value("checksum"),
    }))
}

fn parse_copy(req: &mut Request) -> R<Command> {
    if req.args.len() < 2 {
        return Err(no_destination("COPY"));
    }
    req.flags.add_string("chown", "");
    req.flags.add_string("from", "");
    req.flags.add_string("chmod", "");
    req.flags.add_bool("link", false);
    req.flags.parse()?;
    let sources = parse_sources_and_dest(req, "COPY")?;
    Ok(Command::Copy(CopyCommand {
        code: req.code(),
        sources,
        from: req.flags.value("from"),
        chown: req.flags.value("chown"),
        chmod: req.flags.value("chmod"),
        link: req.flags.value("link") == "true",
    }))
}

fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

fn parse_from(req: &mut Request) -> R<Stage> {
    let args = &req.args;
    let name = if args.len() == 3 && args[1].eq_ignore_ascii_case("as") {
        let name = args[2].to_lowercase();
        if !valid_stage_name(&name) {
            return Err(format!(
                "invalid name for build stage: {}, name can't start with a number or contain symbols",
                gocompat::quote(&args[2])
            ));
        }
        name
    } else if args.len() != 1 {
        return Err("FROM requires either one or three arguments".into());
    } else {
        String::new()
    };
    req.flags.add_string("platform", "");
    req.flags.parse()?;
    Ok(Stage {
        base_name: req.args[0].clone(),
        comment: get_comment(req.comments, &name),
        name,
        source_code: req.original.trim().to_owned(),
        commands: Vec::new(),
        platform: req.flags.value("platform"),
        location: req.location.clone(),
    })
}

fn parse_onbuild(req: &mut Request) -> R<Command> {
    if req.args.is_empty() {
        return Err(at_least_one("ONBUILD"));
    }
    req.flags.parse()?;
    let trigger = req.args[0].trim().to_uppercase();
    match trigger.as_str() {
        "ONBUILD" => return Err("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into()),
        "MAINTAINER" | "FROM" => {
            return Err(format!("{trigger} isn't allowed as an ONBUILD trigger"));
        }
        _ => {}
    }
    let mut expression = strip_onbuild_prefix(req.original);
    for doc in req.heredocs {
        expression.push('\n');
        expression.push_str(&doc.content);
        expression.push_str(&doc.name);
    }
    Ok(Command::Onbuild {
        expression,
        code: req.code(),
    })
}

/// Removes `^\s*ONBUILD\s*` (case-insensitive, Go `\s` = `[\t\n\f\r ]`).
fn strip_onbuild_prefix(original: &str) -> String {
    let is_space = |c: char| matches!(c, '\t' | '\n' | '\x0c' | '\r' | ' ');
    let rest = original.trim_start_matches(is_space);
    match rest.get(..7) {
        Some(word) if word.eq_ignore_ascii_case("onbuild") => {
            rest[7..].trim_start_matches(is_space).to_owned()
        }
        _ => original.to_owned(),
    }
}

fn parse_workdir(req: &mut Request) -> R<Command> {
    if req.args.len() != 1 {
        return Err(exactly_one("WORKDIR"));
    }
    req.flags.parse()?;
    Ok(Command::Workdir {
        path: req.args[0].clone(),
        code: req.code(),
    })
}

fn handle_json_args(args: &[String], json: bool) -> Vec<String> {
    if args.is_empty() {
        return Vec::new();
    }
    if json {
        return args.to_vec();
    }
    vec![args.join(" ")]
}

fn shell_dependent(req: &Request, empty_as_nil: bool) -> ShellDependantCmdLine {
    let files = req
        .heredocs
        .iter()
        .map(|h| ShellInlineFile {
            name: h.name.clone(),
            data: h.content.clone(),
            chomp: h.chomp,
        })
        .collect();
    let args = handle_json_args(&req.args, req.json);
    ShellDependantCmdLine {
        cmd_line: if empty_as_nil && args.is_empty() {
            None
        } else {
            Some(args)
        },
        files,
        prepend_shell: !req.json,
    }
}

fn parse_run(req: &mut Request, opts: ParseOptions) -> R<Command> {
    req.flags.add_strings("mount");
    req.flags.add_string("network", "default");
    if opts.labs {
        req.flags.add_string("security", "sandbox");
    }
    req.flags.parse()?;
    let flags_used = req.flags.used();
    let cmd = shell_dependent(req, false);
    let mount_specs = req.flags.strings("mount");
    let mounts = mount_specs
        .iter()
        .map(|spec| parse_mount(spec, None))
        .collect::<R<Vec<_>>>()?;
    let network = req.flags.value("network");
    if !matches!(network.as_str(), "default" | "none" | "host") {
        return Err(format!(
            "invalid network mode {}",
            gocompat::quote(&network)
        ));
    }
    let security = if opts.labs {
        let security = req.flags.value("security");
        if !matches!(security.as_str(), "insecure" | "sandbox") {
            return Err(format!(
                "security {} is not valid",
                gocompat::quote(&security)
            ));
        }
        security
    } else {
        "sandbox".to_owned()
    };
    Ok(Command::Run(RunCommand {
        code: req.code(),
        cmd,
        mount_specs,
        mounts,
        network,
        security,
        flags_used,
    }))
}

fn parse_cmd(req: &mut Request) -> R<Command> {
    req.flags.parse()?;
    Ok(Command::Cmd {
        cmd: shell_dependent(req, false),
        code: req.code(),
    })
}

fn parse_entrypoint(req: &mut Request) -> R<Command> {
    req.flags.parse()?;
    Ok(Command::Entrypoint {
        cmd: shell_dependent(req, true),
        code: req.code(),
    })
}

/// `time.ParseDuration` of a flag, 0 when empty, at least 1ms otherwise.
fn parse_opt_interval(name: &str, value: &str) -> R<i64> {
    if value.is_empty() {
        return Ok(0);
    }
    let d = gocompat::parse_duration(value).map_err(|e| e.to_string())?;
    if d == 0 {
        return Ok(0);
    }
    if d < 1_000_000 {
        return Err(format!(
            "Interval {} cannot be less than 1ms",
            gocompat::quote(name)
        ));
    }
    Ok(d)
}

fn parse_healthcheck(req: &mut Request) -> R<Command> {
    if req.args.is_empty() {
        return Err(at_least_one("HEALTHCHECK"));
    }
    let typ = req.args[0].to_uppercase();
    let args = req.args[1..].to_vec();
    let health = if typ == "NONE" {
        if !args.is_empty() {
            return Err("HEALTHCHECK NONE takes no arguments".into());
        }
        HealthConfig {
            test: vec![typ],
            ..Default::default()
        }
    } else {
        req.flags.add_string("interval", "");
        req.flags.add_string("timeout", "");
        req.flags.add_string("start-period", "");
        req.flags.add_string("retries", "");
        req.flags.parse()?;
        if typ != "CMD" {
            return Err(format!(
                "Unknown type {} in HEALTHCHECK (try CMD)",
                gocompat::quote(&typ)
            ));
        }
        let cmd = handle_json_args(&args, req.json);
        if cmd.is_empty() {
            return Err("Missing command after HEALTHCHECK CMD".into());
        }
        let kind = if req.json { "CMD" } else { "CMD-SHELL" };
        let mut test = vec![kind.to_owned()];
        test.extend(cmd);
        let interval = parse_opt_interval("interval", &req.flags.value("interval"))?;
        let timeout = parse_opt_interval("timeout", &req.flags.value("timeout"))?;
        let start_period = parse_opt_interval("start-period", &req.flags.value("start-period"))?;
        let retries_value = req.flags.value("retries");
        let retries = if retries_value.is_empty() {
            0
        } else {
            let r = gocompat::parse_int(&retries_value, 32).map_err(|e| e.to_string())?;
            if r < 0 {
                return Err(format!("--retries cannot be negative ({r})"));
            }
            r
        };
        HealthConfig {
            test,
            interval,
            timeout,
            start_period,
            retries,
        }
    };
    Ok(Command::Healthcheck {
        health,
        code: req.code(),
    })
}

fn parse_expose(req: &mut Request) -> R<Command> {
    if req.args.is_empty() {
        return Err(at_least_one("EXPOSE"));
    }
    req.flags.parse()?;
    let mut ports = req.args.clone();
    ports.sort();
    Ok(Command::Expose {
        ports,
        code: req.code(),
    })
}

fn parse_user(req: &mut Request) -> R<Command> {
    if req.args.len() != 1 {
        return Err(exactly_one("USER"));
    }
    req.flags.parse()?;
    Ok(Command::User {
        user: req.args[0].clone(),
        code: req.code(),
    })
}

fn parse_volume(req: &mut Request) -> R<Command> {
    if req.args.is_empty() {
        return Err(at_least_one("VOLUME"));
    }
    req.flags.parse()?;
    let mut volumes = Vec::new();
    for v in &req.args {
        let v = v.trim();
        if v.is_empty() {
            return Err("VOLUME specified can not be an empty string".into());
        }
        volumes.push(v.to_owned());
    }
    Ok(Command::Volume {
        volumes,
        code: req.code(),
    })
}

fn parse_stop_signal(req: &Request) -> R<Command> {
    if req.args.len() != 1 {
        return Err(exactly_one("STOPSIGNAL"));
    }
    Ok(Command::StopSignal {
        signal: req.args[0].clone(),
        code: req.code(),
    })
}

fn parse_arg(req: &Request) -> R<Command> {
    if req.args.is_empty() {
        return Err(at_least_one("ARG"));
    }
    let mut args = Vec::new();
    for arg in &req.args {
        let (key, value) = match arg.split_once('=') {
            Some((k, v)) => {
                if k.is_empty() {
                    return Err("ARG names can not be blank".into());
                }
                (k.to_owned(), Some(v.to_owned()))
            }
            None => (arg.clone(), None),
        };
        args.push(KeyValueOptional {
            comment: get_comment(req.comments, &key),
            key,
            value,
        });
    }
    Ok(Command::Arg {
        args,
        code: req.code(),
    })
}

fn parse_shell(req: &mut Request) -> R<Command> {
    req.flags.parse()?;
    let shell = handle_json_args(&req.args, req.json);
    if shell.is_empty() {
        return Err(at_least_one("SHELL"));
    }
    if !req.json {
        return Err("SHELL requires the arguments to be in JSON form".into());
    }
    Ok(Command::Shell {
        shell,
        code: req.code(),
    })
}

fn get_comment(comments: &[String], name: &str) -> String {
    if name.is_empty() {
        return String::new();
    }
    let prefix = format!("{name} ");
    comments
        .iter()
        .find_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlagType {
    Bool,
    String,
    Strings,
}

#[derive(Debug, Clone)]
struct Flag {
    name: String,
    kind: FlagType,
    value: String,
    values: Vec<String>,
}

/// BuildKit's `BFlags`: the `--name[=value]` words of an instruction.
#[derive(Debug, Clone)]
struct BFlags {
    args: Vec<String>,
    flags: Vec<Flag>,
    used: Vec<String>,
    err: Option<String>,
}

impl BFlags {
    fn new(args: Vec<String>) -> Self {
        BFlags {
            args,
            flags: Vec::new(),
            used: Vec::new(),
            err: None,
        }
    }

    fn add(&mut self, name: &str, kind: FlagType, value: &str) {
        if self.flags.iter().any(|f| f.name == name) {
            self.err = Some(format!("Duplicate flag defined: {name}"));
            return;
        }
        self.flags.push(Flag {
            name: name.to_owned(),
            kind,
            value: value.to_owned(),
            values: Vec::new(),
        });
    }

    fn add_bool(&mut self, name: &str, default: bool) {
        self.add(name, FlagType::Bool, if default { "true" } else { "false" });
    }

    fn add_string(&mut self, name: &str, default: &str) {
        self.add(name, FlagType::String, default);
    }

    fn add_strings(&mut self, name: &str) {
        self.add(name, FlagType::Strings, "");
    }

    fn value(&self, name: &str) -> String {
        self.flags
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value.clone())
            .unwrap_or_default()
    }

    fn strings(&self, name: &str) -> Vec<String> {
        self.flags
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.values.clone())
            .unwrap_or_default()
    }

    fn used(&self) -> Vec<String> {
        self.used.clone()
    }

    fn parse(&mut self) -> R<()> {
        if let Some(err) = &self.err {
            return Err(format!("error setting up flags: {err}"));
        }
        for arg in self.args.clone() {
            let Some(arg) = arg.strip_prefix("--") else {
                return Err(format!("arg should start with -- : {arg}"));
            };
            if arg.is_empty() {
                return Ok(());
            }
            let (name, value, has_value) = match arg.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned(), true),
                None => (arg.to_owned(), String::new(), false),
            };
            let Some(index) = self.flags.iter().position(|f| f.name == name) else {
                let mut names: Vec<&str> = self.flags.iter().map(|f| f.name.as_str()).collect();
                names.sort_unstable();
                return Err(gocompat::with_suggestion(
                    format!("unknown flag: {name}"),
                    &name,
                    names,
                    true,
                ));
            };
            let flag = &mut self.flags[index];
            if self.used.contains(&name) && flag.kind != FlagType::Strings {
                return Err(format!("duplicate flag specified: {name}"));
            }
            if !self.used.contains(&name) {
                self.used.push(name.clone());
            }
            match flag.kind {
                FlagType::Bool => {
                    if has_value && value.is_empty() {
                        return Err(format!("missing a value on flag: {name}"));
                    }
                    let lower = value.to_lowercase();
                    flag.value = match lower.as_str() {
                        "" => "true".to_owned(),
                        "true" | "false" => lower,
                        _ => {
                            return Err(format!(
                                "expecting boolean value for flag {name}, not: {value}"
                            ));
                        }
                    };
                }
                FlagType::String => {
                    if !has_value {
                        return Err(format!("missing a value on flag: {name}"));
                    }
                    flag.value = value;
                }
                FlagType::Strings => {
                    if !has_value {
                        return Err(format!("missing a value on flag: {name}"));
                    }
                    flag.values.push(value);
                }
            }
        }
        Ok(())
    }
}

/// Expands a word during mount parsing.
pub type Expander<'a> = &'a dyn Fn(&str) -> Result<String, String>;

/// Parses a `--mount` value. Without an expander (at instruction parse time) only `from`
/// is taken and everything else is left for dispatch, as BuildKit does.
pub fn parse_mount(value: &str, expander: Option<Expander>) -> R<Mount> {
    let fields =
        gocompat::csv_record(value).map_err(|e| format!("failed to parse csv mounts: {e}"))?;
    let mut m = Mount {
        mount_type: "bind".into(),
        from: String::new(),
        source: String::new(),
        target: String::new(),
        read_only: false,
        size_limit: 0,
        cache_id: String::new(),
        cache_sharing: String::new(),
        required: false,
        mode: None,
        uid: None,
        gid: None,
    };
    let mut ro_auto = true;
    let is_session = |t: &str| t == "secret" || t == "ssh";
    for field in &fields {
        let (key, val) = match field.split_once('=') {
            Some((k, v)) => (k.to_lowercase(), Some(v)),
            None => (field.to_lowercase(), None),
        };
        let Some(raw_value) = val else {
            if expander.is_none() {
                continue;
            }
            match key.as_str() {
                "readonly" | "ro" => {
                    m.read_only = true;
                    ro_auto = false;
                    continue;
                }
                "readwrite" | "rw" => {
                    m.read_only = false;
                    ro_auto = false;
                    continue;
                }
                "required" => {
                    if is_session(&m.mount_type) {
                        m.required = true;
                        continue;
                    }
                    return Err(format!(
                        "unexpected key '{key}' for mount type '{}'",
                        m.mount_type
                    ));
                }
                _ => return Err(format!("invalid field '{field}' must be a key=value pair")),
            }
        };
        let value = match expander {
            Some(expand) => expand(raw_value)?,
            None if key == "from" => {
                let chars: Vec<char> = raw_value.chars().collect();
                if chars.windows(2).any(|w| w[0] == '$' && w[1] != '\n') {
                    return Err(format!(
                        "'{key}' doesn't support variable expansion, define alias stage instead"
                    ));
                }
                raw_value.to_owned()
            }
            None => continue,
        };
        let invalid = || format!("invalid value for {key}: {value}");
        match key.as_str() {
            "type" => {
                let lower = value.to_lowercase();
                if !matches!(
                    lower.as_str(),
                    "bind" | "cache" | "tmpfs" | "secret" | "ssh"
                ) {
                    return Err(gocompat::with_suggestion(
                        format!("unsupported mount type {}", gocompat::quote(&value)),
                        &value,
                        ["bind", "cache", "secret", "ssh", "tmpfs"],
                        true,
                    ));
                }
                m.mount_type = lower;
            }
            "from" => m.from = value,
            "source" | "src" => m.source = value,
            "target" | "dst" | "destination" => m.target = value,
            "readonly" | "ro" => {
                m.read_only = gocompat::parse_bool(&value).ok_or_else(invalid)?;
                ro_auto = false;
            }
            "readwrite" | "rw" => {
                m.read_only = !gocompat::parse_bool(&value).ok_or_else(invalid)?;
                ro_auto = false;
            }
            "required" => {
                if !is_session(&m.mount_type) {
                    return Err(format!(
                        "unexpected key '{key}' for mount type '{}'",
                        m.mount_type
                    ));
                }
                m.required = gocompat::parse_bool(&value).ok_or_else(invalid)?;
            }
            "size" => {
                if m.mount_type != "tmpfs" {
                    return Err(format!(
                        "unexpected key '{key}' for mount type '{}'",
                        m.mount_type
                    ));
                }
                m.size_limit = ram_in_bytes(&value).ok_or_else(invalid)?;
            }
            "id" => m.cache_id = value,
            "sharing" => {
                let lower = value.to_lowercase();
                if !matches!(lower.as_str(), "shared" | "private" | "locked") {
                    return Err(format!(
                        "unsupported sharing value {}",
                        gocompat::quote(&value)
                    ));
                }
                m.cache_sharing = lower;
            }
            "mode" => {
                m.mode = Some(
                    gocompat::parse_uint(&value, 8, 32)
                        .map_err(|_| format!("invalid value {value} for mode"))?,
                );
            }
            "uid" => {
                m.uid = Some(
                    gocompat::parse_uint(&value, 10, 32)
                        .map_err(|_| format!("invalid value {value} for uid"))?,
                );
            }
            "gid" => {
                m.gid = Some(
                    gocompat::parse_uint(&value, 10, 32)
                        .map_err(|_| format!("invalid value {value} for gid"))?,
                );
            }
            _ => {
                return Err(gocompat::with_suggestion(
                    format!("unexpected key '{key}' in '{field}'"),
                    &key,
                    [
                        "type",
                        "from",
                        "source",
                        "target",
                        "readonly",
                        "id",
                        "sharing",
                        "required",
                        "mode",
                        "uid",
                        "gid",
                        "src",
                        "dst",
                        "ro",
                        "rw",
                        "readwrite",
                    ],
                    true,
                ));
            }
        }
    }
    let file_info_allowed = matches!(m.mount_type.as_str(), "secret" | "ssh" | "cache");
    for (set, what) in [
        (m.mode.is_some(), "mode"),
        (m.uid.is_some(), "uid"),
        (m.gid.is_some(), "gid"),
    ] {
        if set && !file_info_allowed {
            return Err(format!(
                "{what} not allowed for {} type mounts",
                gocompat::quote(&m.mount_type)
            ));
        }
    }
    if ro_auto {
        m.read_only = !(m.mount_type == "cache" || m.mount_type == "tmpfs");
    }
    if !m.cache_sharing.is_empty() && m.mount_type != "cache" {
        return Err(format!(
            "invalid cache sharing set for {} mount",
            m.mount_type
        ));
    }
    if m.mount_type == "secret" {
        if !m.from.is_empty() {
            return Err("secret mount should not have a from".into());
        }
        if !m.cache_sharing.is_empty() {
            return Err("secret mount should not define sharing".into());
        }
        if m.source.is_empty() && m.target.is_empty() && m.cache_id.is_empty() {
            return Err("invalid secret mount. one of source, target required".into());
        }
        if !m.source.is_empty() && !m.cache_id.is_empty() {
            return Err("both source and id can't be set".into());
        }
    }
    Ok(m)
}

/// `go-units.RAMInBytes`: a size with an optional binary suffix (`k`, `m`, `g`, `t`, `p`,
/// optionally followed by `b` or `ib`).
pub fn ram_in_bytes(size: &str) -> Option<i64> {
    let sep = size.rfind(|c: char| c.is_ascii_digit() || c == '.' || c == ' ')?;
    let (num, sfx) = if size.as_bytes()[sep] != b' ' {
        (&size[..=sep], &size[sep + 1..])
    } else {
        (&size[..sep], &size[sep + 1..])
    };
    let value: f64 = parse_go_float(num)?;
    if value < 0.0 {
        return None;
    }
    if sfx.is_empty() {
        return Some(value as i64);
    }
    if sfx.len() > 3 {
        return None;
    }
    let sfx = sfx.to_lowercase();
    let bytes = sfx.as_bytes();
    if bytes[0] == b'b' {
        return if sfx.len() > 1 {
            None
        } else {
            Some(value as i64)
        };
    }
    let mul: f64 = match bytes[0] {
        b'k' => 1024.0,
        b'm' => 1024.0 * 1024.0,
        b'g' => 1024.0 * 1024.0 * 1024.0,
        b't' => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        b'p' => 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    if (sfx.len() == 2 && bytes[1] != b'b') || (sfx.len() == 3 && &sfx[1..] != "ib") {
        return None;
    }
    Some((value * mul) as i64)
}

/// `strconv.ParseFloat` for the plain decimal forms sizes use.
fn parse_go_float(s: &str) -> Option<f64> {
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '+' | '-' | 'e' | 'E' | '_'))
    {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse_df(df: &str) -> Result<Dockerfile, InstructionError> {
        parse(&parser::parse(df).unwrap())
    }

    fn single(df: &str) -> Command {
        let mut d = parse_df(&format!("FROM x\n{df}\n")).unwrap();
        d.stages.remove(0).commands.remove(0)
    }

    fn err(df: &str) -> String {
        parse_df(&format!("FROM x\n{df}\n"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn stages_and_meta_args() {
        let d = parse_df("ARG A=1\nARG B\nFROM img:${A} AS Build\nRUN x\nFROM build\n").unwrap();
        assert_eq!(d.meta_args.len(), 2);
        assert_eq!(d.meta_args[0].1[0].value.as_deref(), Some("1"));
        assert_eq!(d.meta_args[1].1[0].value, None);
        assert_eq!(d.stages.len(), 2);
        assert_eq!(d.stages[0].name, "build");
        assert_eq!(d.stages[0].base_name, "img:${A}");
        assert_eq!(d.stages[0].source_code, "FROM img:${A} AS Build");
        assert_eq!(d.stages[0].commands.len(), 1);
        assert_eq!(
            parse_df("RUN echo no from\n").unwrap_err().to_string(),
            "no build stage in current context"
        );
    }

    #[test]
    fn from_validation() {
        assert_eq!(
            parse_df("FROM a AS 1x\n").unwrap_err().to_string(),
            "dockerfile parse error on line 1: invalid name for build stage: \"1x\", name can't start with a number or contain symbols"
        );
        assert_eq!(
            parse_df("FROM a b\n").unwrap_err().to_string(),
            "dockerfile parse error on line 1: FROM requires either one or three arguments"
        );
        let d = parse_df("FROM --platform=linux/arm64 a AS b-c_d.e\n").unwrap();
        assert_eq!(d.stages[0].platform, "linux/arm64");
        assert_eq!(d.stages[0].name, "b-c_d.e");
    }

    #[test]
    fn unknown_instruction_and_flags() {
        assert_eq!(
            err("FROBNICATE all"),
            "dockerfile parse error on line 2: unknown instruction: FROBNICATE"
        );
        assert_eq!(
            err("RUNN x"),
            "dockerfile parse error on line 2: unknown instruction: RUNN (did you mean RUN?)"
        );
        assert_eq!(
            err("COPY --frobnicate a b"),
            "dockerfile parse error on line 2: unknown flag: frobnicate"
        );
        assert_eq!(
            err("COPY --chownn=1 a b"),
            "dockerfile parse error on line 2: unknown flag: chownn (did you mean chown?)"
        );
        assert_eq!(
            err("COPY --from=a --from=b a b"),
            "dockerfile parse error on line 2: duplicate flag specified: from"
        );
        assert_eq!(
            err("COPY --from a b"),
            "dockerfile parse error on line 2: missing a value on flag: from"
        );
        assert_eq!(
            err("COPY --link=maybe a b"),
            "dockerfile parse error on line 2: expecting boolean value for flag link, not: maybe"
        );
        assert_eq!(
            err("ENV --x=1 A=b"),
            "dockerfile parse error on line 2: unknown flag: x"
        );
        assert_eq!(
            err("COPY a"),
            "dockerfile parse error on line 2: COPY requires at least two arguments, but only one was provided. Destination could not be determined"
        );
    }

    #[test]
    fn copy_and_add() {
        let Command::Copy(c) = single("COPY --from=st --chown=1:2 --chmod=755 --link a b /d/")
        else {
            panic!()
        };
        assert_eq!(c.from, "st");
        assert_eq!(c.chown, "1:2");
        assert_eq!(c.chmod, "755");
        assert!(c.link);
        assert_eq!(c.sources.source_paths, vec!["a", "b"]);
        assert_eq!(c.sources.dest_path, "/d/");
        let Command::Add(a) = single("ADD --keep-git-dir --checksum=sha256:abc https://x/y.tar /y")
        else {
            panic!()
        };
        assert!(a.keep_git_dir);
        assert_eq!(a.checksum, "sha256:abc");
        assert_eq!(
            err("COPY a <<EOF\nx\nEOF"),
            "dockerfile parse error on line 2: COPY cannot accept a heredoc as a destination"
        );
        let mut d = parse_df("FROM x\nCOPY <<-A <<\"B\" /d\n\tone\nA\ntwo $X\nB\n").unwrap();
        let Command::Copy(c) = d.stages.remove(0).commands.remove(0) else {
            panic!()
        };
        assert_eq!(c.sources.source_contents[0].data, "one\n");
        assert!(c.sources.source_contents[0].expand);
        assert_eq!(c.sources.source_contents[1].data, "two $X\n");
        assert!(!c.sources.source_contents[1].expand);
    }

    #[test]
    fn run_flags_and_mounts() {
        let Command::Run(r) = single(
            "RUN --mount=type=cache,target=/c --mount=from=st,src=/s,target=/t --network=none --security=insecure echo hi",
        ) else {
            panic!()
        };
        assert_eq!(r.mount_specs.len(), 2);
        // Before expansion only `from` is known and the type defaults to bind.
        assert_eq!(r.mounts[0].mount_type, "bind");
        assert_eq!(r.mounts[1].from, "st");
        assert_eq!(r.network, "none");
        assert_eq!(r.security, "insecure");
        assert_eq!(r.cmd.cmd_line, Some(vec!["echo hi".to_owned()]));
        assert!(r.cmd.prepend_shell);
        assert_eq!(
            err("RUN --network=bridge x"),
            "dockerfile parse error on line 2: invalid network mode \"bridge\""
        );
        assert_eq!(
            err("RUN --security=x x"),
            "dockerfile parse error on line 2: security \"x\" is not valid"
        );
        assert_eq!(
            err("RUN --mount=from=$X,target=/t x"),
            "dockerfile parse error on line 2: 'from' doesn't support variable expansion, define alias stage instead"
        );
        let stable = parse_with(
            &parser::parse("FROM x\nRUN --security=insecure x\n").unwrap(),
            ParseOptions { labs: false },
        );
        assert_eq!(
            stable.unwrap_err().to_string(),
            "dockerfile parse error on line 2: unknown flag: security"
        );
    }

    #[test]
    fn mount_parsing_with_expansion() {
        let id = |s: &str| -> Result<String, String> { Ok(s.replace("$T", "/tgt")) };
        let m = parse_mount(
            "type=cache,id=x,target=$T,sharing=LOCKED,mode=0700,uid=1000,ro",
            Some(&id),
        )
        .unwrap();
        assert_eq!(m.mount_type, "cache");
        assert_eq!(m.target, "/tgt");
        assert_eq!(m.cache_sharing, "locked");
        assert_eq!(m.mode, Some(0o700));
        assert_eq!(m.uid, Some(1000));
        assert!(m.read_only);
        let m = parse_mount("type=tmpfs,target=/t,size=64m", Some(&id)).unwrap();
        assert_eq!(m.size_limit, 64 << 20);
        assert!(!m.read_only);
        let m = parse_mount("target=/t", Some(&id)).unwrap();
        assert!(m.read_only, "bind mounts are read-only by default");
        let m = parse_mount("type=secret,id=s,required", Some(&id)).unwrap();
        assert!(m.required);
        for (spec, want) in [
            ("type=nope,target=/x", "unsupported mount type \"nope\""),
            (
                "type=bindd,target=/x",
                "unsupported mount type \"bindd\" (did you mean bind?)",
            ),
            (
                "type=bind,required",
                "unexpected key 'required' for mount type 'bind'",
            ),
            (
                "type=bind,mode=0700,target=/x",
                "mode not allowed for \"bind\" type mounts",
            ),
            (
                "type=bind,sharing=locked,target=/x",
                "invalid cache sharing set for bind mount",
            ),
            ("type=cache,sharing=x", "unsupported sharing value \"x\""),
            (
                "type=secret",
                "invalid secret mount. one of source, target required",
            ),
            ("type=secret,src=a,id=b", "both source and id can't be set"),
            (
                "type=bind,target=/x,ro=maybe",
                "invalid value for ro: maybe",
            ),
            (
                "type=bind,target=/x,size=1",
                "unexpected key 'size' for mount type 'bind'",
            ),
            ("type=cache,target=/x,mode=9", "invalid value 9 for mode"),
            (
                "type=bind,tagret=/x",
                "unexpected key 'tagret' in 'tagret=/x' (did you mean target?)",
            ),
            (
                "type=bind,foo",
                "invalid field 'foo' must be a key=value pair",
            ),
        ] {
            assert_eq!(parse_mount(spec, Some(&id)).unwrap_err(), want, "{spec}");
        }
    }

    #[test]
    fn healthcheck() {
        let Command::Healthcheck { health, .. } =
            single("HEALTHCHECK --interval=30s --timeout=5s --retries=3 CMD curl -f x || exit 1")
        else {
            panic!()
        };
        assert_eq!(health.test, vec!["CMD-SHELL", "curl -f x || exit 1"]);
        assert_eq!(health.interval, 30_000_000_000);
        assert_eq!(health.retries, 3);
        let Command::Healthcheck { health, .. } = single("HEALTHCHECK CMD [\"a\", \"b\"]") else {
            panic!()
        };
        assert_eq!(health.test, vec!["CMD", "a", "b"]);
        let Command::Healthcheck { health, .. } = single("HEALTHCHECK none") else {
            panic!()
        };
        assert_eq!(health.test, vec!["NONE"]);
        assert_eq!(
            err("HEALTHCHECK --interval=1us CMD x"),
            "dockerfile parse error on line 2: Interval \"interval\" cannot be less than 1ms"
        );
        assert_eq!(
            err("HEALTHCHECK FOO x"),
            "dockerfile parse error on line 2: Unknown type \"FOO\" in HEALTHCHECK (try CMD)"
        );
        assert_eq!(
            err("HEALTHCHECK NONE x"),
            "dockerfile parse error on line 2: HEALTHCHECK NONE takes no arguments"
        );
        assert_eq!(
            err("HEALTHCHECK CMD"),
            "dockerfile parse error on line 2: Missing command after HEALTHCHECK CMD"
        );
        assert_eq!(
            err("HEALTHCHECK --retries=-1 CMD x"),
            "dockerfile parse error on line 2: --retries cannot be negative (-1)"
        );
    }

    #[test]
    fn simple_instructions() {
        assert!(matches!(
            single("EXPOSE 80 443/tcp 53/udp"),
            Command::Expose { ports, .. } if ports == vec!["443/tcp", "53/udp", "80"]
        ));
        assert!(matches!(
            single("VOLUME [\"/a\", \" /b \"]"),
            Command::Volume { volumes, .. } if volumes == vec!["/a", "/b"]
        ));
        assert!(matches!(
            single("SHELL [\"/bin/bash\", \"-c\"]"),
            Command::Shell { shell, .. } if shell == vec!["/bin/bash", "-c"]
        ));
        assert_eq!(
            err("SHELL /bin/bash -c"),
            "dockerfile parse error on line 2: SHELL requires the arguments to be in JSON form"
        );
        assert!(matches!(
            single("ENTRYPOINT"),
            Command::Entrypoint { cmd, .. } if cmd.cmd_line.is_none() && cmd.prepend_shell
        ));
        assert!(matches!(
            single("CMD [\"a\", \"b c\"]"),
            Command::Cmd { cmd, .. } if cmd.cmd_line == Some(vec!["a".into(), "b c".into()]) && !cmd.prepend_shell
        ));
        assert_eq!(
            err("USER"),
            "dockerfile parse error on line 2: USER requires exactly one argument"
        );
        assert_eq!(
            err("ARG =x"),
            "dockerfile parse error on line 2: ARG names can not be blank"
        );
        assert_eq!(
            err("LABEL"),
            "dockerfile parse error on line 2: LABEL requires at least one argument"
        );
        assert_eq!(
            err("ONBUILD ONBUILD RUN x"),
            "dockerfile parse error on line 2: Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"
        );
        assert_eq!(
            err("ONBUILD FROM x"),
            "dockerfile parse error on line 2: FROM isn't allowed as an ONBUILD trigger"
        );
        assert!(matches!(
            single("  onbuild   RUN echo hi"),
            Command::Onbuild { expression, .. } if expression == "RUN echo hi"
        ));
        let mut d = parse_df("FROM x\nONBUILD RUN <<EOF\nhi\nEOF\n").unwrap();
        assert!(matches!(
            d.stages.remove(0).commands.remove(0),
            Command::Onbuild { expression, .. } if expression == "RUN <<EOF\nhi\nEOF"
        ));
    }

    #[test]
    fn ram_sizes() {
        assert_eq!(ram_in_bytes("65536"), Some(65536));
        assert_eq!(ram_in_bytes("64k"), Some(65536));
        assert_eq!(ram_in_bytes("1.5MiB"), Some(1572864));
        assert_eq!(ram_in_bytes("2 gb"), Some(2 << 30));
        assert_eq!(ram_in_bytes("1x"), None);
        assert_eq!(ram_in_bytes("x"), None);
    }
}
