//! The mesh client against real gRPC replicas on loopback: it spreads calls over healthy
//! replicas, stops sending to one that reports NOT_SERVING, sends a slow one little, picks up
//! replicas that appear in discovery, retries within a budget, ejects outliers, survives a crash
//! and a rolling restart, carries deadlines across hops, and counts it all. Load is bounded in
//! count.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::replica::{
    Endpoints, IDEMPOTENT, Raw, Replica, WRITE, call, call_path, call_with_body,
};
use bytes::Bytes;
use keel_mesh::client::{ClientOptions, Ejection, Hedging, MeshChannel, Methods, balanced};
use tonic::Request;

/// The echo service as its proto would describe it: Call is idempotent, Write is not; both
/// take one request message.
fn echo_methods() -> Methods {
    Methods {
        idempotent: [IDEMPOTENT.to_owned()].into(),
        no_side_effects: [IDEMPOTENT.to_owned()].into(),
        single_request: [IDEMPOTENT.to_owned(), WRITE.to_owned()].into(),
        single_response: [IDEMPOTENT.to_owned(), WRITE.to_owned()].into(),
        ..Methods::default()
    }
}

fn options() -> ClientOptions {
    ClientOptions {
        resolve_interval: Duration::from_millis(200),
        methods: echo_methods(),
        ..ClientOptions::default()
    }
}

