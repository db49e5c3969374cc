//! Overload at three times a service's capacity, against keel's server layers (deadline
//! admission and the concurrency limit) over real gRPC: the adaptive limit keeps goodput (calls
//! answered within their deadline) where the static limit of 1000 lets every call slow down
//! past its deadline, and it settles between its bounds; critical calls get through while
//! sheddable ones are refused first. Outcomes are counted, not timed. The service is the
//! model in `support/work.rs`: 16 "cores", 64 ms of work a call, 250 calls per second.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

mod support;

use keel_server::shed::Concurrency;
use support::work::{Outcome, capacity, count, offer, serve};

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
) -> (Vec<support::work::Call>, f64) {
    let (url, shed) = serve(concurrency).await;
    offer(&url, settle, overload(), |_| "default").await;
    let counted = offer(&url, calls, overload(), |_| "default").await;
    (counted, shed.limit("test.Work").unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_three_times_capacity_the_adaptive_limit_keeps_goodput_the_static_one_loses() {
    let (fixed, _) = overloaded(Concurrency::Static(1000), 300, 900).await;
    let adaptive = Concurrency::adaptive(1000);
    let (adapted, limit) = overloaded(adaptive, 300, 900).await;
    let outcomes = |calls: &[support::work::Call]| {
        [Outcome::Answered, Outcome::Refused, Outcome::Late].map(|o| count(calls, None, o))
    };
    let (good_static, good_adaptive) = (
        count(&fixed, None, Outcome::Answered),
        count(&adapted, None, Outcome::Answered),
    );
    // Offered at three times the capacity, the capacity can answer a third of the calls in
    // time: the adaptive limit must keep at least half of that, whatever the static one did.
    let share = 900 / 3;
    assert!(
        good_adaptive >= share / 2 && good_adaptive > good_static * 2,
        "answered within the deadline: adaptive {:?}, static {:?} (answered, refused, late)",
        outcomes(&adapted),
        outcomes(&fixed)
    );
    assert!(
        count(&adapted, None, Outcome::Refused) > 0,
        "the excess was refused at once: {:?}",
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
        critical[0] * 100 >= critical_total * 99,
        "critical (answered, refused, late): {critical:?}"
    );
    assert!(
        sheddable[1] > critical[1] * 10 && sheddable[1] > 0,
        "sheddable refused first: sheddable {sheddable:?}, critical {critical:?}"
    );
}
