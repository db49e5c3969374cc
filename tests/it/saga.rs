//! The order saga when things go wrong at the worst instant, on PostgreSQL + Redis with real
//! `keel worker` processes and a real SMTP server: a worker stopped (SIGSTOP, past its lease) or
//! killed at a named statement while the buyer tops up or an admin restocks, another worker
//! taking over, the stopped one resumed — every order ends in one final state that the ledger,
//! the reservation, the shelf and the e-mails agree with. The named cases are the ones that
//! broke before fencing (and one frozen inside a transaction, which held every other worker
//! back), and a test draws cases at random from every fault point. And in one
//! process: mail that outlasts an SMTP outage longer than the old retry schedule is sent once;
//! a confirmation whose turn comes after a cancellation is never sent; an order whose saga job
//! died is finished by the reconciler, and a corrupt one is reported, not driven.

use crate::support;

use std::time::Duration;

use keel::proto::keel::catalog::v1::catalog_service_client::CatalogServiceClient;
use keel::proto::keel::catalog::v1::{GetProductRequest, Product, UpdateProductRequest};
use keel::proto::keel::jobs::v1::job_service_client::JobServiceClient;
use keel::proto::keel::jobs::v1::{ListJobsRequest, RetryJobRequest};
use keel::proto::keel::orders::v1::order_service_client::OrderServiceClient;
use keel::proto::keel::orders::v1::{
    CancelOrderRequest, LineItem, Order, PlaceOrderRequest, order, saga_step,
};
use keel::proto::keel::payments::v1::payment_service_client::PaymentServiceClient;
use keel::proto::keel::payments::v1::{ListTransactionsRequest, TopUpWalletRequest};
use rand::{Rng as _, SeedableRng as _};
use sea_orm::{ConnectionTrait, Statement};
use support::process::{Fleet, register_over_rest};
use support::{Stores, TestApp, authed, create_product, eur};

/// What a worker does at its fault point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halt {
    /// SIGSTOP itself: stands still past its lease, then is resumed once another worker is done.
    Stop,
    /// SIGKILL itself.
    Kill,
}

/// One order's story.
#[derive(Debug, Clone)]
struct Case {
    /// Where the first worker halts (if the order's path reaches it).
    point: &'static str,
    halt: Halt,
    /// The buyer can pay when ordering; if not, they top up while the first worker is halted.
    funded: bool,
    /// The shelf holds enough when ordering; if not, an admin restocks while it is halted.
    stocked: bool,
    /// The buyer cancels the order once it is confirmed.
    cancel: bool,
    /// Where the worker that takes over stops in turn (if its path reaches it): the first one
    /// is resumed while it stands there, so that the two race for the order.
    then: Option<&'static str>,
}

const UNIT_PRICE: i64 = 1000;
const QUANTITY: i64 = 2;
const TOTAL: i64 = UNIT_PRICE * QUANTITY;

/// A fleet whose keel and workers send mail to `smtp`.
async fn fleet(smtp: &keel_testkit::SmtpSink) -> Fleet {
    Fleet::start(true, &[("KEEL_SMTP_URL", &smtp.url())]).await
}

/// What a case did, to check against.
struct Told {
    order: Order,
    buyer: String,
    product: String,
    shelf: i64,
    /// Whether the first worker reached the case's point and halted there; a case whose point
    /// is not on its path does not test what it names.
    halted: bool,
    /// The workers, kept until the checks are done (the e-mails are theirs to send).
    workers: Vec<support::process::WorkerProcess>,
}

impl Told {
    /// What the workers logged, first to last, without start-up chatter: for a failure to
    /// explain itself.
    fn logs(&self) -> String {
        let quiet = ["migrations", "already exists"];
        let lines = self.workers.iter().enumerate().flat_map(|(n, w)| {
            w.logs()
                .lines()
                .filter(|l| !quiet.iter().any(|q| l.contains(q)))
                .map(|l| format!("worker {n}: {l}\n"))
                .collect::<Vec<_>>()
        });
        lines.collect()
    }
}

