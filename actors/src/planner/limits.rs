//! Turning raw replica needs into counts that are safe to act on: the per-pool range, the
//! device budget, and a cooldown so the pools do not flap.
//!
//! Cooldown: growing is applied at once (a missed target costs more than an idle worker).
//! Shrinking waits until `cooldown` has passed since the pool last changed, and then only
//! goes down to the largest size asked for during the last `cooldown`: one quiet interval
//! between two busy ones does not remove a worker only to start it again.
//!
//! A reaction's growth (between intervals, [`Ask::Reaction`]) is held differently: it
//! answered a surge's first seconds or a growing queue before any interval had measured
//! them, so it is held until its cause is gone ([`release_reactions`]: the planner calls it
//! once the queue is back), not for a whole cooldown; its size is not remembered as an ask.
//! The decisions made while it held, which saw the surge, are asks like any other: what the
//! surge still needs stays for the cooldown.
//!
//! Budget: pools together may use at most `max_devices`. When the needs exceed it, the
//! workers are shared out in proportion to the needs, each pool keeping its minimum (config
//! validation guarantees the minimums fit). The budget is a hard limit and is applied after
//! the cooldown.

use std::collections::VecDeque;
use std::time::Duration;

/// The limits every pool shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub min_replicas: usize,
    pub max_replicas: usize,
    pub devices_per_worker: usize,
    pub max_devices: Option<usize>,
    pub cooldown: Duration,
}

impl Limits {
    /// Workers the device budget allows over all pools (`None`: no budget).
    fn worker_budget(&self) -> Option<usize> {
        self.max_devices.map(|d| d / self.devices_per_worker.max(1))
    }
}

/// Who asks for a size: an interval's decision, or a reaction between intervals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    Decision,
    Reaction,
}

/// One pool's size and its recent history, for the cooldown.
#[derive(Clone, Debug)]
pub struct PoolState {
    current: usize,
    /// The last change, by either kind of ask: the cooldown runs from it.
    last_change: Option<Duration>,
    /// The last change a decision made: where the cooldown runs from once a reaction's
    /// growth is released.
    decided_change: Option<Duration>,
    /// A reaction grew the pool and its growth is not released yet.
    reaction_held: bool,
    /// (time, size asked for) by decisions over the last cooldown.
    asked: VecDeque<(Duration, usize)>,
}

impl PoolState {
    pub fn new(current: usize) -> PoolState {
        PoolState {
            current,
            last_change: None,
            decided_change: None,
            reaction_held: false,
            asked: VecDeque::new(),
        }
    }

    /// A reaction's growth is held by this pool now.
    pub fn reaction_held(&self) -> bool {
        self.reaction_held
    }

    pub fn current(&self) -> usize {
        self.current
    }

    /// The size this pool may take now for a need of `target` (already within the range),
    /// under the cooldown. Records the request; does not change the size (see `commit`).
    fn propose(&mut self, now: Duration, target: usize, cooldown: Duration, ask: Ask) -> usize {
        if ask == Ask::Decision {
            self.asked.push_back((now, target));
        }
        while self
            .asked
            .front()
            .is_some_and(|&(t, _)| now.saturating_sub(t) > cooldown)
        {
            self.asked.pop_front();
        }
        if target >= self.current {
            return target;
        }
        let settled = self
            .last_change
            .is_none_or(|t| now.saturating_sub(t) >= cooldown);
        if !settled {
            return self.current;
        }
        let recent_max = self.asked.iter().map(|&(_, n)| n).max().unwrap_or(target);
        recent_max.clamp(target, self.current)
    }

    fn commit(&mut self, now: Duration, size: usize, ask: Ask) {
        if size != self.current {
            self.current = size;
            self.last_change = Some(now);
            match ask {
                Ask::Decision => {
                    self.decided_change = Some(now);
                    self.reaction_held = false;
                }
                Ask::Reaction => self.reaction_held = true,
            }
        }
    }

    /// The reaction's growth is no longer held: the cooldown runs from the last decision's
    /// change again, over the decisions' asks.
    fn release(&mut self) {
        if std::mem::take(&mut self.reaction_held) {
            self.last_change = self.decided_change;
        }
    }
}

/// The cause of the reactions' growth is gone: each pool may shrink, at the next decision,
/// to what the decisions of the last cooldown asked for (see the module doc).
pub fn release_reactions(pools: &mut [PoolState]) {
    for pool in pools {
        pool.release();
    }
}

