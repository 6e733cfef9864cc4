//! The `turbine` command line.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use turbine_actors::cluster_config::{ClusterConfig, LogFormat};
use turbine_actors::node::Role;
use turbine_runtime::telemetry::{LogSettings, Telemetry};

#[derive(Parser)]
#[command(
    name = "turbine",
    version,
    about = "A distributed LLM inference runtime built as an actor system",
    long_about = "turbine serves large language models behind an OpenAI-compatible HTTP API.\n\
                  Every component (frontend, preprocessor, router, KV indexer, workers, \
                  executors) is an actor.\n\n\
                  Quick start: `turbine up` serves SmolLM2-135M-Instruct on CPU at \
                  http://127.0.0.1:8000 (fetching it on first use)."
)]
struct Cli {
    /// Log filter (tracing's env-filter syntax), e.g. `info` or `turbine_actors=debug`.
    /// Default: `warn` (`error` for `turbine sim`, whose simulated faults make the shells warn).
    #[arg(long, global = true, env = "TURBINE_LOG")]
    log: Option<String>,
    /// Log line format: `text` (human-readable) or `json` (one JSON object a line, with the
    /// `request` span's `request_id`). Default: the file's `logging.format`, else `text`.
    #[arg(long, global = true, env = "TURBINE_LOG_FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model: the whole graph from a cluster file (or the default model on CPU).
    Up(UpArgs),
    /// Run one worker of a cluster file in this process, joining the frontend over ZeroMQ.
    Worker(WorkerArgs),
    /// Endpoint picker for the Gateway API Inference Extension: an Envoy ext_proc gRPC
    /// server that routes each request KV-aware (see docs/KUBERNETES.md).
    Epp(EppArgs),
    /// Fetch the default model into the model cache, then exit.
    FetchModel,
    /// Measure the engine of a cluster file's worker group (prefill by prompt length, decode
    /// ITL by batch × context) and write the profile the planner and `turbine sim` read.
    Profile(turbine::profile::ProfileArgs),
    /// Simulate a cluster on virtual time: deterministic for a seed; synthetic workloads or
    /// trace replay, injected faults, routing-policy comparison (see docs/SIMULATOR.md).
    Sim(Box<turbine_sim::SimArgs>),
    /// Load generators and micro-benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Args)]
struct UpArgs {
    /// Cluster file (YAML; see docs/CONFIG.md). Without it: the default model on CPU.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Model to serve (a .gguf file or an HF directory); overrides the file's `model.path`.
    #[arg(long)]
    model: Option<String>,
    /// HTTP host; overrides the file's `http.host`.
    #[arg(long)]
    host: Option<String>,
    /// HTTP port; overrides the file's `http.port` (0 picks a free port).
    #[arg(long)]
    port: Option<u16>,
    /// Join the registry another frontend serves (its request-plane endpoint, e.g.
    /// tcp://10.0.0.5:7100) instead of serving one: a second frontend of the same cluster
    /// (see `router.replica_sync`).
    #[arg(long)]
    registry: Option<String>,
    /// Request-plane bind address of this frontend; overrides the file's `transport.bind`
    /// (which the first frontend on the same host already uses).
    #[arg(long)]
    bind: Option<std::net::SocketAddr>,
    /// Event-plane (PUB) bind address; overrides the file's `transport.events_bind`.
    #[arg(long)]
    events_bind: Option<std::net::SocketAddr>,
    /// Fail instead of downloading the default model when it is not cached.
    #[arg(long)]
    no_fetch: bool,
}

#[derive(Args)]
struct WorkerArgs {
    /// Cluster file (the same one the frontend's `turbine up -f` reads).
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Which entry of the file's `workers:` list this process runs (0-based). Default: the
    /// first group with `--role`, else the first group with `remote: true`, else 0.
    #[arg(long)]
    group: Option<usize>,
    /// Run the first group of the file with this role (`aggregated`, `prefill`, `decode`,
    /// `encoder`), or `router`: the router and its KV index, for frontends whose
    /// `router.remote` is set, or `stage`: the custom stage `--stage NAME` of the file's
    /// `stages:` (with `remote: true`), which frontends reach over the request plane.
    #[arg(long, conflicts_with = "group")]
    role: Option<String>,
    /// With `--role stage`: which entry of the file's `stages:` to run, by name.
    #[arg(long, requires = "role")]
    stage: Option<String>,
    /// The frontend's request-plane endpoint (e.g. tcp://10.0.0.5:7100); overrides the
    /// file's `discovery.registry`.
    #[arg(long)]
    registry: Option<String>,
    /// Request-plane bind address of this worker (e.g. 127.0.0.1:0); overrides the file's
    /// `transport.bind`, which the frontend on the same host already uses.
    #[arg(long)]
    bind: Option<std::net::SocketAddr>,
    /// Event-plane (PUB) bind address; overrides the file's `transport.events_bind`.
    #[arg(long)]
    events_bind: Option<std::net::SocketAddr>,
    /// Model to serve; overrides the file's `model.path` (must be the frontend's model).
    #[arg(long)]
    model: Option<String>,
    /// The `ip:port` a gateway's endpoint picker sends this worker's requests to (a frontend
    /// beside it); registered for `turbine epp`.
    #[arg(long, env = "TURBINE_GATEWAY_ENDPOINT")]
    gateway_endpoint: Option<String>,
    /// Fail instead of downloading the default model when it is not cached.
    #[arg(long)]
    no_fetch: bool,
}

#[derive(Args)]
struct EppArgs {
    /// Cluster file (the frontend's): model, router policy, disaggregation, discovery.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// ext_proc (gRPC) listen address.
    #[arg(long, default_value = "0.0.0.0:9002")]
    listen: std::net::SocketAddr,
    /// `ip:port` answered for workers that registered no gateway endpoint (e.g. the
    /// frontend Service); without it such workers are never picked.
    #[arg(long)]
    default_endpoint: Option<String>,
    /// The frontend's request-plane endpoint; overrides the file's `discovery.registry`.
    #[arg(long)]
    registry: Option<String>,
    /// Request-plane bind address of this process; overrides the file's `transport.bind`.
    #[arg(long)]
    bind: Option<std::net::SocketAddr>,
    /// Model whose tokenizer and chat template are used; overrides the file's `model.path`.
    #[arg(long)]
    model: Option<String>,
    /// Fail instead of downloading the default model when it is not cached.
    #[arg(long)]
    no_fetch: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Streamed chat load against an OpenAI-compatible server: TTFT, ITL, tokens/s.
    Serve(turbine::bench::serve::ServeBenchArgs),
}

/// The worker group a `turbine worker` process runs: `--group`, or the first with `--role`,
/// or the first remote group, or the first group.
fn pick_group(cfg: &ClusterConfig, group: Option<usize>, role: Option<&str>) -> Result<usize> {
    if let Some(g) = group {
        anyhow::ensure!(
            g < cfg.workers.len(),
            "--group {g}: the file has {} worker group(s) (0-based)",
            cfg.workers.len()
        );
        return Ok(g);
    }
    if let Some(role) = role {
        let wanted: turbine_actors::cluster_config::WorkerRole = serde_yaml::from_str(role)
            .map_err(|_| {
                anyhow::anyhow!(
                    "--role {role:?}: expected aggregated, prefill, decode, encoder, router or stage"
                )
            })?;
        return cfg
            .workers
            .iter()
            .position(|g| g.role == wanted)
            .with_context(|| format!("the file has no worker group with role {role}"));
    }
    Ok(cfg.workers.iter().position(|g| g.remote).unwrap_or(0))
}

/// The `stages:` entry `--stage NAME` names (`--role stage`).
fn pick_stage(cfg: &ClusterConfig, name: Option<&str>) -> Result<usize> {
    let remote: Vec<&str> = cfg
        .stages
        .iter()
        .filter(|s| s.remote)
        .map(|s| s.name.as_str())
        .collect();
    let listed = if remote.is_empty() {
        "the file lists no remote stage".to_string()
    } else {
        format!("the file's remote stages: {}", remote.join(", "))
    };
    let name = name.with_context(|| format!("--role stage needs --stage NAME ({listed})"))?;
    cfg.stages
        .iter()
        .position(|s| s.name == name)
        .with_context(|| format!("--stage {name}: the file lists no such stage ({listed})"))
}

/// The cluster file the command reads, if it reads one and it parses (a file that does not
/// parse is reported when the command reads it; telemetry starts without it).
fn file_config(command: &Command) -> Option<ClusterConfig> {
    let file = match command {
        Command::Up(args) => args.file.as_deref(),
        Command::Worker(args) => Some(args.file.as_path()),
        Command::Epp(args) => Some(args.file.as_path()),
        _ => None,
    };
    file.and_then(|f| read_config(f).ok())
}

/// What this process is, in its spans' resource (`turbine.role`); `None`: a command that
/// exports no traces (sim, bench, profile, fetch-model).
fn traced_role(command: &Command) -> Option<String> {
    match command {
        Command::Up(_) => Some("frontend".to_string()),
        Command::Worker(args) => Some(match (args.role.as_deref(), args.stage.as_deref()) {
            (Some("stage"), Some(stage)) => format!("stage:{stage}"),
            (Some(role), _) => role.to_string(),
            (None, _) => "worker".to_string(),
        }),
        Command::Epp(_) => Some("epp".to_string()),
        _ => None,
    }
}

/// Installs logging (`--log`, `--log-format` or the file's `logging.format`) and, for the
/// serving commands, OTLP trace export (the file's `observability.tracing`, overridden by
/// the `OTEL_*` environment). Called inside the tokio runtime: the exporter runs on it.
fn start_telemetry(cli: &Cli, default_log: &str) -> Result<Telemetry> {
    let file = file_config(&cli.command);
    let json = match cli.log_format.as_deref() {
        Some(format) => format == "json",
        None => file
            .as_ref()
            .is_some_and(|cfg| cfg.logging.format == LogFormat::Json),
    };
    let logs = LogSettings {
        filter: cli.log.clone().unwrap_or_else(|| default_log.to_string()),
        json,
    };
    let role = traced_role(&cli.command);
    let export = match &role {
        Some(_) => file
            .map(|cfg| cfg.observability.tracing)
            .unwrap_or_default()
            .resolve(|name| std::env::var(name).ok())
            .context("observability.tracing")?,
        None => None,
    };
    let telemetry =
        turbine_runtime::telemetry::init(&logs, export.as_ref(), role.as_deref().unwrap_or("tool"))
            .context("starting telemetry")?;
    if let Some(t) = &export {
        tracing::info!(
            endpoint = %t.endpoint,
            sampling_ratio = t.sampling_ratio,
            service = %t.service_name,
            "exporting traces over OTLP"
        );
    }
    Ok(telemetry)
}

fn read_config(path: &std::path::Path) -> Result<ClusterConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str::<ClusterConfig>(&text).with_context(|| format!("in {}", path.display()))
}

