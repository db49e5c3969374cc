//! Jobs on both store pairs through JobService: a job that always fails is dead after its
//! attempts with its last error and comes back when an admin retries it; a unique key made twice
//! is one job; callers see their own jobs and make only what they may; welcome e-mails are jobs
//! an admin sees; an e-mail delivered twice by its job's attempt is one message, and one by an
//! attempt that lost its job is none; and a cache invalidation that failed while Redis hung is
//! done once it answers.

use crate::support;

use std::time::Duration;

use keel::proto::keel::catalog::v1::{GetProductRequest, Product, UpdateProductRequest};
use keel::proto::keel::jobs::v1::job_service_client::JobServiceClient;
use keel::proto::keel::jobs::v1::{
    CreateJobRequest, GetJobRequest, Job, ListJobsRequest, RetryJobRequest, job,
};
use sea_orm::{ConnectionTrait as _, Statement};
use serde_json::json;
use support::{Stores, TestApp, authed, eur, expect_code, violated_field};
use tonic::Code;

async fn jobs(app: &TestApp) -> JobServiceClient<tonic::transport::Channel> {
    JobServiceClient::new(app.channel().await)
}

fn new_job(kind: &str, payload: serde_json::Value) -> CreateJobRequest {
    CreateJobRequest {
        job: Some(Job {
            r#type: kind.into(),
            payload: Some(keel::proto::json_to_struct(&payload)),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

async fn until_state(app: &TestApp, token: &str, name: &str, state: job::State) -> Job {
    let client = jobs(app).await;
    keel_testkit::eventually(Duration::from_secs(30), "the job's state", || {
        let (mut client, token, name) = (client.clone(), token.to_owned(), name.to_owned());
        async move {
            let found = client
                .get_job(authed(GetJobRequest { name }, &token))
                .await
                .unwrap()
                .into_inner();
            (found.state() == state).then_some(found)
        }
    })
    .await
}

async fn a_job_that_always_fails_is_dead_and_an_admin_brings_it_back(app: TestApp) {
    let people = app.people().await;
    let mut client = jobs(&app).await;
    let failing = client
        .create_job(authed(
            new_job("noop", json!({"fail": "the printer is on fire"})),
            &people.admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failing.state(), job::State::Queued);
    let dead = until_state(&app, &people.admin, &failing.name, job::State::Dead).await;
    assert_eq!(
        (dead.attempts, dead.max_attempts, dead.last_error.as_str()),
        (3, 3, "the printer is on fire")
    );
    let retry = || RetryJobRequest {
        name: failing.name.clone(),
    };
    expect_code(
        client.retry_job(authed(retry(), &people.ada)).await,
        Code::PermissionDenied,
    );
    let back = client
        .retry_job(authed(retry(), &people.admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((back.state(), back.attempts), (job::State::Queued, 0));
    let dead_again = until_state(&app, &people.admin, &failing.name, job::State::Dead).await;
    assert_eq!(dead_again.attempts, 3);
    // Only a dead job can be retried.
    let fine = client
        .create_job(authed(new_job("noop", json!({})), &people.admin))
        .await
        .unwrap()
        .into_inner();
    until_state(&app, &people.admin, &fine.name, job::State::Succeeded).await;
    expect_code(
        client
            .retry_job(authed(RetryJobRequest { name: fine.name }, &people.admin))
            .await,
        Code::FailedPrecondition,
    );
}

async fn a_unique_key_made_twice_is_one_job(app: TestApp) {
    let people = app.people().await;
    let mut client = jobs(&app).await;
    let keyed = || {
        let mut request = new_job("noop", json!({}));
        let job = request.job.as_mut().unwrap();
        job.unique_key = "nightly-report".into();
        job.schedule_time = Some(prost_types::Timestamp {
            seconds: 4_000_000_000,
            nanos: 0,
        });
        request
    };
    let first = client
        .create_job(authed(keyed(), &people.admin))
        .await
        .unwrap()
        .into_inner();
    let second = client
        .create_job(authed(keyed(), &people.admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.name, second.name);
    assert_eq!(
        first.unique_key, "nightly-report",
        "the key as its caller gave it"
    );
    assert_eq!(app.count("queue_jobs WHERE kind = 'noop'").await, 1);
}

/// A caller who names another's key — another admin's, or one of keel's own (a buyer's order
/// confirmation, a cancellation's saga) — gets a job of their own, never the other's, and the
/// other's job is untouched.
async fn a_unique_key_answers_only_its_callers_own_jobs(app: TestApp) {
    let people = app.people().await;
    let mut client = jobs(&app).await;
    let with_key = |key: &str| {
        let mut request = new_job("noop", json!({}));
        request.job.as_mut().unwrap().unique_key = key.into();
        request.job.as_mut().unwrap().schedule_time = Some(prost_types::Timestamp {
            seconds: 4_000_000_000,
            nanos: 0,
        });
        request
    };
    let ada = app.user_name(&people.ada).await;
    let welcome_key = format!("welcome:{ada}");
    let welcome = keel_testkit::eventually(Duration::from_secs(30), "ada's welcome", || async {
        let db = app.db().await;
        let sql = format!("SELECT id FROM queue_jobs WHERE unique_key = '{welcome_key}'");
        let row = db.query_one_raw(Statement::from_string(db.get_database_backend(), sql));
        row.await
            .unwrap()
            .map(|r| r.try_get::<String>("", "id").unwrap())
    })
    .await;
    let mine = client
        .create_job(authed(with_key(&welcome_key), &people.admin))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(mine.name, format!("jobs/{welcome}"));
    assert_eq!(
        (mine.r#type.as_str(), mine.unique_key.as_str()),
        ("noop", welcome_key.as_str())
    );
    let untouched = client
        .get_job(authed(
            GetJobRequest {
                name: format!("jobs/{welcome}"),
            },
            &people.admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (untouched.r#type.as_str(), untouched.creator.as_str()),
        ("email.send", "services/identity")
    );
    expect_code(
        client
            .create_job(authed(with_key(&welcome_key), &people.ada))
            .await,
        Code::PermissionDenied,
    );
}

/// A time in the past does not jump the queue, and one caller's live jobs are bounded.
async fn a_past_schedule_is_now_and_live_jobs_per_caller_are_bounded(app: TestApp) {
    let people = app.people().await;
    let mut client = jobs(&app).await;
    let at = |seconds: i64| {
        let mut request = new_job("noop", json!({}));
        request.job.as_mut().unwrap().schedule_time =
            Some(prost_types::Timestamp { seconds, nanos: 0 });
        request
    };
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let year_one = client
        .create_job(authed(at(-62_135_596_800), &people.admin))
        .await
        .unwrap()
        .into_inner();
    assert!(
        year_one.schedule_time.unwrap().seconds >= before,
        "{year_one:?}"
    );
    // Nothing of the admin's lives any more (that job, its welcome e-mail): then a hundred.
    keel_testkit::eventually(
        Duration::from_secs(30),
        "the admin's jobs to finish",
        || async {
            let live = "queue_jobs WHERE state IN ('QUEUED', 'RUNNING', 'FAILED')";
            (app.count(live).await == 0).then_some(())
        },
    )
    .await;
    let later = at(4_000_000_000);
    for _ in 0..100 {
        client
            .create_job(authed(later.clone(), &people.admin))
            .await
            .unwrap();
    }
    let over = expect_code(
        client
            .create_job(authed(later.clone(), &people.admin))
            .await,
        Code::ResourceExhausted,
    );
    assert!(over.message().contains("100"), "{over:?}");
}

async fn callers_make_what_they_may_and_see_their_own(app: TestApp) {
    let people = app.people().await;
    let mut client = jobs(&app).await;
    let before = app.count("queue_jobs").await;
    let email = || {
        new_job(
            "email.send",
            json!({"to": "someone@example.com", "subject": "Hi", "body": "Hello"}),
        )
    };
    expect_code(
        client.create_job(authed(email(), &people.ada)).await,
        Code::PermissionDenied,
    );
    let unknown = expect_code(
        client
            .create_job(authed(new_job("rm.rf", json!({})), &people.ada))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&unknown).as_deref(), Some("job.type"));
    let bad_payload = expect_code(
        client
            .create_job(authed(
                new_job("email.send", json!({"to": "nobody"})),
                &people.admin,
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(
        violated_field(&bad_payload).as_deref(),
        Some("job.payload.to")
    );
    assert_eq!(app.count("queue_jobs").await, before, "nothing was written");

    let sent = client
        .create_job(authed(email(), &people.admin))
        .await
        .unwrap()
        .into_inner();
    until_state(&app, &people.admin, &sent.name, job::State::Succeeded).await;
    assert!(
        app.mail()
            .iter()
            .any(|m| m.to == "someone@example.com" && m.subject == "Hi")
    );
    expect_code(
        client
            .create_job(authed(new_job("noop", json!({})), &people.ada))
            .await,
        Code::PermissionDenied,
    );
    let list = |token: &str, filter: &str| {
        let (mut client, token, filter) = (client.clone(), token.to_owned(), filter.to_owned());
        async move {
            client
                .list_jobs(authed(
                    ListJobsRequest {
                        filter,
                        ..Default::default()
                    },
                    &token,
                ))
                .await
                .unwrap()
                .into_inner()
                .jobs
        }
    };
    // Welcome e-mails are identity's jobs: each carries the code that proves its address, so no
    // registrant reads one back (or typing another's address would prove it); an admin sees them.
    for token in [&people.ada, &people.bob] {
        let theirs = list(token, r#"type = "email.send""#).await;
        assert!(theirs.is_empty(), "{theirs:?}");
    }
    let welcomes: Vec<Job> = list(&people.admin, r#"type = "email.send""#)
        .await
        .into_iter()
        .filter(|j| j.creator == "services/identity")
        .collect();
    assert_eq!(
        welcomes.len(),
        3,
        "a welcome e-mail per registration: {welcomes:?}"
    );
    expect_code(
        jobs(&app)
            .await
            .get_job(authed(
                GetJobRequest {
                    name: welcomes[0].name.clone(),
                },
                &people.ada,
            ))
            .await,
        Code::PermissionDenied,
    );
}

on_every_store!(
    a_job_that_always_fails_is_dead_and_an_admin_brings_it_back,
    a_unique_key_made_twice_is_one_job,
    a_unique_key_answers_only_its_callers_own_jobs,
    a_past_schedule_is_now_and_live_jobs_per_caller_are_bounded,
    callers_make_what_they_may_and_see_their_own,
);

/// A job of a kind no worker of the app runs, claimed by `worker`: the attempt a test drives.
async fn claimed(store: &keel_queue::JobStore, worker: &str) -> keel_queue::Job {
    let kind = "test.mail";
    store
        .enqueue(keel_queue::NewJob {
            kind: kind.into(),
            creator: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let lease = Duration::from_secs(60);
    let mut held = store
        .claim(worker, kind, None, 1, lease, None)
        .await
        .unwrap();
    held.pop().expect("the job, claimed")
}

fn outbox_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(keel::mail::outbox(dir))
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_delivered_twice_by_its_attempt_is_one_message_and_a_lost_attempt_sends_none() {
    let app = TestApp::spawn(Stores::Embedded).await;
    let data_dir = tempfile::tempdir().unwrap();
    let db = app.db().await;
    let postman =
        keel::mail::Postman::new(&app.settings.mail, data_dir.path(), db.clone()).unwrap();
    let store = keel_queue::JobStore::new(db);
    let email = keel::mail::Email {
        to: "ada@example.com".into(),
        subject: "Twice?".into(),
        body: "Once.".into(),
    };

    let job = claimed(&store, "a").await;
    postman.deliver(&job, &email).await.unwrap();
    // A redelivery, after the first attempt's outcome was lost.
    postman.deliver(&job, &email).await.unwrap();
    let files = outbox_files(data_dir.path());
    assert_eq!(files.len(), 1);
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(
        text.contains(&format!("Message-ID: <{}@keel>", job.id)),
        "{text}"
    );
    assert_eq!(app.count("queue_effects").await, 1);

    // An attempt whose lease ran out and whose job another worker claimed sends nothing.
    let stalled = claimed(&store, "a").await;
    let expired = format!(
        "UPDATE queue_jobs SET locked_until = 0 WHERE id = '{}'",
        stalled.id
    );
    sea_orm::ConnectionTrait::execute_unprepared(&app.db().await, &expired)
        .await
        .unwrap();
    let lease = Duration::from_secs(60);
    let ids = [stalled.id.clone()];
    let took_over = store
        .claim("b", "test.mail", None, 1, lease, Some(&ids))
        .await
        .unwrap()
        .pop()
        .expect("the job, taken over");
    assert_eq!(took_over.attempts, stalled.attempts + 1);
    let refused = postman.deliver(&stalled, &email).await.unwrap_err();
    assert!(
        matches!(refused, keel_queue::Failure::Lost(_)),
        "{refused:?}"
    );
    assert_eq!(
        outbox_files(data_dir.path()).len(),
        1,
        "the stalled attempt sent nothing"
    );
    postman.deliver(&took_over, &email).await.unwrap();
    assert_eq!(
        outbox_files(data_dir.path()).len(),
        2,
        "the new holder sent it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_that_failed_while_redis_hung_is_done_once_it_answers() {
    let redis = keel_testkit::Redis::dedicated().await;
    let url = redis.url.clone();
    let app = TestApp::spawn_with(Stores::PostgresRedis, move |s| {
        s.stores.redis_url = Some(url);
        s.stores.cache_ttl = Duration::from_secs(3600);
        s.workers.job_backoff = Duration::from_millis(100);
    })
    .await;
    let people = app.people().await;
    let mut catalog = app.catalog().await;
    let lamp = app.product(&people.admin, "Lamp", 100, 1).await;
    let get = || GetProductRequest {
        name: lamp.name.clone(),
    };
    // Cached at 100: the second read is a hit.
    let hits = r#"keel_cache_requests_total{cache="catalog.product",result="hit"}"#;
    catalog.get_product(get()).await.unwrap();
    let before = app.metric(hits).await;
    catalog.get_product(get()).await.unwrap();
    assert_eq!(app.metric(hits).await, before + 1.0, "cached at 100");
    redis.pause();
    let update = UpdateProductRequest {
        product: Some(Product {
            name: lamp.name.clone(),
            price: eur(200),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["price".into()],
        }),
    };
    catalog
        .update_product(authed(update, &people.admin))
        .await
        .expect("the write succeeds while the cache hangs");
    assert_eq!(
        app.count("queue_jobs WHERE kind = 'cache.invalidate'")
            .await,
        1,
        "the failed invalidation was written down"
    );
    redis.resume();
    keel_testkit::eventually(
        Duration::from_secs(30),
        "the stale entry to be invalidated",
        || {
            let (mut catalog, request) = (catalog.clone(), get());
            async move {
                let price = catalog
                    .get_product(request)
                    .await
                    .ok()?
                    .into_inner()
                    .price?;
                (price.units == 200).then_some(())
            }
        },
    )
    .await;
    let done = "queue_jobs WHERE kind = 'cache.invalidate' AND state = 'SUCCEEDED'";
    keel_testkit::eventually(
        Duration::from_secs(30),
        "the written-down invalidation to run",
        || async { (app.count(done).await == 1).then_some(()) },
    )
    .await;
}
