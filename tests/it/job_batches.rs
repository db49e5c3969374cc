//! BatchCreateJobs (AIP-233) on both store pairs: a thousand jobs in one call, answered in
//! order; one bad request, a batch past the caller's quota, too many requests or a caller who
//! may not each refuse the whole batch and write nothing; a batch sent again under its request
//! ids answers the same jobs.

use crate::support;

use keel::proto::keel::jobs::v1::job_service_client::JobServiceClient;
use keel::proto::keel::jobs::v1::{BatchCreateJobsRequest, CreateJobRequest, Job};
use reqwest::Method;
use serde_json::json;
use support::{TestApp, authed, expect_code, rest, violated_field};
use tonic::Code;

/// The quota of live jobs these tests run under: a thousand and the welcome e-mails.
const QUOTA: i64 = 1_100;

/// A `noop` job due in 2099 (it stays QUEUED) under unique key `key`.
fn later(key: &str) -> serde_json::Value {
    json!({"type": "noop", "scheduleTime": "2099-01-01T00:00:00Z", "uniqueKey": key})
}

async fn queued(app: &TestApp) -> i64 {
    app.count("queue_jobs WHERE kind = 'noop'").await
}

async fn a_thousand_jobs_are_one_call_and_a_bad_one_refuses_them_all(app: TestApp) {
    let people = app.people().await;
    let post = |requests: Vec<serde_json::Value>, token: String| {
        let app = &app;
        async move {
            let body = json!({"requests": requests});
            rest(
                app,
                Method::POST,
                "/v1/jobs:batchCreate",
                Some(&token),
                Some(body),
            )
            .await
        }
    };
    let thousand: Vec<_> = (0..1000)
        .map(|i| json!({"job": later(&format!("k{i}"))}))
        .collect();

    // One bad request among a thousand: nothing is written, and the error names it.
    let mut one_bad = thousand.clone();
    one_bad[999] = json!({"job": {"type": "rm.rf"}});
    let (status, body) = post(one_bad, people.admin.clone()).await;
    assert_eq!(status, 400, "{body}");
    let field = &body["details"][0]["fieldViolations"][0]["field"];
    assert_eq!(field, "requests[999].job.type", "{body}");
    // Too many requests, none, or a caller who may not.
    let mut too_many = thousand.clone();
    too_many.push(json!({"job": later("one too many")}));
    assert_eq!(post(too_many, people.admin.clone()).await.0, 400);
    assert_eq!(post(Vec::new(), people.admin.clone()).await.0, 400);
    assert_eq!(
        post(thousand[..2].to_vec(), people.ada.clone()).await.0,
        403
    );
    assert_eq!(queued(&app).await, 0, "a refused batch writes nothing");

    let (status, body) = post(thousand.clone(), people.admin.clone()).await;
    assert_eq!(status, 200, "{body}");
    let jobs = body["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1000);
    for (i, job) in jobs.iter().enumerate() {
        assert_eq!(job["uniqueKey"], format!("k{i}"), "answered in order");
        assert_eq!(job["state"], "QUEUED");
    }
    assert_eq!(queued(&app).await, 1000);
    // Past the quota (a thousand live, and a hundred and one more), the whole batch is refused.
    let past: Vec<_> = (0..101)
        .map(|i| json!({"job": later(&format!("more{i}"))}))
        .collect();
    assert_eq!(post(past, people.admin.clone()).await.0, 429);
    assert_eq!(queued(&app).await, 1000);
}

async fn a_batch_sent_again_under_its_request_ids_answers_the_same_jobs(app: TestApp) {
    let people = app.people().await;
    let mut client = JobServiceClient::new(app.channel().await);
    let one = |key: &str| CreateJobRequest {
        job: Some(Job {
            r#type: "noop".into(),
            unique_key: key.into(),
            ..Default::default()
        }),
        request_id: uuid::Uuid::now_v7().to_string(),
    };
    let batch = BatchCreateJobsRequest {
        requests: vec![one("a"), one("b"), one("c")],
    };
    let names = |jobs: Vec<Job>| jobs.into_iter().map(|j| j.name).collect::<Vec<_>>();
    let first = client
        .batch_create_jobs(authed(batch.clone(), &people.admin))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .batch_create_jobs(authed(batch.clone(), &people.admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(first.jobs), names(again.jobs));
    // A request id reused with another job refuses the whole batch.
    let mut reused = batch;
    reused.requests[2].job.as_mut().unwrap().unique_key = "other".into();
    reused.requests.insert(0, one("never"));
    let refused = expect_code(
        client
            .batch_create_jobs(authed(reused, &people.admin))
            .await,
        Code::AlreadyExists,
    );
    assert_eq!(violated_field(&refused), None, "{refused:?}");
    let never = "queue_jobs WHERE unique_key LIKE '%/never'";
    assert_eq!(
        app.count(never).await,
        0,
        "nothing of a refused batch is written"
    );
}

/// The quota these tests run under.
fn quota(s: &mut keel::config::Settings) {
    s.jobs.job_live_per_caller = QUOTA;
}

on_every_store!(
    with quota;
    a_thousand_jobs_are_one_call_and_a_bad_one_refuses_them_all,
    a_batch_sent_again_under_its_request_ids_answers_the_same_jobs,
);
