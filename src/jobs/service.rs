//! The JobService gRPC API over the queue's table: make a job or many at once (the kinds of
//! `kinds.rs`), read and list them (one's own; admins all), and put a dead job back in the
//! queue (admins).

use keel_auth::Caller;
use keel_pagetoken::PageRequest;
use keel_queue::{Job, JobStore, Listing, NewJob, Queue, State};
use tonic::{Request, Response, Status};

use super::error::JobError;
use super::kinds::{self, Who};
use crate::input::{self, FieldError};
use crate::principal;
use crate::proto::keel::jobs::v1::job_service_server::JobService as JobApi;
use crate::proto::keel::jobs::v1::{
    BatchCreateJobsRequest, BatchCreateJobsResponse, CreateJobRequest, GetJobRequest,
    Job as JobMessage, ListJobsRequest, ListJobsResponse, RetryJobRequest, job,
};

/// Longest unique key, in characters.
const MAX_KEY_CHARS: usize = 200;
/// Most jobs one BatchCreateJobs writes.
const MAX_BATCH: usize = 1000;

/// The jobs service.
#[derive(Debug, Clone)]
pub struct JobService {
    queue: Queue,
    max_attempts: i32,
    /// Most live jobs (queued, running, or failed and waiting for a retry) one caller may have.
    live_per_caller: i64,
}

impl JobService {
    /// Jobs in `queue`; those made through the API get `max_attempts`, and one caller may have
    /// `live_per_caller` of them live at once.
    pub fn new(queue: Queue, max_attempts: i32, live_per_caller: i64) -> Self {
        Self {
            queue,
            max_attempts,
            live_per_caller,
        }
    }

    fn store(&self) -> &JobStore {
        self.queue.store()
    }

    async fn create(&self, caller: &Caller, r: CreateJobRequest) -> Result<JobMessage, JobError> {
        let creator = principal::user_name(principal::caller_id(caller)?);
        let new = prepare(caller, &creator, r, self.max_attempts)?;
        let mut written = self
            .store()
            .enqueue_all_capped(vec![new], &creator, self.live_per_caller)
            .await?;
        self.queue.wake();
        Ok(to_proto(&written.remove(0).job()))
    }

