//! Overload at three times a service's capacity, against keel's server layers (deadline
//! admission and the concurrency limit) over real gRPC: the adaptive limit refuses the excess
//! at once where the static limit of 1000 admits everything, and it settles between its
//! bounds; sheddable calls are refused first, critical ones hardly ever. These are properties
//! of refusals, true however fast the machine runs; how much goodput the limit keeps is a
//! matter of time, measured by `cargo bench -p keel-server --bench overload` (RESULTS.md). The
//! service is the model in `support/work.rs`: 16 "cores", 64 ms of work a call, 250 calls per
//! second.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

use crate::support::work::{Outcome, capacity, count, offer, serve};
use keel_server::shed::Concurrency;

/// Three times the capacity.
fn overload() -> f64 {
    3.0 * capacity()
}

/// `calls` default calls at three times capacity after `settle` that are not counted; what
/// became of the counted ones, and the limit at the end.
async fn overloaded(
    concurrency: Concurrency,
    settle: usize,
    calls: usize,
) -> (Vec<crate::support::work::Call>, f64) {
    let (url, shed) = serve(concurrency).await;
    offer(&url, settle, overload(), |_| "default").await;
    let counted = offer(&url, calls, overload(), |_| "default").await;
    (counted, shed.limit("test.Work").unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_three_times_capacity_the_adaptive_limit_refuses_the_excess_the_static_one_admits_it()
{
    let (fixed, _) = overloaded(Concurrency::Static(1000), 300, 900).await;
    let adaptive = Concurrency::adaptive(1000);
    let (adapted, limit) = overloaded(adaptive, 300, 900).await;
    let outcomes = |calls: &[crate::support::work::Call]| {
        [Outcome::Answered, Outcome::Refused, Outcome::Late].map(|o| count(calls, None, o))
    };
    // Calls end by their 200 ms deadline, so at 750 offered a second no more than ~150 are
    // ever in flight: the static limit never refuses, whatever the speed.
    assert_eq!(
        count(&fixed, None, Outcome::Refused),
        0,
        "the static limit admitted everything: {:?} (answered, refused, late)",
        outcomes(&fixed)
    );
    assert!(
        count(&adapted, None, Outcome::Refused) > 0,
        "the adaptive limit refused the excess at once: {:?}",
        outcomes(&adapted)
    );
    let Concurrency::Adaptive { min, max, .. } = adaptive else {
        unreachable!()
    };
    assert!(
        limit > min as f64 && limit < max as f64,
        "the limit settled between its bounds ({min}..{max}): {limit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_overload_critical_calls_get_through_and_sheddable_ones_are_refused_first() {
    let (url, _) = serve(Concurrency::adaptive(1000)).await;
    // One call in six is critical: half the capacity. The rest is sheddable.
    let mix = |n: usize| {
        if n.is_multiple_of(6) {
            "critical"
        } else {
            "sheddable"
        }
    };
    offer(&url, 300, overload(), mix).await;
    let calls = offer(&url, 1200, overload(), mix).await;
    let critical =
        [Outcome::Answered, Outcome::Refused, Outcome::Late].map(|o| count(&calls, Some(true), o));
    let sheddable =
        [Outcome::Answered, Outcome::Refused, Outcome::Late].map(|o| count(&calls, Some(false), o));
    let critical_total: usize = critical.iter().sum();
    assert!(
        critical[1] * 100 <= critical_total,
        "critical calls are hardly ever refused: (answered, refused, late) {critical:?}"
    );
    assert!(
        sheddable[1] > critical[1] * 10 && sheddable[1] > 0,
        "sheddable refused first: sheddable {sheddable:?}, critical {critical:?}"
    );
}