/// Runs `case` on `fleet` (mailing to `smtp`): a buyer and a product of its own, a first worker
/// armed at the case's point, and what happens while it is halted.
async fn run(fleet: &Fleet, smtp: &keel_testkit::SmtpSink, case: &Case) -> Told {
    let channel = fleet.keel.channel().await;
    let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
    let buyer = register_over_rest(fleet.keel.http_addr, &email).await;
    let mut shelf = if case.stocked { 10 } else { 1 };
    let product = create_product(channel.clone(), &fleet.admin, "Lamp", UNIT_PRICE, shelf)
        .await
        .name;
    top_up(fleet, &buyer, if case.funded { 5000 } else { 500 }).await;
    let halt = match case.halt {
        Halt::Stop => "stop",
        Halt::Kill => "kill",
    };
    let armed = format!("{}={halt}", case.point);
    let first = fleet.worker(&[("KEEL_FAULT_POINTS", &armed)]).await;
    let placed = place(fleet, &buyer, &product).await;
    let name = placed.name.clone();
    let settled = || async { settled(&fleet.order_of(&name, &buyer).await) };
    // The first worker is done with the order once it settled, and, when it is armed on the
    // way to the mail, once the mail of that settlement went out: the order settles before its
    // mail is sent, and a worker halted there after the order settled would leave it unsent.
    let first_done = || async {
        let order = fleet.order_of(&name, &buyer).await;
        if !self::settled(&order) || case.point != "mail.before_send" {
            return self::settled(&order);
        }
        match order.state() {
            order::State::Confirmed => mailed(smtp, &name, "is confirmed") > 0,
            order::State::Cancelled => mailed(smtp, &name, "is cancelled") > 0,
            _ => true,
        }
    };

    let mut halted = first.halted_or(first_done).await;
    if !halted && case.cancel && confirmed(fleet, &name, &buyer).await {
        cancel(fleet, &name, &buyer).await;
        halted = first.halted_or(first_done).await;
    }
    println!("{case:?}: the first worker halted: {halted}");
    // The first worker, stopped past its lease, still to be resumed.
    let mut first_stands = halted && case.halt == Halt::Stop;
    let mut second = None;
    if halted {
        if !case.funded {
            top_up(fleet, &buyer, 5000).await;
        }
        if !case.stocked {
            restock(fleet, &product, 10).await;
            shelf += 10;
        }
        let armed = case.then.map(|point| format!("{point}=stop"));
        let env: Vec<(&str, &str)> = armed
            .iter()
            .map(|a| ("KEEL_FAULT_POINTS", a.as_str()))
            .collect();
        let taker = fleet.worker(&env).await;
        let mut taker_armed = case.then.is_some();
        for cancelling in [false, true] {
            if cancelling {
                if !(case.cancel && confirmed(fleet, &name, &buyer).await) {
                    break;
                }
                cancel(fleet, &name, &buyer).await;
            }
            if taker_armed && taker.halted_or(settled).await {
                // The first worker wakes up while the second holds the order mid-step.
                if first_stands {
                    stand_down(&first, case).await;
                    first_stands = false;
                }
                taker.resume();
                taker_armed = false;
            }
            until(settled, fleet, &taker).await;
        }
        second = Some(taker);
    }
    let order = fleet.order_of(&name, &buyer).await;
    if first_stands {
        // The first worker wakes up long after another finished the order: whatever it was
        // about to write is refused; the order stays as the other left it.
        stand_down(&first, case).await;
        let after = fleet.order_of(&name, &buyer).await;
        assert_eq!(
            (after.state(), after.history.len()),
            (order.state(), order.history.len()),
            "the resumed worker changed the order: {after:?}"
        );
    }
    if halted {
        // Only the worker that took over goes on (the first one is dead, or stood down).
        first.kill();
    }
    Told {
        order,
        buyer,
        product,
        shelf,
        halted,
        workers: std::iter::once(first).chain(second).collect(),
    }
}

/// Resumes the first worker, stopped past its lease, and waits until it has stood down: its
/// attempt stopped (a saga attempt halted mid-order was necessarily taken over; a mail attempt
/// may simply have gone on) and nothing of it still running.
async fn stand_down(first: &support::process::WorkerProcess, case: &Case) {
    first.resume();
    let taken_over = case.point.starts_with("order.");
    let stood_down = || async {
        let running = first.metrics_sum("keel_queue_running").await;
        let lost = first.metrics_sum("keel_queue_jobs_lost_total").await;
        (running == 0.0 && (lost >= 1.0 || !taken_over)).then_some(())
    };
    keel_testkit::eventually(
        Duration::from_secs(30),
        "the stalled attempt to stand down",
        stood_down,
    )
    .await;
}