fn load_config(args: &UpArgs) -> Result<ClusterConfig> {
    let mut cfg = match &args.file {
        Some(path) => read_config(path)?,
        None => ClusterConfig::default(),
    };
    if let Some(m) = &args.model {
        cfg.model.path = m.clone();
    }
    if let Some(h) = &args.host {
        cfg.http.host = h.clone();
    }
    if let Some(p) = args.port {
        cfg.http.port = p;
    }
    if let Some(b) = args.bind {
        cfg.transport.bind = b;
    }
    if let Some(b) = args.events_bind {
        cfg.transport.events_bind = b;
    }
    Ok(cfg)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line, no backtrace: errors here are for users.
            eprintln!("turbine: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let default_log = match cli.command {
        Command::Sim(_) => "error",
        _ => "warn",
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    // Dropped before the runtime (declared after it): the last spans are flushed while the
    // exporter's connection still runs.
    let _telemetry = {
        let _in_runtime = runtime.enter();
        start_telemetry(&cli, default_log)?
    };
    match cli.command {
        Command::Up(args) => {
            let cfg = load_config(&args)?;
            let options = turbine_actors::node::local::LocalOptions {
                registry: args.registry.clone(),
            };
            runtime.block_on(turbine::serve::up(
                cfg,
                args.file.clone(),
                options,
                !args.no_fetch,
            ))
        }
        Command::Worker(args) => {
            let mut cfg = read_config(&args.file)?;
            if let Some(m) = &args.model {
                cfg.model.path = m.clone();
            }
            if let Some(b) = args.bind {
                cfg.transport.bind = b;
            }
            if let Some(b) = args.events_bind {
                cfg.transport.events_bind = b;
            }
            let role = if args.role.as_deref() == Some("router") {
                Role::Router
            } else if args.role.as_deref() == Some("stage") {
                Role::Stage {
                    index: pick_stage(&cfg, args.stage.as_deref())?,
                }
            } else {
                Role::Worker {
                    group: pick_group(&cfg, args.group, args.role.as_deref())?,
                }
            };
            runtime.block_on(turbine::serve::join(
                cfg,
                role,
                args.registry,
                args.gateway_endpoint,
                !args.no_fetch,
            ))
        }
        Command::Epp(args) => {
            let mut cfg = read_config(&args.file)?;
            if let Some(m) = &args.model {
                cfg.model.path = m.clone();
            }
            if let Some(b) = args.bind {
                cfg.transport.bind = b;
            }
            let options = turbine_actors::node::epp::EppOptions {
                listen: args.listen,
                default_endpoint: args.default_endpoint,
                registry: args.registry,
            };
            runtime.block_on(turbine::serve::epp(cfg, options, !args.no_fetch))
        }
        Command::Profile(args) => {
            let cfg = match &args.file {
                Some(path) => read_config(path)?,
                None => ClusterConfig::default(),
            };
            turbine::profile::run(cfg, &args)
        }
        Command::FetchModel => {
            let path = turbine::fetch::resolve_model("default", true)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Sim(args) if args.validate => {
            let v = turbine::validate::run(&args)?;
            print!("{}", v.table());
            Ok(())
        }
        Command::Sim(args) => turbine_sim::run_cli(*args),
        Command::Bench { which } => match which {
            BenchCommand::Serve(args) => runtime.block_on(turbine::bench::serve::run(args)),
        },
    }
}
