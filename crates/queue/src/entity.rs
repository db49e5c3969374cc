//! The queue's table as a sea-orm entity.

use sea_orm::entity::prelude::*;

/// `queue_jobs`: one row per job, written in the transaction of the change that asks for it.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "queue_jobs")]
pub struct Model {
    /// UUIDv7 as text.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The handler's name.
    pub kind: String,
    /// JSON arguments.
    pub payload: String,
    /// QUEUED, RUNNING, SUCCEEDED, FAILED, DEAD.
    pub state: String,
    /// Attempts so far.
    pub attempts: i32,
    /// Attempts before it is dead.
    pub max_attempts: i32,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// At most one live job per key.
    pub unique_key: Option<String>,
    /// Who asked.
    pub creator: String,
    /// AIP-155 request id.
    pub request_id: Option<String>,
    /// Fingerprint of the creating request.
    pub request_hash: Option<String>,
    /// Due at (ms).
    pub run_after: i64,
    /// The worker holding it.
    pub locked_by: Option<String>,
    /// Its lease ends (ms).
    pub locked_until: Option<i64>,
    /// When the relay handed it to Redis (ms).
    pub published_at: Option<i64>,
    /// Written (ms).
    pub created_at: i64,
    /// Changed (ms).
    pub updated_at: i64,
    /// Latest attempt started (ms).
    pub started_at: Option<i64>,
    /// Latest attempt finished (ms).
    pub finished_at: Option<i64>,
    /// Last put in the queue: written, or retried by hand (ms).
    pub queued_at: i64,
}

/// No relations are navigated through sea-orm.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