/// The order's state is final and its saga's last step is the one that ends its phase.
fn settled(order: &Order) -> bool {
    use saga_step::Action;
    let last = order.history.last().map(|s| s.action());
    match order.state() {
        order::State::Confirmed => last == Some(Action::Confirm),
        order::State::Rejected => last == Some(Action::Reject),
        order::State::Cancelled => true,
        _ => false,
    }
}

/// Waits (bounded) for `settled`; past the bound, fails with what the queue and the worker that
/// took over say, so that a case that hangs explains itself.
async fn until<F, Fut>(settled: F, fleet: &Fleet, worker: &support::process::WorkerProcess)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !settled().await {
        if std::time::Instant::now() > deadline {
            let db = fleet.db().await;
            let jobs = db
                .query_all_raw(Statement::from_string(
                    db.get_database_backend(),
                    "SELECT kind || ' ' || state || ' attempt ' || attempts || ' by ' || \
                     COALESCE(locked_by, '-') || ' until ' || COALESCE(locked_until, 0) || \
                     ' after ' || run_after || ': ' || COALESCE(last_error, '') AS job \
                     FROM queue_jobs WHERE kind LIKE 'order.%' ORDER BY created_at",
                ))
                .await
                .unwrap();
            let jobs: Vec<String> = jobs.iter().map(|r| r.try_get("", "job").unwrap()).collect();
            panic!(
                "the order did not settle within 60 s\njobs: {jobs:#?}\nworker log:\n{}",
                worker.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn confirmed(fleet: &Fleet, name: &str, buyer: &str) -> bool {
    fleet.order_of(name, buyer).await.state() == order::State::Confirmed
}

async fn top_up(fleet: &Fleet, buyer: &str, units: i64) {
    PaymentServiceClient::new(fleet.keel.channel().await)
        .top_up_wallet(authed(
            TopUpWalletRequest {
                name: "users/me/wallet".into(),
                amount: eur(units),
                request_id: uuid::Uuid::new_v4().to_string(),
            },
            buyer,
        ))
        .await
        .unwrap();
}

async fn place(fleet: &Fleet, buyer: &str, product: &str) -> Order {
    let request = PlaceOrderRequest {
        parent: "users/me".into(),
        order: Some(Order {
            line_items: vec![LineItem {
                product: product.into(),
                quantity: QUANTITY,
                unit_price: None,
            }],
            ..Default::default()
        }),
        request_id: uuid::Uuid::new_v4().to_string(),
    };
    OrderServiceClient::new(fleet.keel.channel().await)
        .place_order(authed(request, buyer))
        .await
        .unwrap()
        .into_inner()
}

async fn cancel(fleet: &Fleet, name: &str, buyer: &str) {
    let request = CancelOrderRequest { name: name.into() };
    OrderServiceClient::new(fleet.keel.channel().await)
        .cancel_order(authed(request, buyer))
        .await
        .unwrap();
}

async fn product(fleet: &Fleet, name: &str) -> Product {
    CatalogServiceClient::new(fleet.keel.channel().await)
        .get_product(GetProductRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

/// An admin adds `units` to the shelf, against the stock they read.
async fn restock(fleet: &Fleet, name: &str, units: i64) {
    let read = product(fleet, name).await;
    let request = UpdateProductRequest {
        product: Some(Product {
            stock: read.stock + units,
            ..read
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["stock".into()],
        }),
    };
    CatalogServiceClient::new(fleet.keel.channel().await)
        .update_product(authed(request, &fleet.admin))
        .await
        .unwrap();
}

/// Money the order's payment id holds: charges less refunds, from the buyer's ledger.
async fn kept(fleet: &Fleet, told: &Told) -> i64 {
    let ledger = PaymentServiceClient::new(fleet.keel.channel().await)
        .list_transactions(authed(
            ListTransactionsRequest {
                parent: "users/me/wallet".into(),
                page_size: 1000,
                page_token: String::new(),
            },
            &told.buyer,
        ))
        .await
        .unwrap()
        .into_inner()
        .transactions;
    -ledger
        .iter()
        .filter(|t| t.reference == told.order.name)
        .map(|t| t.amount.as_ref().map_or(0, |m| m.units))
        .sum::<i64>()
}

/// The state of the reservation under the order's name, if one was ever recorded.
async fn reservation(fleet: &Fleet, told: &Told) -> Option<String> {
    let db = fleet.db().await;
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "SELECT state FROM catalog_reservations WHERE reservation_id = $1",
            [told.order.name.clone().into()],
        ))
        .await
        .unwrap();
    row.map(|r| r.try_get::<String>("", "state").unwrap())
}

/// Messages about the order whose subject ends in `what` (`is confirmed`, `is cancelled`).
fn mails(smtp: &keel_testkit::SmtpSink, told: &Told, what: &str) -> usize {
    mailed(smtp, &told.order.name, what)
}

/// Messages about order `name` whose subject ends in `what`.
fn mailed(smtp: &keel_testkit::SmtpSink, name: &str, what: &str) -> usize {
    let id = name.rsplit('/').next().unwrap();
    let subject = format!("Subject: Your keel order {id} {what}");
    smtp.received()
        .iter()
        .filter(|m| m.lines().any(|l| l == subject))
        .count()
}

/// Money, stock, reservation and e-mail agree with the order's final state.
async fn agree(fleet: &Fleet, smtp: &keel_testkit::SmtpSink, case: &Case, told: &Told) {
    let context = format!("{case:?} → {:?}\n{}", told.order, told.logs());
    let on_shelf = product(fleet, &told.product).await.stock;
    let (money, held) = (kept(fleet, told).await, reservation(fleet, told).await);
    match told.order.state() {
        order::State::Confirmed => {
            assert_eq!(money, TOTAL, "charged once: {context}");
            assert_eq!(held.as_deref(), Some("COMMITTED"), "{context}");
            assert_eq!(on_shelf, told.shelf - QUANTITY, "sold once: {context}");
        }
        order::State::Rejected | order::State::Cancelled => {
            assert_eq!(money, 0, "nothing kept: {context}");
            assert!(
                matches!(held.as_deref(), None | Some("RELEASED")),
                "nothing held ({held:?}): {context}"
            );
            assert_eq!(on_shelf, told.shelf, "the shelf whole: {context}");
        }
        state => panic!("not settled ({state:?}): {context}"),
    }
    // Each notice at most once. A cancelled order may or may not have had its confirmation
    // sent: the notice reads the order when it runs, and one that read it CONFIRMED before the
    // cancellation may still be sending it after the order settled.
    let (confirmations, cancellations) = match told.order.state() {
        order::State::Confirmed => (1..=1, 0),
        order::State::Cancelled => (0..=1, 1),
        _ => (0..=0, 0),
    };
    let sent = std::sync::Mutex::new((0, 0));
    let waited = keel_testkit::eventually(Duration::from_secs(30), "the e-mails", || async {
        let confirmed = mails(smtp, told, "is confirmed");
        let cancelled = mails(smtp, told, "is cancelled");
        *sent.lock().unwrap() = (confirmed, cancelled);
        (confirmations.contains(&confirmed) && cancelled == cancellations).then_some(())
    });
    let waited = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(waited)).await;
    assert!(
        waited.is_ok(),
        "sent (confirmations, cancellations) {:?}, wanted {confirmations:?} and \
         {cancellations}: {context}",
        sent.lock().unwrap()
    );
}

async fn the_case(case: Case, ends: order::State) {
    let smtp = keel_testkit::SmtpSink::start().await;
    let fleet = fleet(&smtp).await;
    let told = run(&fleet, &smtp, &case).await;
    assert!(
        told.halted,
        "{case:?}: the first worker never reached its point\n{}",
        told.logs()
    );
    assert_eq!(
        told.order.state(),
        ends,
        "{case:?}: {:?}\n{}",
        told.order,
        told.logs()
    );
    agree(&fleet, &smtp, &case, &told).await;
}

/// The first worker dies after giving the stock back and before writing the rejection; the
/// buyer tops up meanwhile. The rejection it decided stands: nothing is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_releasing_the_stock_of_a_rejection_leaves_no_charge() {
    let case = Case {
        point: "order.released",
        halt: Halt::Kill,
        funded: false,
        stocked: true,
        cancel: false,
        then: None,
    };
    the_case(case, order::State::Rejected).await;
}

/// Killed after the refusal and before any decision was recorded: the next worker charges the
/// topped-up wallet and confirms — consistent, since nothing was undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_before_recording_a_refusal_leaves_the_order_to_the_next() {
    let case = Case {
        point: "order.charge.refused",
        halt: Halt::Kill,
        funded: false,
        stocked: true,
        cancel: false,
        then: None,
    };
    the_case(case, order::State::Confirmed).await;
}