    /// Every job of `r` written in one statement, or none (AIP-233).
    async fn batch_create(
        &self,
        caller: &Caller,
        r: BatchCreateJobsRequest,
    ) -> Result<BatchCreateJobsResponse, JobError> {
        let creator = principal::user_name(principal::caller_id(caller)?);
        if r.requests.is_empty() || r.requests.len() > MAX_BATCH {
            let why = format!("from 1 to {MAX_BATCH} requests");
            return Err(FieldError::new("requests", why).into());
        }
        let news = r
            .requests
            .into_iter()
            .enumerate()
            .map(|(i, one)| {
                prepare(caller, &creator, one, self.max_attempts)
                    .map_err(|e| e.within(&format!("requests[{i}]")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let written = self
            .store()
            .enqueue_all_capped(news, &creator, self.live_per_caller)
            .await?;
        self.queue.wake();
        Ok(BatchCreateJobsResponse {
            jobs: written.into_iter().map(|e| to_proto(&e.job())).collect(),
        })
    }

    /// The job `name` names, if the caller made it or is an admin.
    async fn visible(&self, caller: &Caller, name: &str) -> Result<Job, JobError> {
        let id = job_id(name)?;
        let found = self
            .store()
            .get(&id)
            .await?
            .ok_or_else(|| JobError::NotFound(name.to_owned()))?;
        let own =
            principal::caller_id(caller).is_ok_and(|me| found.creator == principal::user_name(me));
        if !own {
            principal::require_admin(caller, "callers may only read their own jobs")?;
        }
        Ok(found)
    }

    async fn list(
        &self,
        caller: &Caller,
        r: ListJobsRequest,
    ) -> Result<ListJobsResponse, JobError> {
        let mut listing = parse_filter(&r.filter)?;
        if !principal::is_admin(caller) {
            listing.creator = Some(principal::user_name(principal::caller_id(caller)?));
        }
        let query = format!(
            "{:?}|{:?}|{:?}",
            listing.creator,
            listing.state.map(State::as_str),
            listing.kind
        );
        let page: PageRequest<String> = PageRequest::new(r.page_size, &r.page_token, query)?;
        let rows = self
            .store()
            .list(&listing, page.after(), page.fetch())
            .await?;
        let (rows, next_page_token) = page.finish(rows, |last| last.id.clone());
        Ok(ListJobsResponse {
            jobs: rows.iter().map(to_proto).collect(),
            next_page_token,
        })
    }

    async fn retry(&self, caller: &Caller, r: RetryJobRequest) -> Result<JobMessage, JobError> {
        principal::require_admin(caller, "only admins retry jobs")?;
        let retried = self.store().retry(&job_id(&r.name)?).await?;
        self.queue.wake();
        Ok(to_proto(&retried))
    }
}

/// The job `r` asks `caller` (as `creator`) to write, checked: its kind and payload, who may
/// make it, its unique key, when it is due, and its request id's fingerprint.
fn prepare(
    caller: &Caller,
    creator: &str,
    r: CreateJobRequest,
    max_attempts: i32,
) -> Result<NewJob, JobError> {
    let job = r.job.ok_or_else(|| FieldError::new("job", "required"))?;
    let payload = job
        .payload
        .as_ref()
        .map(crate::proto::struct_to_json)
        .unwrap_or_else(|| serde_json::json!({}));
    let (payload, who) = kinds::accept(&job.r#type, &payload)?;
    match who {
        Who::Admins => principal::require_admin(caller, "only admins make jobs through the API")?,
        Who::Keel => {
            let denied = principal::AccessError::Denied(
                "keel's own job kinds are made by keel, not through CreateJob",
            );
            return Err(crate::refusal::Refusal::from(denied).into());
        }
    }
    let unique_key = match job.unique_key.as_str() {
        "" => None,
        key => Some(input::text(key, "job.unique_key", 1, MAX_KEY_CHARS, false)?),
    };
    // A time past is now: no job jumps ahead of those already due.
    let now = keel_queue::job::now_ms();
    let run_after = job
        .schedule_time
        .map(|t| t.seconds.saturating_mul(1000) + i64::from(t.nanos / 1_000_000))
        .map(|at| at.max(now));
    let request = input::request_id(&r.request_id)?.map(|id| {
        let canonical = CreateJobRequest {
            job: Some(JobMessage {
                r#type: job.r#type.clone(),
                payload: Some(crate::proto::json_to_struct(&payload)),
                unique_key: unique_key.clone().unwrap_or_default(),
                schedule_time: job.schedule_time,
                ..Default::default()
            }),
            request_id: id.clone(),
        };
        (id, input::fingerprint(&canonical))
    });
    Ok(NewJob {
        unique_key: unique_key.map(|key| scoped_key(creator, &job.r#type, &key)),
        kind: job.r#type,
        payload,
        creator: creator.to_owned(),
        run_after,
        max_attempts: Some(max_attempts),
        request,
    })
}

/// A caller's unique key as stored: under its creator and kind, so that it can only ever match
/// that caller's own jobs of that kind, and never one of keel's own keys (none starts with
/// `users/`).
fn scoped_key(creator: &str, kind: &str, key: &str) -> String {
    format!("{creator}/{kind}/{key}")
}

/// The unique key `j` was made with, as its creator gave it (keel's own keys as they are).
fn given_key(j: &Job) -> String {
    let key = j.unique_key.clone().unwrap_or_default();
    let scope = format!("{}/{}/", j.creator, j.kind);
    key.strip_prefix(&scope).map_or(key.clone(), str::to_owned)
}

fn job_id(name: &str) -> Result<String, FieldError> {
    name.strip_prefix("jobs/")
        .and_then(crate::names::canonical_uuid)
        .map(|id| id.to_string())
        .ok_or_else(|| FieldError::new("name", "must be `jobs/{job}`"))
}

/// `state = DEAD AND type = "email.send"`, either term alone, or nothing.
fn parse_filter(raw: &str) -> Result<Listing, FieldError> {
    let mut listing = Listing::default();
    if raw.trim().is_empty() {
        return Ok(listing);
    }
    let bad = || {
        FieldError::new(
            "filter",
            "terms joined by AND: `state = DEAD`, `type = \"email.send\"`",
        )
    };
    for term in raw.split(" AND ") {
        let (field, value) = term.split_once('=').ok_or_else(bad)?;
        let value = value.trim().trim_matches('"');
        match field.trim() {
            "state" => listing.state = Some(State::parse(value).ok_or_else(bad)?),
            "type" if !value.is_empty() => listing.kind = Some(value.to_owned()),
            _ => return Err(bad()),
        }
    }
    Ok(listing)
}

fn to_proto(j: &Job) -> JobMessage {
    let state = match j.state {
        State::Queued => job::State::Queued,
        State::Running => job::State::Running,
        State::Succeeded => job::State::Succeeded,
        State::Failed => job::State::Failed,
        State::Dead => job::State::Dead,
    };
    JobMessage {
        name: format!("jobs/{}", j.id),
        r#type: j.kind.clone(),
        payload: Some(crate::proto::json_to_struct(&j.payload)),
        state: state as i32,
        attempts: j.attempts,
        last_error: j.last_error.clone().unwrap_or_default(),
        creator: j.creator.clone(),
        create_time: Some(crate::proto::timestamp_ms(j.created_at)),
        update_time: Some(crate::proto::timestamp_ms(j.updated_at)),
        unique_key: given_key(j),
        schedule_time: Some(crate::proto::timestamp_ms(j.run_after)),
        max_attempts: j.max_attempts,
    }
}

#[tonic::async_trait]
impl JobApi for JobService {
    async fn create_job(
        &self,
        request: Request<CreateJobRequest>,
    ) -> Result<Response<JobMessage>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            self.create(&caller, request.into_inner()).await?,
        ))
    }

    async fn batch_create_jobs(
        &self,
        request: Request<BatchCreateJobsRequest>,
    ) -> Result<Response<BatchCreateJobsResponse>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            self.batch_create(&caller, request.into_inner()).await?,
        ))
    }

    async fn get_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<JobMessage>, Status> {
        let caller = principal::caller(&request)?;
        let job = self.visible(&caller, &request.into_inner().name).await?;
        Ok(Response::new(to_proto(&job)))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            self.list(&caller, request.into_inner()).await?,
        ))
    }

    async fn retry_job(
        &self,
        request: Request<RetryJobRequest>,
    ) -> Result<Response<JobMessage>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            self.retry(&caller, request.into_inner()).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_name_a_state_a_type_or_both() {
        let both = parse_filter(r#"state = DEAD AND type = "email.send""#).unwrap();
        assert_eq!(
            (both.state, both.kind.as_deref()),
            (Some(State::Dead), Some("email.send"))
        );
        assert!(parse_filter("").unwrap().state.is_none());
        assert!(parse_filter("state = SLEEPING").is_err());
        assert!(parse_filter("owner = me").is_err());
    }
}
