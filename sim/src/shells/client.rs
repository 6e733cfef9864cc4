//! The simulated clients: each waits for its arrival time, caps `max_tokens` by the context
//! and sends through the dispatcher's migration shell (as the HTTP pipeline does), retries
//! a retryable refusal like an HTTP client retrying a 503, and reads its stream.

use super::fleet::World;
use super::{lock, record, RETRY_AFTER};
use crate::run::{Outcome, RequestRecord};
use crate::workload::RequestSpec;
use std::sync::{Arc, Mutex};
use turbine_actors::frontend::EngineError;
use turbine_actors::protocol::{FinishReason, SamplingParams, StopConditions};
use turbine_actors::router::dispatch::{DispatchRequest, Dispatcher};
use turbine_actors::router::migrating::MigratingStream;

/// One client: waits for its arrival time, sends, retries when told to, reads its stream.
pub(super) async fn client(
    world: Arc<World>,
    dispatcher: Arc<Dispatcher>,
    records: Arc<Mutex<Vec<RequestRecord>>>,
    index: usize,
    spec: RequestSpec,
) {
    let clock = world.clock.clone();
    clock.sleep_until(spec.arrival).await;
    let i = index as u64;
    record(&world.log, clock.sim_now(), "arrive", i, 0, 0);
    let token_ids = spec.prompt(i);
    // The frontend's cap: a worker would end the sequence at the context length anyway.
    let capped = StopConditions::max_tokens_within(
        token_ids.len(),
        world.cfg.profile.scheduler.max_model_len,
        Some(spec.output_len.max(1)),
    );
    let ran = match capped {
        Ok(max_tokens) => {
            lock(&records)[index].max_tokens = max_tokens;
            let request = DispatchRequest {
                token_ids,
                sampling: SamplingParams::greedy(),
                stop: StopConditions {
                    max_tokens,
                    stop_token_ids: vec![],
                    ignore_eos: true,
                },
                logprobs: None,
                generated_before: 0,
                images: Vec::new(),
            };
            run(&world, &dispatcher, &records, index, request).await
        }
        // Refused by the frontend, as over HTTP (a 400).
        Err(e) => Ran::refused(e),
    };
    let now = clock.sim_now();
    let failed = matches!(ran.outcome, Outcome::Failed(_));
    record(
        &world.log,
        now,
        if failed { "fail" } else { "done" },
        i,
        0,
        0,
    );
    let mut recs = lock(&records);
    let r = &mut recs[index];
    r.attempts = ran.attempts;
    r.finished = Some(now);
    r.outcome = Some(ran.outcome);
    r.resolutions += 1;
    r.request_id = ran.request_id;
    r.tokens = ran.tokens;
    r.migrations = ran.migrations;
}

/// What became of one client's request.
struct Ran {
    outcome: Outcome,
    attempts: u32,
    request_id: Option<u64>,
    tokens: Vec<u32>,
    migrations: u32,
}

impl Ran {
    /// Refused before it was sent.
    fn refused(e: EngineError) -> Ran {
        Ran {
            outcome: Outcome::Failed(e.to_string()),
            attempts: 0,
            request_id: None,
            tokens: Vec::new(),
            migrations: 0,
        }
    }
}

/// Sends `request`, retrying a retryable refusal, and reads its stream to the end.
async fn run(
    world: &World,
    dispatcher: &Arc<Dispatcher>,
    records: &Mutex<Vec<RequestRecord>>,
    index: usize,
    request: DispatchRequest,
) -> Ran {
    let clock = &world.clock;
    let i = index as u64;
    let mut attempts = 0u32;
    let mut request_id = None;
    let mut tokens = Vec::new();
    let mut migrations = 0;
    let outcome = loop {
        attempts += 1;
        let retry = |e: &EngineError| {
            matches!(e, EngineError::Overloaded(_)) && attempts < world.cfg.max_attempts
        };
        let mut stream = match MigratingStream::open(dispatcher.clone(), request.clone()).await {
            Ok(s) => s,
            Err(e) if retry(&e) => {
                record(
                    &world.log,
                    clock.sim_now(),
                    "retry",
                    i,
                    u64::from(attempts),
                    0,
                );
                clock.sleep_for(RETRY_AFTER).await;
                continue;
            }
            Err(e) => break Outcome::Failed(e.to_string()),
        };
        request_id = Some(stream.id().0);
        let mut worker = stream.worker();
        record(
            &world.log,
            clock.sim_now(),
            "route",
            i,
            worker.map_or(0, |w| w.0),
            u64::from(attempts),
        );
        let ended = loop {
            let Some(out) = stream.next_output().await else {
                break Err(EngineError::Internal(
                    "the stream ended without a finish".into(),
                ));
            };
            let out = match out {
                Ok(out) => out,
                Err(e) => break Err(e),
            };
            let now = clock.sim_now();
            if stream.worker() != worker {
                worker = stream.worker();
                record(&world.log, now, "migrate", i, worker.map_or(0, |w| w.0), 0);
            }
            if let Some(c) = out.cached_tokens {
                lock(records)[index].cached_tokens.get_or_insert(c);
            }
            for &t in &out.token_ids {
                record(&world.log, now, "token", i, tokens.len() as u64, 0);
                tokens.push(t);
                lock(records)[index].token_times.push(now);
            }
            match out.finish {
                Some(FinishReason::Error(msg)) => break Err(EngineError::Internal(msg)),
                Some(_) => break Ok(()),
                None => {}
            }
        };
        migrations = stream.migrations();
        match ended {
            Ok(()) => break Outcome::Completed,
            Err(e) => break Outcome::Failed(e.to_string()),
        }
    };
    Ran {
        outcome,
        attempts,
        request_id,
        tokens,
        migrations,
    }
}