/// The first worker decides "insufficient funds" and stalls past its lease; the buyer tops up;
/// another worker charges, and the first one resumes before the other records the charge: its
/// rejection is refused, and the other confirms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_worker_cannot_reject_an_order_another_charged() {
    let case = Case {
        point: "order.charge.refused",
        halt: Halt::Stop,
        funded: false,
        stocked: true,
        cancel: false,
        then: Some("order.charged"),
    };
    the_case(case, order::State::Confirmed).await;
}

/// The first worker decides "out of stock" and stalls; an admin restocks; another worker
/// reserves, and the first one resumes before the other records it: the stalled rejection is
/// refused, and no reservation is left behind a rejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_worker_cannot_leave_a_reservation_behind_a_rejection() {
    let case = Case {
        point: "order.reserve.refused",
        halt: Halt::Stop,
        funded: true,
        stocked: false,
        cancel: false,
        then: Some("order.reserved"),
    };
    the_case(case, order::State::Confirmed).await;
}

/// The rejection is recorded, then the worker stalls; the next worker compensates and settles
/// it REJECTED even though the shelf was restocked meanwhile; nothing stays held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_rejection_is_carried_out_by_the_next_worker() {
    let case = Case {
        point: "order.decided",
        halt: Halt::Stop,
        funded: true,
        stocked: false,
        cancel: false,
        then: None,
    };
    the_case(case, order::State::Rejected).await;
}

