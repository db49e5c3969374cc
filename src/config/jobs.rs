//! jobs' part of the operator surface: what a job made through the API may cost.

use clap::Args;

/// jobs' settings.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Jobs")]
pub struct JobSettings {
    /// Attempts a job made through JobService gets before it is DEAD.
    #[arg(
        long,
        env = "KEEL_JOB_MAX_ATTEMPTS",
        default_value_t = 5,
        global = true
    )]
    pub job_max_attempts: i32,

    /// Most live jobs (queued, running, or failed and waiting for a retry) one caller may have
    /// made through JobService; a CreateJob or BatchCreateJobs past it is RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "KEEL_JOB_LIVE_PER_CALLER",
        default_value_t = 100,
        global = true
    )]
    pub job_live_per_caller: i64,
}

impl JobSettings {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), super::ConfigError> {
        if self.job_max_attempts < 1 {
            return Err(super::ConfigError::Zero("KEEL_JOB_MAX_ATTEMPTS"));
        }
        if self.job_live_per_caller < 1 {
            return Err(super::ConfigError::Zero("KEEL_JOB_LIVE_PER_CALLER"));
        }
        Ok(())
    }
}