/// Applies the range, the cooldown and the budget to the raw needs of `pools` (in order,
/// one need each) and commits the result; returns the new sizes and whether the budget
/// cut any pool.
pub fn settle(
    limits: &Limits,
    now: Duration,
    pools: &mut [PoolState],
    needs: &[usize],
    ask: Ask,
) -> (Vec<usize>, bool) {
    let proposed: Vec<usize> = pools
        .iter_mut()
        .zip(needs)
        .map(|(pool, &need)| {
            let target = need.clamp(limits.min_replicas, limits.max_replicas);
            pool.propose(now, target, limits.cooldown, ask)
        })
        .collect();
    let sized = match limits.worker_budget() {
        Some(budget) => within_budget(&proposed, budget, limits.min_replicas),
        None => proposed.clone(),
    };
    let cut = sized != proposed;
    for (pool, &n) in pools.iter_mut().zip(&sized) {
        pool.commit(now, n, ask);
    }
    (sized, cut)
}

/// Shares `budget` workers among pools asking for `sizes`, in proportion, each keeping
/// `min`; unchanged when they fit.
fn within_budget(sizes: &[usize], budget: usize, min: usize) -> Vec<usize> {
    let total: usize = sizes.iter().sum();
    if total <= budget {
        return sizes.to_vec();
    }
    let scale = budget as f64 / total as f64;
    let mut out: Vec<usize> = sizes
        .iter()
        .map(|&n| ((n as f64 * scale).floor() as usize).max(min).min(n))
        .collect();
    // Floors may leave budget unused, minimums may overshoot it: hand out or take back
    // one worker at a time, biggest shortfall (or biggest pool) first.
    loop {
        let used: usize = out.iter().sum();
        if used < budget {
            let Some(i) = (0..out.len())
                .filter(|&i| out[i] < sizes[i])
                .max_by_key(|&i| sizes[i] - out[i])
            else {
                break;
            };
            out[i] += 1;
        } else if used > budget {
            let Some(i) = (0..out.len())
                .filter(|&i| out[i] > min)
                .max_by_key(|&i| out[i])
            else {
                break;
            };
            out[i] -= 1;
        } else {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    fn limits(cooldown_s: u64, max_devices: Option<usize>) -> Limits {
        Limits {
            min_replicas: 1,
            max_replicas: 10,
            devices_per_worker: 1,
            max_devices,
            cooldown: S * cooldown_s as u32,
        }
    }

    #[test]
    fn the_range_is_applied() {
        let l = limits(0, None);
        let mut pools = vec![PoolState::new(1), PoolState::new(1)];
        let (sizes, _) = settle(&l, S, &mut pools, &[0, 50], Ask::Decision);
        assert_eq!(sizes, vec![1, 10]);
    }

    #[test]
    fn alternating_load_does_not_flap() {
        // Needs alternate 6, 2, 6, 2 every 10 s with a 30 s cooldown: the pool grows once
        // and stays; only a quiet stretch longer than the cooldown shrinks it, once.
        let l = limits(30, None);
        let mut pools = vec![PoolState::new(2)];
        let mut sizes = Vec::new();
        for i in 0..12u32 {
            let need = if i % 2 == 0 { 6 } else { 2 };
            sizes.push(settle(&l, S * (10 * i), &mut pools, &[need], Ask::Decision).0[0]);
        }
        assert!(sizes.iter().all(|&n| n == 6), "{sizes:?}");
        for i in 12..20u32 {
            sizes.push(settle(&l, S * (10 * i), &mut pools, &[2], Ask::Decision).0[0]);
        }
        let changes = sizes.windows(2).filter(|w| w[0] != w[1]).count();
        assert_eq!(changes, 1, "{sizes:?}");
        assert_eq!(*sizes.last().unwrap(), 2);
        // The last busy interval was at 100 s; the shrink came at 140 s, the first decision
        // whose last 30 s held no busy interval.
        assert_eq!(sizes[12..15], [6, 6, 2], "{sizes:?}");
    }

    #[test]
    fn growth_is_never_delayed() {
        let l = limits(300, None);
        let mut pools = vec![PoolState::new(1)];
        assert_eq!(settle(&l, S, &mut pools, &[3], Ask::Decision).0, vec![3]);
        assert_eq!(
            settle(&l, 2 * S, &mut pools, &[5], Ask::Decision).0,
            vec![5]
        );
        assert_eq!(
            settle(&l, 3 * S, &mut pools, &[1], Ask::Decision).0,
            vec![5]
        );
    }

    #[test]
    fn a_reactions_growth_is_held_until_released_then_the_decisions_asks_decide() {
        let l = limits(60, None);
        let mut pools = vec![PoolState::new(1)];
        // A surge: decisions ask 3 while a reaction grows the pool to 6 for its backlog.
        assert_eq!(settle(&l, S, &mut pools, &[6], Ask::Reaction).0, vec![6]);
        assert!(pools[0].reaction_held());
        assert_eq!(
            settle(&l, 5 * S, &mut pools, &[3], Ask::Decision).0,
            vec![6]
        );
        assert_eq!(
            settle(&l, 10 * S, &mut pools, &[3], Ask::Decision).0,
            vec![6]
        );
        // The backlog is served: the pool goes to what the decisions asked, at once (no
        // decision had changed it, so no cooldown runs), not 60 s after the reaction.
        release_reactions(&mut pools);
        assert!(!pools[0].reaction_held());
        assert_eq!(
            settle(&l, 15 * S, &mut pools, &[2], Ask::Decision).0,
            vec![3]
        );
        // From there the cooldown as ever: 60 s after that change, down to the most the
        // last 60 s asked (2, at 15 s).
        assert_eq!(
            settle(&l, 65 * S, &mut pools, &[1], Ask::Decision).0,
            vec![3]
        );
        assert_eq!(
            settle(&l, 75 * S, &mut pools, &[1], Ask::Decision).0,
            vec![2]
        );
    }

    #[test]
    fn a_reaction_held_and_never_released_is_held_for_the_cooldown() {
        let l = limits(60, None);
        let mut pools = vec![PoolState::new(1)];
        settle(&l, S, &mut pools, &[6], Ask::Reaction);
        assert_eq!(
            settle(&l, 30 * S, &mut pools, &[1], Ask::Decision).0,
            vec![6]
        );
        // Its own size is no ask: after the cooldown it goes to the decisions' asks.
        assert_eq!(
            settle(&l, 61 * S, &mut pools, &[1], Ask::Decision).0,
            vec![1]
        );
        // Releasing a pool a decision changed last changes nothing.
        release_reactions(&mut pools);
        assert_eq!(
            settle(&l, 62 * S, &mut pools, &[4], Ask::Decision).0,
            vec![4]
        );
        release_reactions(&mut pools);
        assert_eq!(
            settle(&l, 63 * S, &mut pools, &[1], Ask::Decision).0,
            vec![4]
        );
    }

    #[test]
    fn the_budget_is_shared_in_proportion() {
        let l = limits(0, Some(8));
        let mut pools = vec![PoolState::new(1), PoolState::new(1)];
        let (sizes, cut) = settle(&l, S, &mut pools, &[4, 12], Ask::Decision);
        assert!(cut);
        assert_eq!(sizes, vec![2, 6]);
        let (sizes, cut) = settle(&l, 2 * S, &mut pools, &[0, 40], Ask::Decision);
        assert!(cut);
        assert_eq!(sizes, vec![1, 7]);
    }

    #[test]
    fn devices_per_worker_count_against_the_budget() {
        let l = Limits {
            devices_per_worker: 2,
            ..limits(0, Some(9))
        };
        let mut pools = vec![PoolState::new(1)];
        assert_eq!(settle(&l, S, &mut pools, &[10], Ask::Decision).0, vec![4]);
    }

    proptest! {
        /// Whatever the needs over time, every pool stays within its range and all pools
        /// together within the budget.
        #[test]
        fn limits_always_hold(
            steps in prop::collection::vec((0usize..40, 0usize..40), 1..40),
            budget in 2usize..30,
            cooldown_s in 0u64..100,
        ) {
            let l = limits(cooldown_s, Some(budget));
            let mut pools = vec![PoolState::new(1), PoolState::new(1)];
            for (i, (p, d)) in steps.into_iter().enumerate() {
                let (sizes, _) = settle(&l, S * (10 * i as u32), &mut pools, &[p, d], Ask::Decision);
                prop_assert!(sizes.iter().all(|&n| (1..=10).contains(&n)), "{sizes:?}");
                prop_assert!(sizes.iter().sum::<usize>() <= budget, "{sizes:?} > {budget}");
            }
        }
    }
}