/// Every fault point, halted either way, with or without money or stock at first, cancelled or
/// not: drawn from a seed (`KEEL_SAGA_SEED` replays one), each order checked for agreement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_interleaving_of_the_fault_points_leaves_money_stock_and_mail_agreeing() {
    const POINTS: &[&str] = &[
        "order.after_reserve",
        "order.reserve.refused",
        "order.charged",
        "order.charge.refused",
        "order.decided",
        "order.refunded",
        "order.released",
        "mail.before_send",
    ];
    const SECOND: &[&str] = &["order.reserved", "order.charged", "order.decided"];
    let seed = std::env::var("KEEL_SAGA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen::<u64>());
    println!("KEEL_SAGA_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let smtp = keel_testkit::SmtpSink::start().await;
    let fleet = fleet(&smtp).await;
    for _ in 0..10 {
        let case = Case {
            point: POINTS[rng.gen_range(0..POINTS.len())],
            halt: if rng.r#gen() { Halt::Stop } else { Halt::Kill },
            funded: rng.gen_bool(0.7),
            stocked: rng.gen_bool(0.7),
            cancel: rng.gen_bool(0.3),
            then: rng
                .gen_bool(0.4)
                .then(|| SECOND[rng.gen_range(0..SECOND.len())]),
        };
        let told = run(&fleet, &smtp, &case).await;
        agree(&fleet, &smtp, &case, &told).await;
    }
}

/// Jobs of `kind` in `app`'s table: (state, attempts) each.
async fn jobs_of(db: &impl ConnectionTrait, kind: &str) -> Vec<(String, i32)> {
    db.query_all_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "SELECT state, attempts FROM queue_jobs WHERE kind = $1",
        [kind.into()],
    ))
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.try_get("", "state").unwrap(),
            r.try_get("", "attempts").unwrap(),
        )
    })
    .collect()
}

