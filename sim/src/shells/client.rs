//! The simulated clients: each waits for its arrival time, sends through the dispatcher's
//! migration shell (as the HTTP pipeline does), retries a retryable refusal like an HTTP
//! client retrying a 503, and reads its stream.

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
    let request = DispatchRequest {
        token_ids: spec.prompt(i),
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens: spec.output_len.max(1),
            stop_token_ids: vec![],
            ignore_eos: true,
        },
        logprobs: None,
        generated_before: 0,
        images: Vec::new(),
    };
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
            for &t in &out.token_ids {
                record(&world.log, now, "token", i, tokens.len() as u64, 0);
                tokens.push(t);
                lock(&records)[index].token_times.push(now);
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
    let now = clock.sim_now();
    let failed = matches!(outcome, Outcome::Failed(_));
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
    r.attempts = attempts;
    r.finished = Some(now);
    r.outcome = Some(outcome);
    r.resolutions += 1;
    r.request_id = request_id;
    r.tokens = tokens;
    r.migrations = migrations;
}
