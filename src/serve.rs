//! `turbine up`: load the model, start the graph, serve the OpenAI API until Ctrl-C.

use crate::fetch::resolve_model;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use turbine_actors::cluster_config::ClusterConfig;
use turbine_actors::frontend::{self, ChatEngine, HttpConfig, Readiness};
use turbine_actors::node::local::{LocalCluster, LocalOptions};
use turbine_actors::node::planner::start_planner;
use turbine_actors::node::Role;
use turbine_actors::planner::tap::{LoadTap, MeteredEngine};
use turbine_runtime::telemetry::notice;

/// Serves `cfg` (read from `file`, if any) until Ctrl-C (or SIGTERM); in-flight requests
/// drain before it returns.
pub async fn up(
    cfg: ClusterConfig,
    file: Option<PathBuf>,
    options: LocalOptions,
    allow_fetch: bool,
) -> Result<()> {
    let mut cfg = cfg;
    // A stage the binary does not have is a start-up error before the model loads.
    let stages = crate::stages::registry();
    turbine_actors::node::stages::check_stages(&cfg, &stages)?;
    let model = load(&mut cfg, allow_fetch).await?;
    let mut cluster = LocalCluster::start_with(&cfg, model, options).await?;
    let stages = cluster.start_stages(&cfg, &stages).await?;
    let mut engine: Arc<dyn ChatEngine> = cluster.pipeline.clone();
    // The planner reads the frontend's requests through a tap around the engine.
    let mut planner = None;
    if cfg.planner.is_some() {
        let file =
            file.context("planner: `turbine up -f FILE` (its workers read the same file)")?;
        let tap = LoadTap::new();
        engine = Arc::new(MeteredEngine::new(engine, tap.clone()));
        let binary = std::env::current_exe().context("finding the turbine executable")?;
        planner = start_planner(&cfg, &file, binary, &cluster, tap).await?;
    }
    let dispatcher = cluster.pipeline.dispatcher().clone();
    let app = frontend::router(
        engine.clone(),
        cluster.metrics.clone(),
        HttpConfig {
            max_body_bytes: cfg.http.max_body_bytes,
            max_concurrent_requests: cfg.http.max_concurrent_requests,
            max_queued_requests: cfg.http.max_queued_requests,
            request_timeout: cfg.http.request_timeout_ms.map(Duration::from_millis),
            images: cfg.http.images.clone(),
            stages,
            readiness: Readiness::from_async(move || {
                let dispatcher = dispatcher.clone();
                async move { dispatcher.readiness().await }
            }),
        },
    );
    let addr = format!("{}:{}", cfg.http.host, cfg.http.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding the HTTP frontend to {addr}"))?;
    let local = listener.local_addr()?;
    // One line a script can wait for; it counts the workers that are there, not the ones
    // the file asks for.
    let joined = cluster.pipeline.dispatcher().worker_ids().len();
    let remote = cfg
        .workers
        .iter()
        .filter(|g| g.remote)
        .map(|g| g.replicas)
        .sum::<usize>();
    let workers = match (joined, remote) {
        (n, 0) => format!("{n} worker(s)"),
        (0, r) => format!("no worker yet, waiting for {r} remote worker(s) to join"),
        (n, r) => format!("{n} worker(s), waiting for {r} remote worker(s) to join"),
    };
    println!(
        "turbine serving {} on http://{local} ({workers}; context {} tokens; request plane {})",
        engine.model_id(),
        engine.context_length(),
        cluster.node.endpoint()
    );
    frontend::serve(listener, app, shutdown_signal()).await?;
    if let Some(mut p) = planner {
        // Dropping the connector stops the worker processes it started.
        p.task.abort();
        let _ = (&mut p.task).await;
    }
    notice("turbine: drained, exiting");
    Ok(())
}

/// `turbine worker`: one node of the file's graph, joining the frontend's registry. A new
/// role is one more arm here and one builder in `turbine_actors::node`.
pub async fn join(
    cfg: ClusterConfig,
    role: Role,
    registry: Option<String>,
    gateway_endpoint: Option<String>,
    allow_fetch: bool,
) -> Result<()> {
    let mut cfg = cfg;
    match role {
        Role::Router => {
            turbine_actors::node::process::run_router(&cfg, registry, shutdown_signal()).await?;
            notice("turbine router: deregistered, exiting");
        }
        Role::Worker { group } => {
            let model = load(&mut cfg, allow_fetch).await?;
            turbine_actors::node::process::run_worker(
                &cfg,
                group,
                model,
                registry,
                gateway_endpoint,
                shutdown_signal(),
            )
            .await?;
            notice("turbine worker: deregistered, exiting");
        }
        Role::Stage { index } => {
            turbine_actors::node::stages::run_stage(
                &cfg,
                index,
                &crate::stages::registry(),
                registry,
                shutdown_signal(),
            )
            .await?;
            notice("turbine stage: deregistered, exiting");
        }
        Role::Frontend => {
            anyhow::bail!("the frontend is started by `turbine up`, not `turbine worker`")
        }
    }
    Ok(())
}

/// `turbine epp`: the endpoint picker, until Ctrl-C (or SIGTERM).
pub async fn epp(
    cfg: ClusterConfig,
    options: turbine_actors::node::epp::EppOptions,
    allow_fetch: bool,
) -> Result<()> {
    let mut cfg = cfg;
    let model = load(&mut cfg, allow_fetch).await?;
    turbine_actors::node::epp::run_epp(&cfg, model, options, shutdown_signal()).await?;
    notice("turbine epp: exiting");
    Ok(())
}

/// Resolves (fetching if allowed) and loads the model the config names, off the async
/// threads; fills in the served name from the file when the config has none.
async fn load(
    cfg: &mut ClusterConfig,
    allow_fetch: bool,
) -> Result<turbine_kernels::loader::LoadedModel> {
    let path = resolve_model(&cfg.model.path, allow_fetch)?;
    if cfg.model.served_name.is_none() {
        cfg.model.served_name = Some(served_name_for(&path));
    }
    notice(format_args!("loading {}", path.display()));
    tokio::task::spawn_blocking(move || turbine_kernels::loader::load_model(&path))
        .await
        .context("the model loader panicked")?
        .context("loading the model")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    notice("turbine: shutting down, draining in-flight requests");
}

/// The name clients use for a model file: its stem without the quantization suffix
/// (`SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct`).
fn served_name_for(path: &std::path::Path) -> String {
    let stem = path
        .file_stem()
        .or_else(|| path.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string());
    match stem.split_once('.') {
        Some((base, _quant)) if !base.is_empty() => base.to_string(),
        _ => stem,
    }
}