/// Mail keel could not hand over while SMTP was down — for longer than the eight attempts a
/// mail job once had — goes out once SMTP is back, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_outlasts_an_smtp_outage_longer_than_the_old_retry_schedule() {
    let mut smtp = keel_testkit::SmtpSink::start().await;
    smtp.stop();
    let url = smtp.url();
    let app = TestApp::spawn_with(Stores::PostgresRedis, move |s| {
        s.mail.smtp_url = Some(url);
        s.workers.job_backoff = Duration::from_millis(10);
        s.workers.job_backoff_max = Duration::from_millis(40);
    })
    .await;
    app.register("ada@example.com").await;
    keel_testkit::eventually(Duration::from_secs(60), "ten failed attempts", || async {
        let welcome = jobs_of(&app.db().await, "email.send").await;
        let (state, attempts) = welcome.first()?.clone();
        assert_ne!(state, "DEAD", "the outage outlasted the mail");
        (attempts >= 10).then_some(())
    })
    .await;
    smtp.restart().await;
    keel_testkit::eventually(Duration::from_secs(30), "the welcome e-mail", || async {
        let done = jobs_of(&app.db().await, "email.send").await.first()?.0 == "SUCCEEDED";
        done.then_some(())
    })
    .await;
    let welcomes: Vec<String> = smtp
        .received()
        .into_iter()
        .filter(|m| m.contains("Subject: Welcome to keel"))
        .collect();
    assert_eq!(welcomes.len(), 1, "{welcomes:?}");
    assert!(welcomes[0].contains("To: ada@example.com"), "{welcomes:?}");
}

/// SMTP is down when the order is confirmed and stays down through its cancellation: once it
/// is back, the buyer is told of the cancellation, and never that the order is confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_whose_turn_comes_after_the_refund_is_never_sent() {
    let mut smtp = keel_testkit::SmtpSink::start().await;
    smtp.stop();
    let url = smtp.url();
    let app = TestApp::spawn_with(Stores::Embedded, move |s| {
        s.mail.smtp_url = Some(url);
        s.workers.job_backoff_max = Duration::from_millis(200);
    })
    .await;
    let people = app.people().await;
    let lamp = app.product(&people.admin, "Lamp", 2500, 5).await.name;
    app.payments()
        .await
        .top_up_wallet(authed(
            TopUpWalletRequest {
                name: "users/me/wallet".into(),
                amount: eur(10_000),
                request_id: uuid::Uuid::new_v4().to_string(),
            },
            &people.ada,
        ))
        .await
        .unwrap();
    let mut orders = OrderServiceClient::new(app.channel().await);
    let request = PlaceOrderRequest {
        parent: "users/me".into(),
        order: Some(Order {
            line_items: vec![LineItem {
                product: lamp,
                quantity: 2,
                unit_price: None,
            }],
            ..Default::default()
        }),
        request_id: uuid::Uuid::new_v4().to_string(),
    };
    let placed = orders
        .place_order(authed(request, &people.ada))
        .await
        .unwrap()
        .into_inner();
    let name = placed.name.clone();
    let read = || {
        let (mut orders, name, ada) = (orders.clone(), name.clone(), people.ada.clone());
        async move {
            let request = keel::proto::keel::orders::v1::GetOrderRequest { name };
            orders
                .get_order(authed(request, &ada))
                .await
                .unwrap()
                .into_inner()
        }
    };
    keel_testkit::eventually(Duration::from_secs(30), "the confirmation", || async {
        settled(&read().await).then_some(())
    })
    .await;
    let cancelling = CancelOrderRequest { name: name.clone() };
    orders
        .clone()
        .cancel_order(authed(cancelling, &people.ada))
        .await
        .unwrap();
    keel_testkit::eventually(Duration::from_secs(30), "the cancellation", || async {
        let order = read().await;
        (order.state() == order::State::Cancelled).then_some(())
    })
    .await;
    assert!(
        jobs_of(&app.db().await, "order.email").await.len() == 2,
        "a confirmation and a cancellation, both waiting for SMTP"
    );
    smtp.restart().await;
    keel_testkit::eventually(
        Duration::from_secs(30),
        "both notices to be done",
        || async {
            let notices = jobs_of(&app.db().await, "order.email").await;
            notices
                .iter()
                .all(|(state, _)| state == "SUCCEEDED")
                .then_some(())
        },
    )
    .await;
    let id = name.rsplit('/').next().unwrap();
    let about = |what: &str| {
        smtp.received()
            .iter()
            .filter(|m| m.contains(&format!("Subject: Your keel order {id} {what}")))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(about("is confirmed"), Vec::<String>::new());
    let cancelled = about("is cancelled");
    assert_eq!(cancelled.len(), 1);
    assert!(cancelled[0].contains("50.00 EUR"), "{}", cancelled[0]);
}

