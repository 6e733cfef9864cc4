//! The simulated clients: each waits for its arrival time, sends through the dispatcher,
//! retries a retryable refusal like an HTTP client retrying a 503, and reads its stream.

use super::fleet::World;
use super::{lock, record, RETRY_AFTER};
use crate::run::{Outcome, RequestRecord};
use crate::workload::RequestSpec;
use std::sync::{Arc, Mutex};
use turbine_actors::frontend::EngineError;
use turbine_actors::protocol::{FinishReason, SamplingParams, StopConditions};
use turbine_actors::router::dispatch::{DispatchRequest, Dispatcher};

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
    };
    let mut attempts = 0u32;
    let outcome = loop {
        attempts += 1;
        let retry = |e: &EngineError| {
            matches!(e, EngineError::Overloaded(_)) && attempts < world.cfg.max_attempts
        };
        let mut dispatched = match dispatcher.dispatch(request.clone()).await {
            Ok(d) => d,
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
        record(
            &world.log,
            clock.sim_now(),
            "route",
            i,
            dispatched.worker.0,
            u64::from(attempts),
        );
        let mut received = 0u64;
        let ended = loop {
            let Some(out) = dispatched.next_output().await else {
                break Err(EngineError::Internal(
                    "the stream ended without a finish".into(),
                ));
            };
            let out = match out {
                Ok(out) => out,
                Err(e) => break Err(e),
            };
            let now = clock.sim_now();
            for _ in &out.token_ids {
                record(&world.log, now, "token", i, received, 0);
                received += 1;
                lock(&records)[index].token_times.push(now);
            }
            match out.finish {
                Some(FinishReason::Error(msg)) => break Err(EngineError::Internal(msg)),
                Some(_) => break Ok(()),
                None => {}
            }
        };
        match ended {
            Ok(()) => break Outcome::Completed,
            Err(e) if received == 0 && retry(&e) => {
                record(
                    &world.log,
                    clock.sim_now(),
                    "retry",
                    i,
                    u64::from(attempts),
                    0,
                );
                drop(dispatched);
                clock.sleep_for(RETRY_AFTER).await;
            }
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
}