/// `total` calls of `path`, `in_flight` at a time; how many succeeded and failed.
async fn outcomes(
    channel: &MeshChannel,
    path: &'static str,
    total: usize,
    in_flight: usize,
) -> (usize, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (channel, next, ok) = (channel.clone(), next.clone(), ok.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::SeqCst) < total {
                    if call_path(channel.clone(), path).await.is_ok() {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let ok = ok.load(Ordering::SeqCst);
    (ok, total - ok)
}

/// `total` calls, `in_flight` at a time; every one must succeed.
async fn load(channel: &MeshChannel, total: usize, in_flight: usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (channel, next) = (channel.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::SeqCst) < total {
                    call(channel.clone()).await.expect("every call succeeds");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
}

async fn mesh(replicas: &[&Replica]) -> (Arc<Endpoints>, MeshChannel) {
    mesh_with(replicas, options()).await
}

async fn mesh_with(replicas: &[&Replica], options: ClientOptions) -> (Arc<Endpoints>, MeshChannel) {
    let endpoints = Endpoints::new(replicas.iter().map(|r| r.addr));
    let channel = balanced(endpoints.clone(), options);
    // Wait (bounded) until every replica has been admitted: each has answered a call.
    let deadline = Instant::now() + Duration::from_secs(10);
    while replicas.iter().any(|r| r.calls() == 0) {
        assert!(Instant::now() < deadline, "replicas were not all admitted");
        load(&channel, 30, 3).await;
    }
    (endpoints, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spread_over_every_healthy_replica() {
    let (a, b, c) = (
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    );
    let (_, channel) = mesh(&[&a, &b, &c]).await;
    load(&channel, 600, 16).await;
    for replica in [&a, &b, &c] {
        assert!(
            replica.calls() > 60,
            "each replica takes a share: {}",
            replica.calls()
        );
    }
}

/// A mesh over `replicas` whose metrics land in a registry of its own.
async fn counted_mesh(replicas: &[&Replica]) -> (prometheus::Registry, MeshChannel) {
    let (registry, options) = counted_options();
    let (_, channel) = mesh_with(replicas, options).await;
    (registry, channel)
}

/// Options for the peer `echo` whose metrics land in a registry of their own.
fn counted_options() -> (prometheus::Registry, ClientOptions) {
    let registry = prometheus::Registry::new();
    let metrics = keel_mesh::client::ClientMetrics::register(&registry).unwrap();
    let options = ClientOptions {
        peer: "echo".into(),
        metrics: Some(metrics),
        ..options()
    };
    (registry, options)
}

/// Waits until the client counts `admitted` endpoints: the event that its health streams have
/// delivered every change so far.
async fn until_admitted(registry: &prometheus::Registry, admitted: f64) {
    keel_testkit::eventually(
        Duration::from_secs(10),
        "the client's endpoints to settle",
        || {
            let now = sample(registry, "keel_mesh_endpoints", &[("state", "admitted")]);
            async move { (now == admitted).then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_gets_no_call_once_its_health_stream_delivered_not_serving() {
    let (a, b, c) = (
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    );
    let (registry, channel) = counted_mesh(&[&a, &b, &c]).await;
    until_admitted(&registry, 3.0).await;
    a.health.not_serving().await;
    until_admitted(&registry, 2.0).await;
    let settled = a.calls();
    load(&channel, 1000, 16).await;
    assert_eq!(
        a.calls(),
        settled,
        "no call reached the NOT_SERVING replica"
    );

    a.health.serving().await;
    until_admitted(&registry, 3.0).await;
    let back = &a;
    keel_testkit::eventually(
        Duration::from_secs(10),
        "the replica to take calls again once SERVING",
        || {
            let channel = channel.clone();
            let before = back.calls();
            async move {
                load(&channel, 50, 8).await;
                (back.calls() > before).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replica_receives_under_a_tenth_of_the_attempts() {
    let (a, b, slow) = (
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    );
    let (registry, channel) = counted_mesh(&[&a, &b, &slow]).await;
    // Slow against what the others answer in under 32 calls in flight on two cores, in an
    // unoptimised build too (there they take ~60 ms each: a 50-ms replica was not slow).
    slow.delay_ms.store(500, Ordering::SeqCst);
    let attempts = |addr: std::net::SocketAddr| {
        let endpoint = keel_mesh::client::endpoint_digest(addr);
        sample(
            &registry,
            "keel_mesh_endpoint_attempts_total",
            &[("endpoint", endpoint.as_str())],
        )
    };
    let before = [attempts(a.addr), attempts(b.addr), attempts(slow.addr)];
    load(&channel, 2000, 32).await;
    let after = [attempts(a.addr), attempts(b.addr), attempts(slow.addr)];
    let made: Vec<f64> = after.iter().zip(before).map(|(n, m)| n - m).collect();
    let share = made[2] / made.iter().sum::<f64>();
    assert!(
        share < 0.10,
        "the slow replica took {:.1}% of the attempts (round robin would give 33%): {made:?}",
        share * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_join_and_leave_with_discovery() {
    let (a, b) = (Replica::start().await, Replica::start().await);
    let (endpoints, channel) = mesh_with(
        &[&a, &b],
        ClientOptions {
            resolve_interval: Duration::from_millis(500),
            ..options()
        },
    )
    .await;
    let newcomer = Replica::start().await;
    endpoints.add(newcomer.addr);
    // "Within one re-resolution interval", counted in resolutions rather than seconds: the
    // resolution after the join finds the newcomer, and it takes calls before the next one.
    let at_join = endpoints.resolutions();
    while newcomer.calls() == 0 {
        assert!(
            endpoints.resolutions() <= at_join + 1,
            "the new replica got no call within one re-resolution interval"
        );
        load(&channel, 64, 32).await;
    }

    endpoints.remove(a.addr);
    let at_leave = endpoints.resolutions();
    keel_testkit::eventually(
        Duration::from_secs(10),
        "a re-resolution after the leave",
        || {
            let resolved = endpoints.resolutions() > at_leave;
            async move { resolved.then_some(()) }
        },
    )
    .await;
    let settled = a.calls();
    load(&channel, 500, 16).await;
    assert_eq!(
        a.calls(),
        settled,
        "a replica gone from discovery gets no calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_costs_no_failed_call() {
    let (mut a, b, c) = (
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    );
    let (_, channel) = mesh(&[&a, &b, &c]).await;
    let before = a.calls();
    let running = {
        let channel = channel.clone();
        tokio::spawn(async move { load(&channel, 2000, 32).await })
    };
    keel_testkit::eventually(
        Duration::from_secs(10),
        "the doomed replica to be in use",
        || {
            let busy = a.calls() > before + 50;
            async move { busy.then_some(()) }
        },
    )
    .await;
    a.kill();
    running.await.expect("all 2000 idempotent calls succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_keeps_failing_is_ejected_while_its_health_says_serving() {
    let (a, b, c) = (
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    );
    let (_, channel) = mesh(&[&a, &b, &c]).await;
    a.failing.store(true, Ordering::SeqCst);
    // Some early calls may exhaust their attempts on the failing replica before it is ejected.
    outcomes(&channel, IDEMPOTENT, 300, 16).await;
    let ejected_at = a.calls();
    let (ok, failed) = outcomes(&channel, IDEMPOTENT, 500, 16).await;
    assert_eq!((ok, failed), (500, 0), "once ejected, nothing fails");
    assert_eq!(a.calls(), ejected_at, "the ejected replica gets no calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_replica_comes_back_when_its_ejection_ends() {
    let (a, b, c) = (
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    );
    let endpoints = Endpoints::new([a.addr, b.addr, c.addr]);
    let short = Ejection {
        consecutive_failures: 3,
        base: Duration::from_millis(300),
        max: Duration::from_secs(5),
    };
    let channel = balanced(
        endpoints,
        ClientOptions {
            ejection: short,
            ..options()
        },
    );
    load(&channel, 60, 4).await;
    a.failing.store(true, Ordering::SeqCst);
    outcomes(&channel, IDEMPOTENT, 200, 8).await;
    a.failing.store(false, Ordering::SeqCst);
    let healed = a.calls();
    keel_testkit::eventually(
        Duration::from_secs(10),
        "the healed replica to get calls again",
        || {
            let channel = channel.clone();
            let back = a.calls() > healed;
            async move {
                load(&channel, 20, 4).await;
                back.then_some(())
            }
        },
    )
    .await;
}

/// A replica that dies between an answer's headers and its trailers cuts that answer off: an
/// idempotent call's answer is read whole before it is handed on, so the cut one is sent to
/// another replica and no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_off_after_its_headers_is_retried_elsewhere_for_an_idempotent_call() {
    let (cut, whole) = (Replica::start().await, Replica::start().await);
    let (_endpoints, channel) = mesh(&[&cut, &whole]).await;
    cut.cutting.store(true, Ordering::SeqCst);
    let before = cut.calls();
    let (ok, failed) = outcomes(&channel, IDEMPOTENT, 100, 4).await;
    assert_eq!((ok, failed), (100, 0));
    assert!(cut.calls() > before, "some answers were cut off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_is_not_idempotent_is_never_sent_twice() {
    let (a, b) = (Replica::start().await, Replica::start().await);
    let (_, channel) = mesh(&[&a, &b]).await;
    for replica in [&a, &b] {
        replica.failing.store(true, Ordering::SeqCst);
    }
    let before = a.calls() + b.calls();
    let (ok, failed) = outcomes(&channel, WRITE, 50, 8).await;
    assert_eq!((ok, failed), (0, 50));
    assert_eq!(
        a.calls() + b.calls() - before,
        50,
        "one attempt per call, on the server's count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_holds_when_every_replica_fails() {
    let (a, b, c) = (
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    );
    let (registry, channel) = counted_mesh(&[&a, &b, &c]).await;
    let exhausted = || sample(&registry, "keel_mesh_retry_budget_exhausted_total", &[]);
    let series = |name: &str| {
        registry
            .gather()
            .iter()
            .filter(|family| family.name() == name)
            .map(|family| family.get_metric().len())
            .sum::<usize>()
    };
    // Before anything failed, the failure series already read zero (alerts see 0, not
    // nothing): one budget for the peer, the method's retries, each endpoint's ejections.
    assert_eq!(series("keel_mesh_retry_budget_exhausted_total"), 1);
    assert_eq!(series("keel_mesh_retries_total"), 1);
    assert_eq!(series("keel_mesh_ejections_total"), 3);
    assert_eq!(exhausted(), 0.0);
    for replica in [&a, &b, &c] {
        replica.failing.store(true, Ordering::SeqCst);
    }
    // The warm-up calls deposited into the budget too.
    let before = a.calls() + b.calls() + c.calls();
    const CALLS: usize = 1000;
    let started = Instant::now();
    let (ok, _) = outcomes(&channel, IDEMPOTENT, CALLS, 16).await;
    assert_eq!(ok, 0);
    let attempts = a.calls() + b.calls() + c.calls() - before;
    // 20% of calls plus 10 per second, over the budget's 10 s window.
    let floor = 10 * (started.elapsed().as_secs() as usize + 10);
    let allowed = (CALLS + before) * 12 / 10 - before + floor;
    assert!(
        attempts <= allowed,
        "{attempts} attempts for {CALLS} calls; the budget allows {allowed}"
    );
    assert!(attempts > CALLS, "some retries were made within the budget");
    assert!(
        exhausted() > 0.0,
        "the retries the budget refused are counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_call() {
    let mut replicas = vec![
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    ];
    let (_, channel) = mesh(&replicas.iter().collect::<Vec<_>>()).await;
    let running = {
        let channel = channel.clone();
        tokio::spawn(async move { load(&channel, 3000, 32).await })
    };
    for slot in &mut replicas {
        let addr = slot.addr;
        slot.drain().await;
        *slot = Replica::start_on(addr).await;
        let restarted = &*slot;
        keel_testkit::eventually(
            Duration::from_secs(10),
            "the restarted replica to take calls",
            || {
                let (channel, taking) = (channel.clone(), restarted.calls() > 0);
                async move {
                    load(&channel, 8, 4).await;
                    taking.then_some(())
                }
            },
        )
        .await;
    }
    running
        .await
        .expect("no call failed during the rolling restart");
}

fn received_timeout(replica: &Replica) -> Duration {
    let value = replica
        .last_timeout
        .lock()
        .unwrap()
        .clone()
        .expect("a grpc-timeout arrived");
    keel_mesh::deadline::parse_grpc_timeout(&value).expect("a valid grpc-timeout")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incoming_deadline_travels_to_the_next_hop_less_the_time_spent() {
    let back = Replica::start().await;
    let (_, to_back) = mesh(&[&back]).await;
    let front = Replica::front(to_back).await;
    let direct = tonic::transport::Channel::from_shared(format!("http://{}", front.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(direct);
    grpc.ready().await.unwrap();
    let mut request = Request::new(Bytes::new());
    request.set_timeout(Duration::from_secs(2));
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(IDEMPOTENT),
        Raw,
    )
    .await
    .unwrap();
    let passed_on = received_timeout(&back);
    assert!(
        passed_on < Duration::from_secs(2),
        "the next hop gets what is left, less than the caller's 2 s: {passed_on:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_deadline_passes_stops_and_its_downstream_call_is_cancelled() {
    let back = Replica::start().await;
    let (_, to_back) = mesh(&[&back]).await;
    let front = Replica::front(to_back).await;
    let (_, to_front) = mesh(&[&front]).await;
    back.delay_ms.store(10_000, Ordering::SeqCst);
    let completed = back.completed.load(Ordering::SeqCst);

    let mut grpc = tonic::client::Grpc::new(to_front);
    grpc.ready().await.unwrap();
    let mut request = Request::new(Bytes::new());
    request.set_timeout(Duration::from_millis(100));
    let path = http::uri::PathAndQuery::from_static(IDEMPOTENT);
    let refused = grpc.unary(request, path, Raw).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::DeadlineExceeded);

    // The back's work was dropped, not finished: nobody waits for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while back.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the downstream call was not cancelled"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(back.completed.load(Ordering::SeqCst), completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_incoming_deadline_the_default_applies() {
    let back = Replica::start().await;
    let endpoints = Endpoints::new([back.addr]);
    let channel = balanced(
        endpoints,
        ClientOptions {
            default_timeout: Some(Duration::from_secs(3)),
            ..options()
        },
    );
    call(channel).await.unwrap();
    assert_eq!(received_timeout(&back), Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_exceeded_is_never_retried() {
    let back = Replica::start().await;
    let (_, channel) = mesh(&[&back]).await;
    back.delay_ms.store(500, Ordering::SeqCst);
    let before = back.calls();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = Request::new(Bytes::new());
    request.set_timeout(Duration::from_millis(50));
    let status = grpc
        .unary(
            request,
            http::uri::PathAndQuery::from_static(IDEMPOTENT),
            Raw,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        back.calls() - before,
        1,
        "an idempotent call past its deadline is not retried"
    );
}

/// A process whose peer never answered reads "0 admitted endpoints" of it from the start, not
/// nothing: the no-serving-endpoint alert fires for it (promtool's cases in the it suite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_never_reached_is_counted_with_no_admitted_endpoint() {
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = nobody.local_addr().unwrap();
    drop(nobody);
    let (registry, options) = counted_options();
    let _channel = balanced(Endpoints::new([addr]), options);
    for state in ["admitted", "ejected", "not_serving"] {
        let series = registry
            .gather()
            .iter()
            .filter(|family| family.name() == "keel_mesh_endpoints")
            .flat_map(|family| family.get_metric().to_vec())
            .find(|metric| {
                let label = |name: &str| {
                    let found = metric.get_label().iter().find(|l| l.name() == name);
                    found.map(|l| l.value().to_owned())
                };
                label("peer").as_deref() == Some("echo") && label("state").as_deref() == Some(state)
            });
        let series = series.unwrap_or_else(|| panic!("no {state} series for the peer"));
        if state == "admitted" {
            assert_eq!(series.get_gauge().get_value(), 0.0);
        }
    }
}

fn sample(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .filter(|metric| {
            labels.iter().all(|(k, v)| {
                metric
                    .get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|metric| metric.get_counter().get_value() + metric.get_gauge().get_value())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_retries_ejections_and_endpoint_states_are_counted() {
    let (a, b, c) = (
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    );
    let registry = prometheus::Registry::new();
    let metrics = keel_mesh::client::ClientMetrics::register(&registry).unwrap();
    let endpoints = Endpoints::new([a.addr, b.addr, c.addr]);
    let options = ClientOptions {
        peer: "echo".into(),
        metrics: Some(metrics),
        ..options()
    };
    let channel = balanced(endpoints, options);
    keel_testkit::eventually(Duration::from_secs(10), "three admitted endpoints", || {
        let (channel, admitted) = (
            channel.clone(),
            sample(&registry, "keel_mesh_endpoints", &[("state", "admitted")]),
        );
        async move {
            load(&channel, 10, 2).await;
            (admitted == 3.0).then_some(())
        }
    })
    .await;
    a.failing.store(true, Ordering::SeqCst);
    outcomes(&channel, IDEMPOTENT, 300, 8).await;

    let ok = sample(
        &registry,
        "grpc_client_handled_total",
        &[
            ("peer", "echo"),
            ("grpc_method", "Call"),
            ("grpc_code", "OK"),
        ],
    );
    assert!(ok >= 300.0, "{ok}");
    assert!(
        sample(
            &registry,
            "keel_mesh_retries_total",
            &[("grpc_method", "Call")]
        ) >= 1.0
    );
    let endpoint = keel_mesh::client::endpoint_digest(a.addr);
    assert_eq!(
        sample(
            &registry,
            "keel_mesh_ejections_total",
            &[("endpoint", endpoint.as_str())]
        ),
        1.0
    );
    assert!(
        sample(
            &registry,
            "keel_mesh_endpoint_attempts_total",
            &[("endpoint", endpoint.as_str()), ("outcome", "failed")]
        ) >= 5.0
    );
    assert_eq!(
        sample(&registry, "keel_mesh_endpoints", &[("state", "admitted")]),
        2.0
    );
    assert_eq!(
        sample(&registry, "keel_mesh_endpoints", &[("state", "ejected")]),
        1.0
    );
    assert!(sample(&registry, "grpc_client_started_total", &[("peer", "echo")]) >= 300.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_refuses_fast_for_overload_gets_fewer_calls_than_a_healthy_one() {
    let (refusing, healthy) = (Replica::start().await, Replica::start().await);
    // The healthy replica does some work per call; the refusing one answers at once, which
    // PeakEWMA alone would read as the less loaded of the two.
    healthy.delay_ms.store(2, Ordering::SeqCst);
    let (registry, channel) = counted_mesh(&[&refusing, &healthy]).await;
    refusing.refusing.store(true, Ordering::SeqCst);
    let before = (refusing.calls(), healthy.calls());
    let (ok, failed) = outcomes(&channel, IDEMPOTENT, 400, 8).await;
    let refused = refusing.calls() - before.0;
    let served = healthy.calls() - before.1;
    assert_eq!(
        (ok, failed),
        (served, refused),
        "every refusal reached its caller"
    );
    assert!(
        refused * 4 < served,
        "{refused} calls went to the refusing replica, {served} to the healthy one"
    );
    let endpoint = keel_mesh::client::endpoint_digest(refusing.addr);
    let counted = sample(
        &registry,
        "keel_mesh_endpoint_attempts_total",
        &[("endpoint", endpoint.as_str()), ("outcome", "refused")],
    );
    assert_eq!(counted, refused as f64, "refusals are counted as such");
}

/// Three replicas (the first is the one a test slows), a registry, and options that hedge
/// reads as `hedging` says, counted in that registry.
async fn hedging_replicas(hedging: Hedging) -> ([Replica; 3], prometheus::Registry, ClientOptions) {
    let replicas = [
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    ];
    let registry = prometheus::Registry::new();
    let metrics = keel_mesh::client::ClientMetrics::register(&registry).unwrap();
    let options = ClientOptions {
        peer: "echo".into(),
        metrics: Some(metrics),
        hedging: Some(hedging),
        ..options()
    };
    (replicas, registry, options)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_replica_stalled_hedged_reads_all_succeed_and_writes_are_never_hedged() {
    let ([stalled, a, b], registry, options) = hedging_replicas(Hedging {
        ratio: 1.0,
        per_second: 100,
        warm_up: 20,
    })
    .await;
    // A read left on the stalled replica would wait a minute: its deadline, far beyond what a
    // hedged read takes on a loaded machine, ends it first as a failure.
    let options = ClientOptions {
        default_timeout: Some(Duration::from_secs(20)),
        ..options
    };
    let (_, channel) = mesh_with(&[&stalled, &a, &b], options.clone()).await;
    // The client learns the read's p95 from calls made while it has somewhere else to send a
    // hedge, i.e. once every replica is admitted, which the calls above only began: without
    // these, the first reads after the stall could go unhedged (a CI run waited out the
    // minute on one).
    load(&channel, 40, 4).await;
    // Writes on a channel of their own whose deadline ends one that lands on the stalled
    // replica; whether it ends in time does not matter, only that none was hedged.
    let writes = ClientOptions {
        default_timeout: Some(Duration::from_millis(500)),
        ..options
    };
    let (_, write_channel) = mesh_with(&[&stalled, &a, &b], writes).await;
    stalled.delay_ms.store(60_000, Ordering::SeqCst);
    let before = stalled.calls();

    let (ok, failed) = outcomes(&channel, IDEMPOTENT, 200, 4).await;
    assert_eq!((ok, failed), (200, 0), "every read succeeded");
    let hedges = sample(
        &registry,
        "keel_mesh_hedges_total",
        &[("grpc_method", "Call")],
    );
    let reached_stalled = (stalled.calls() - before) as f64;
    assert!(reached_stalled >= 1.0, "the stalled replica was picked");
    assert!(
        reached_stalled <= hedges,
        "{reached_stalled} attempts reached the stalled replica, {hedges} hedges were sent"
    );

    outcomes(&write_channel, WRITE, 40, 4).await;
    let write_hedges = sample(
        &registry,
        "keel_mesh_hedges_total",
        &[("grpc_method", "Write")],
    );
    assert_eq!(
        write_hedges, 0.0,
        "a method with side effects is never hedged"
    );
}

/// A hedge its endpoint refuses at once (overloaded) is no answer: the read waits for its first
/// attempt on the slow replica, which runs to its end and answers; none is given up for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_refused_at_once_leaves_the_read_to_its_slow_first_attempt() {
    let ([slow, refusing, _], registry, options) = hedging_replicas(Hedging {
        ratio: 1.0,
        per_second: 100,
        warm_up: 20,
    })
    .await;
    let (_, channel) = mesh_with(&[&slow, &refusing], options).await;
    // Fast reads enough that the slow ones below stay above the method's p95.
    load(&channel, 400, 4).await;
    slow.delay_ms.store(200, Ordering::SeqCst);
    // Paused after each refusal, the refusing replica takes few first attempts, and the hedges.
    refusing.refusing.store(true, Ordering::SeqCst);
    let (cancelled, completed) = (
        slow.cancelled.load(Ordering::SeqCst),
        slow.completed.load(Ordering::SeqCst),
    );
    // Hedges that went to the refusing replica, and those declined with nowhere else to go
    // (it was paused), alike.
    let sent = || {
        sample(
            &registry,
            "keel_mesh_hedges_total",
            &[("grpc_method", "Call")],
        )
    };
    let before = sent();
    let hedges = || sent() - before;
    // A read whose first attempt the refusing replica takes fails: a refusal is not retried.
    for round in 0.. {
        assert!(round < 20, "reads on the slow replica were hedged");
        outcomes(&channel, IDEMPOTENT, 10, 2).await;
        if hedges() >= 3.0 {
            break;
        }
    }
    assert_eq!(
        slow.cancelled.load(Ordering::SeqCst),
        cancelled,
        "no read on the slow replica was given up for a refused hedge"
    );
    assert!(
        slow.completed.load(Ordering::SeqCst) > completed,
        "the slow replica answered reads"
    );
}

/// With hedges' budget at nothing, a read slower than its p95 is not hedged, and the hedge it
/// would have had is counted as refused by that budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_its_budget_refuses_is_counted_not_sent() {
    let ([slow, a, b], registry, options) = hedging_replicas(Hedging {
        ratio: 0.0,
        per_second: 0,
        warm_up: 20,
    })
    .await;
    let (_, channel) = mesh_with(&[&slow, &a, &b], options).await;
    load(&channel, 40, 4).await;
    slow.delay_ms.store(300, Ordering::SeqCst);
    let before = slow.calls();

    let (ok, failed) = outcomes(&channel, IDEMPOTENT, 100, 4).await;
    assert_eq!((ok, failed), (100, 0), "every read succeeded, unhedged");
    let reached_slow = (slow.calls() - before) as f64;
    assert!(reached_slow >= 1.0, "the slow replica was picked");
    let refused = |budget: &str| {
        sample(
            &registry,
            "keel_mesh_hedges_refused_total",
            &[("grpc_method", "Call"), ("budget", budget)],
        )
    };
    assert!(
        refused("hedge") >= reached_slow,
        "{reached_slow} reads waited on the slow replica, {} hedges were refused",
        refused("hedge")
    );
    assert_eq!(refused("retry"), 0.0);
    let sent = sample(
        &registry,
        "keel_mesh_hedges_total",
        &[("grpc_method", "Call")],
    );
    assert_eq!(sent, 0.0, "no hedge was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_serving_endpoint_a_call_fails_fast_with_unavailable_not_at_its_deadline() {
    let replica = Replica::start().await;
    replica.health.not_serving().await;
    let endpoints = Endpoints::new([replica.addr]);
    let channel = balanced(
        endpoints,
        ClientOptions {
            // Were the call queued until its deadline, it would end DEADLINE_EXCEEDED.
            default_timeout: Some(Duration::from_secs(120)),
            fail_fast: Duration::from_millis(200),
            ..options()
        },
    );
    for path in [IDEMPOTENT, WRITE] {
        let status = call_path(channel.clone(), path).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("no endpoint"), "{status:?}");
    }
    assert_eq!(replica.calls(), 0);

    // Once it serves again, calls go through.
    replica.health.serving().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(channel.clone()).await.is_err() {
        assert!(Instant::now() < deadline, "the replica was admitted again");
    }
}

/// A compose project starts every service at once: a peer's name may find nothing at first.
/// Discovery then looks again after a short pause, not a whole resolve interval later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_discovery_does_not_find_at_first_is_found_at_a_quick_second_look() {
    let replica = Replica::start().await;
    let endpoints = Endpoints::new([]);
    let channel = balanced(
        endpoints.clone(),
        ClientOptions {
            resolve_interval: Duration::from_secs(3600),
            fail_fast: Duration::from_millis(100),
            ..options()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while endpoints.resolutions() == 0 {
        assert!(Instant::now() < deadline, "discovery never looked");
        tokio::task::yield_now().await;
    }
    endpoints.add(replica.addr);
    while call(channel.clone()).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the peer was not found before the next resolve interval ({} lookups)",
            endpoints.resolutions()
        );
    }
}

/// `options` whose discovery, left to itself, looks again a minute or more after a look that
/// found nothing: longer than a call waits for an endpoint (5 s) or its deadline (10 s).
fn unhurried(options: ClientOptions) -> ClientOptions {
    ClientOptions {
        resolve_interval: Duration::from_secs(3600),
        backoff: (Duration::from_secs(60), Duration::from_secs(60)),
        fail_fast: Duration::from_secs(5),
        ..options
    }
}

/// A replica that comes back while its endpoint's health watch waits out a long backoff (a
/// compose project starting: the peer's containers refused at first) is reached by the next
/// call, which finds no endpoint and asks discovery to look now, not after the backoff (a
/// minute here, longer than the call's fail-fast wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_finds_no_endpoint_has_discovery_look_again_at_once() {
    let mut replica = Replica::start().await;
    let addr = replica.addr;
    let (registry, options) = counted_options();
    let channel = balanced(Endpoints::new([addr]), unhurried(options));
    call(channel.clone()).await.expect("admitted at first");
    // Gone: its watcher settles it out, then waits 30 to 90 s before it watches again.
    replica.kill();
    until_admitted(&registry, 0.0).await;
    let back = Replica::start_on(addr).await;
    call(channel.clone())
        .await
        .expect("reached now, not after the watcher's backoff");
    assert_eq!(back.calls(), 1);
}

/// Likewise a peer whose name found nothing at first (its containers not started yet): the
/// call that finds no endpoint has it looked up now, not at the next quick look (a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_finds_no_endpoint_has_discovery_look_up_the_peer_again_at_once() {
    let replica = Replica::start().await;
    let endpoints = Endpoints::new([]);
    let channel = balanced(endpoints.clone(), unhurried(options()));
    keel_testkit::eventually(Duration::from_secs(10), "a first lookup", || async {
        (endpoints.resolutions() >= 1).then_some(())
    })
    .await;
    endpoints.add(replica.addr);
    call(channel.clone())
        .await
        .expect("found now, not at the next look");
    assert_eq!(
        endpoints.resolutions(),
        2,
        "one more lookup, asked for by the call"
    );
}

/// Discovery whose answers come late: `delay` after each question, and never to the first when
/// `first_unanswered` (a DNS answer lost: glibc waits on the same socket for 30 s), or never to
/// any but the first when `only_first_answered` (a DNS server gone quiet after one question).
struct Hesitant {
    endpoints: Arc<Endpoints>,
    delay: Duration,
    first_unanswered: bool,
    only_first_answered: bool,
    asked: AtomicUsize,
}

#[async_trait::async_trait]
impl keel_mesh::client::Resolver for Hesitant {
    async fn resolve(&self) -> std::io::Result<Vec<std::net::SocketAddr>> {
        let first = self.asked.fetch_add(1, Ordering::SeqCst) == 0;
        if (first && self.first_unanswered) || (!first && self.only_first_answered) {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(self.delay).await;
        self.endpoints.resolve().await
    }
}

/// Whether a call through a mesh over `resolver` succeeds within 10 s (each resolution waited
/// for 100 ms at first, the next due an hour after one that found the replica).
async fn found_through(resolver: Arc<Hesitant>) -> bool {
    let channel = balanced(
        resolver,
        ClientOptions {
            resolve_interval: Duration::from_secs(3600),
            resolve_patience: Duration::from_millis(100),
            fail_fast: Duration::from_millis(100),
            ..options()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if call(channel.clone()).await.is_ok() {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_that_never_answers_is_given_up_for_a_fresh_one() {
    let replica = Replica::start().await;
    let resolver = Arc::new(Hesitant {
        endpoints: Endpoints::new([replica.addr]),
        delay: Duration::ZERO,
        first_unanswered: true,
        only_first_answered: false,
        asked: AtomicUsize::new(0),
    });
    assert!(
        found_through(resolver.clone()).await,
        "still waiting for the first lookup"
    );
    assert!(resolver.asked.load(Ordering::SeqCst) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_every_lookup_is_slow_is_found_once_patience_has_grown() {
    let replica = Replica::start().await;
    let resolver = Arc::new(Hesitant {
        endpoints: Endpoints::new([replica.addr]),
        // Three times the first patience: heard from the first lookup, which the fresh ones
        // started beside it (at 100 and 300 ms) do not replace.
        delay: Duration::from_millis(300),
        first_unanswered: false,
        only_first_answered: false,
        asked: AtomicUsize::new(0),
    });
    assert!(
        found_through(resolver.clone()).await,
        "never heard after {} lookups",
        resolver.asked.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_lookup_is_still_heard_once_fresh_ones_have_started_beside_it() {
    let replica = Replica::start().await;
    let resolver = Arc::new(Hesitant {
        endpoints: Endpoints::new([replica.addr]),
        // Past the first patience (100 ms), and the fresh lookups are never answered.
        delay: Duration::from_millis(250),
        first_unanswered: false,
        only_first_answered: true,
        asked: AtomicUsize::new(0),
    });
    assert!(
        found_through(resolver.clone()).await,
        "the first lookup's answer was dropped"
    );
    assert!(
        resolver.asked.load(Ordering::SeqCst) >= 2,
        "a fresh lookup started beside the slow one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_carries_its_request_id_is_retried_and_one_without_is_not() {
    let (a, b) = (Replica::start().await, Replica::start().await);
    // Write's request has its idempotency key in field 1, as Methods::from_descriptors finds
    // request_id.
    let (_, channel) = mesh_with(
        &[&a, &b],
        ClientOptions {
            methods: Methods {
                keyed: [(WRITE.to_owned(), 1)].into(),
                ..echo_methods()
            },
            ..options()
        },
    )
    .await;
    for replica in [&a, &b] {
        replica.failing.store(true, Ordering::SeqCst);
    }
    let served = || a.calls() + b.calls();

    let before = served();
    for i in 0..10 {
        // Field 1, length-delimited: request_id = "key-<i>".
        let key = format!("key-{i}");
        let mut body = vec![0x0a, u8::try_from(key.len()).unwrap()];
        body.extend_from_slice(key.as_bytes());
        let status = call_with_body(channel.clone(), WRITE, Bytes::from(body))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
    assert!(
        served() - before > 10,
        "calls with a request_id were retried ({} attempts for 10 calls)",
        served() - before
    );

    let before = served();
    for _ in 0..10 {
        // "hi" is a valid message without field 1: the key is not set.
        call_path(channel.clone(), WRITE).await.unwrap_err();
    }
    assert_eq!(served() - before, 10, "one attempt per call without a key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_an_endpoint_the_call_has_not_tried() {
    let (a, b) = (Replica::start().await, Replica::start().await);
    // Never ejected: only the balancer's choice keeps retries off the failing replica.
    let (_, channel) = mesh_with(
        &[&a, &b],
        ClientOptions {
            ejection: Ejection {
                consecutive_failures: u32::MAX,
                ..Ejection::default()
            },
            ..options()
        },
    )
    .await;
    a.failing.store(true, Ordering::SeqCst);
    let (a_before, b_before) = (a.calls(), b.calls());
    let (ok, failed) = outcomes(&channel, IDEMPOTENT, 100, 4).await;
    assert_eq!(
        (ok, failed),
        (100, 0),
        "a call that failed on one replica was retried on the other"
    );
    let on_a = a.calls() - a_before;
    assert!(
        on_a > 0,
        "the failing replica was tried first by some calls"
    );
    assert_eq!(
        b.calls() - b_before,
        100,
        "every call ended on the healthy replica, once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_not_sent_again_when_its_connection_breaks() {
    let (mut doomed, other) = (Replica::start().await, Replica::start().await);
    let (_, channel) = mesh(&[&doomed, &other]).await;
    // Writes stay in flight on the doomed replica until it dies under them.
    doomed.delay_ms.store(60_000, Ordering::SeqCst);
    let before = doomed.calls() + other.calls();
    const WRITES: usize = 40;
    let writes: Vec<_> = (0..WRITES)
        .map(|_| tokio::spawn(call_path(channel.clone(), WRITE)))
        .collect();
    keel_testkit::eventually(
        Duration::from_secs(10),
        "writes in flight on the doomed replica",
        || {
            let arrived = doomed.calls() + other.calls() - before;
            async move { (arrived == WRITES).then_some(()) }
        },
    )
    .await;
    let in_flight_on_doomed = doomed.calls();
    assert!(
        in_flight_on_doomed > 0,
        "some writes went to the doomed replica"
    );
    doomed.kill();
    let mut broken = 0;
    for write in writes {
        if write.await.unwrap().is_err() {
            broken += 1;
        }
    }
    assert!(broken > 0, "the writes on the killed replica failed");
    assert_eq!(
        doomed.calls() + other.calls() - before,
        WRITES,
        "each write reached a server once: none was sent again after its connection broke"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_endpoint_gets_the_configured_number_of_connections() {
    for connections in [1, 3] {
        let replica = Replica::start().await;
        let (_, channel) = mesh_with(
            &[&replica],
            ClientOptions {
                connections_per_endpoint: connections,
                ..options()
            },
        )
        .await;
        load(&channel, 60, 8).await;
        assert_eq!(
            replica.peers.lock().unwrap().len(),
            connections,
            "calls arrived over {connections} connection(s)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_a_load_of_writes_fails_none_and_sends_each_once() {
    let mut replicas = vec![
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    ];
    let (_, channel) = mesh(&replicas.iter().collect::<Vec<_>>()).await;
    let warm_up: usize = replicas.iter().map(Replica::calls).sum();
    // Writes, 32 in flight, until every replica has been restarted.
    let restarted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..32)
        .map(|_| {
            let (channel, restarted, sent, failed) = (
                channel.clone(),
                restarted.clone(),
                sent.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                while !restarted.load(Ordering::SeqCst) {
                    sent.fetch_add(1, Ordering::SeqCst);
                    if let Err(status) = call_path(channel.clone(), WRITE).await {
                        failed.lock().unwrap().push(status);
                    }
                }
            })
        })
        .collect();
    // Calls each replica served, counted before it stops.
    let mut served = 0;
    for slot in &mut replicas {
        let addr = slot.addr;
        slot.drain().await;
        served += slot.calls();
        *slot = Replica::start_on(addr).await;
        let fresh = &*slot;
        keel_testkit::eventually(
            Duration::from_secs(10),
            "the restarted replica to take writes",
            || {
                let taking = fresh.calls() > 0;
                async move { taking.then_some(()) }
            },
        )
        .await;
    }
    restarted.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }
    let served = served + replicas.iter().map(Replica::calls).sum::<usize>() - warm_up;
    let sent = sent.load(Ordering::SeqCst);
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "of {sent} writes during the rolling restart, {} failed: {failed:?}",
        failed.len()
    );
    assert_eq!(served, sent, "each write reached a replica exactly once");
}