/// An app whose own process runs no worker, so that a test decides what happens to a saga
/// job before any worker sees it, and an order placed in it.
async fn an_order_no_worker_ran(stores: Stores) -> (TestApp, String, String) {
    let app = TestApp::spawn_with(stores, |s| s.workers.worker_concurrency = Some(0)).await;
    let people = app.people().await;
    let lamp = app.product(&people.admin, "Lamp", 1000, 5).await.name;
    app.payments()
        .await
        .top_up_wallet(authed(
            TopUpWalletRequest {
                name: "users/me/wallet".into(),
                amount: eur(5000),
                request_id: uuid::Uuid::new_v4().to_string(),
            },
            &people.ada,
        ))
        .await
        .unwrap();
    let request = PlaceOrderRequest {
        parent: "users/me".into(),
        order: Some(Order {
            line_items: vec![LineItem {
                product: lamp,
                quantity: 1,
                unit_price: None,
            }],
            ..Default::default()
        }),
        request_id: uuid::Uuid::new_v4().to_string(),
    };
    let placed = OrderServiceClient::new(app.channel().await)
        .place_order(authed(request, &people.ada))
        .await
        .unwrap()
        .into_inner();
    (app, placed.name, people.ada)
}

/// A worker that sweeps for stuck orders every 50 ms and counts any order as stuck.
async fn reconciling_worker(app: &TestApp) -> support::InProcessWorker {
    app.start_worker(|s| {
        s.orders.order_reconcile_every = Duration::from_millis(50);
        s.orders.order_stuck_after = Duration::ZERO;
    })
    .await
}

async fn found(worker: &support::InProcessWorker, how: &str) -> f64 {
    let url = format!("http://{}/metrics", worker.admin_addr);
    let (_, text) = keel_testkit::http::get(&url).await.unwrap();
    keel_testkit::http::metric(
        &text,
        &format!("keel_orders_unsettled_total{{found=\"{how}\"}}"),
    )
}

/// The saga job of an order dies (made DEAD by hand, as fifty failed attempts would): the
/// reconciler drives the order again, to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_saga_job_died_is_finished_by_the_reconciler() {
    a_dead_saga_redriven(Stores::PostgresRedis).await;
}

/// The same on the embedded stores (SQLite's side of the redrive: its write lock taken first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_saga_job_died_is_finished_by_the_reconciler_embedded() {
    a_dead_saga_redriven(Stores::Embedded).await;
}

async fn a_dead_saga_redriven(stores: Stores) {
    let (app, name, ada) = an_order_no_worker_ran(stores).await;
    app.db()
        .await
        .execute_unprepared("UPDATE queue_jobs SET state = 'DEAD' WHERE kind = 'order.saga'")
        .await
        .unwrap();
    let worker = reconciling_worker(&app).await;
    let mut orders = OrderServiceClient::new(app.channel().await);
    keel_testkit::eventually(Duration::from_secs(30), "the order to be finished", || {
        let (mut orders, name, ada) = (orders.clone(), name.clone(), ada.clone());
        async move {
            let request = keel::proto::keel::orders::v1::GetOrderRequest { name };
            let order = orders
                .get_order(authed(request, &ada))
                .await
                .unwrap()
                .into_inner();
            (order.state() == order::State::Confirmed && settled(&order)).then_some(())
        }
    })
    .await;
    assert!(found(&worker, "redriven").await >= 1.0);
    let sagas = jobs_of(&app.db().await, "order.saga").await;
    assert_eq!(
        sagas.len(),
        2,
        "the dead job, and the one that finished it: {sagas:?}"
    );
    let request = keel::proto::keel::orders::v1::GetOrderRequest { name };
    assert!(orders.get_order(authed(request, &ada)).await.is_ok());
    worker.stop().await;
}

/// The sweep reads an unsettled order (its saga job died) and stands still before it drives it
/// (a pause, as a frozen VM makes one); meanwhile an admin retries the dead job, which finishes
/// the order. When the sweep goes on, it writes no saga job: the order moved since it read it.
///
/// On PostgreSQL only: a process stopped on the embedded stores may hold SQLite's one writer
/// lock (any of its tasks may be writing), and every other writer then fails after the busy
/// timeout (a CI run's RetryJob did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_that_paused_does_not_drive_an_order_finished_meanwhile() {
    let fleet = Fleet::start(true, &[]).await;
    let product = create_product(
        fleet.keel.channel().await,
        &fleet.admin,
        "Lamp",
        UNIT_PRICE,
        10,
    )
    .await
    .name;
    top_up(&fleet, &fleet.ada, 5000).await;
    let order = place(&fleet, &fleet.ada, &product).await;
    let db = fleet.db().await;
    db.execute_unprepared("UPDATE queue_jobs SET state = 'DEAD' WHERE kind = 'order.saga'")
        .await
        .unwrap();
    // Its lease outlasts the pause: the sweep is not taken over, it goes on.
    let paused = fleet
        .worker(&[
            ("KEEL_ORDER_RECONCILE_EVERY", "50ms"),
            ("KEEL_ORDER_STUCK_AFTER", "0s"),
            ("KEEL_JOB_LEASE", "60s"),
            ("KEEL_FAULT_POINTS", "order.reconcile.found=stop"),
        ])
        .await;
    assert!(
        paused.halted_or(|| async { false }).await,
        "the sweep never found the order"
    );

    let mut jobs = JobServiceClient::new(fleet.keel.channel().await);
    let listed = jobs
        .list_jobs(authed(
            ListJobsRequest {
                filter: "type = order.saga".into(),
                ..Default::default()
            },
            &fleet.admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let [dead] = &listed[..] else {
        panic!("one saga job: {listed:?}")
    };
    let retry = RetryJobRequest {
        name: dead.name.clone(),
    };
    jobs.retry_job(authed(retry, &fleet.admin)).await.unwrap();
    let _other = fleet.worker(&[]).await;
    keel_testkit::eventually(Duration::from_secs(30), "the order to be finished", || {
        let (fleet, name) = (&fleet, &order.name);
        async move {
            let order = fleet.order_of(name, &fleet.ada).await;
            (order.state() == order::State::Confirmed && settled(&order)).then_some(())
        }
    })
    .await;
    keel_testkit::eventually(
        Duration::from_secs(30),
        "its saga job to succeed",
        || async {
            let sagas = jobs_of(&db, "order.saga").await;
            (sagas.first()?.0 == "SUCCEEDED").then_some(())
        },
    )
    .await;

    paused.resume();
    keel_testkit::eventually(
        Duration::from_secs(30),
        "the paused sweep to go on",
        || async {
            let found = paused.metrics_sum("keel_orders_unsettled_total").await;
            (found >= 1.0).then_some(())
        },
    )
    .await;
    let moved = "keel_orders_unsettled_total{found=\"moved\"}";
    assert_eq!(paused.metric(moved).await, 1.0, "{}", paused.logs());
    let sagas = jobs_of(&db, "order.saga").await;
    assert_eq!(sagas.len(), 1, "only the job that finished it: {sagas:?}");
}

/// An order whose stage is none the saga knows is not quietly taken for done: its saga job
/// fails for good, the reconciler reports it, and reading it is an internal error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_order_is_reported_not_driven() {
    let (app, name, ada) = an_order_no_worker_ran(Stores::Embedded).await;
    app.db()
        .await
        .execute_unprepared("UPDATE orders_orders SET stage = 'dnoe'")
        .await
        .unwrap();
    let worker = reconciling_worker(&app).await;
    keel_testkit::eventually(Duration::from_secs(30), "the saga job to die", || async {
        let sagas = jobs_of(&app.db().await, "order.saga").await;
        (sagas.first()?.0 == "DEAD").then_some(())
    })
    .await;
    keel_testkit::eventually(Duration::from_secs(30), "the report", || async {
        (found(&worker, "corrupt").await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(found(&worker, "redriven").await, 0.0);
    let request = keel::proto::keel::orders::v1::GetOrderRequest { name };
    let status = OrderServiceClient::new(app.channel().await)
        .get_order(authed(request, &ada))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(!status.message().contains("dnoe"), "{status:?}");
    worker.stop().await;
}
