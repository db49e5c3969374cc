//! jobs' schema, tracked in its own `jobs_migrations` table. It once held the e-mails already
//! sent; those marks now live with every other side effect done once, in the queue's
//! `queue_effects`, and the second migration moves them there. (The jobs themselves are the
//! queue's table.)

use sea_orm_migration::prelude::*;

crate::migrator!("jobs", [CreateMailSent, MoveMailSentToEffects]);

#[derive(DeriveIden)]
enum MailSent {
    #[sea_orm(iden = "jobs_mail_sent")]
    Table,
    MessageId,
    JobId,
    SentAt,
}

struct CreateMailSent;

impl MigrationName for CreateMailSent {
    fn name(&self) -> &str {
        "m0001_create_mail_sent"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateMailSent {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(MailSent::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(MailSent::MessageId)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(MailSent::JobId).string().not_null())
                    .col(ColumnDef::new(MailSent::SentAt).big_integer().not_null())
                    .to_owned(),
            )
            .await
    }
}

struct MoveMailSentToEffects;

impl MigrationName for MoveMailSentToEffects {
    fn name(&self) -> &str {
        "m0002_move_mail_sent_to_effects"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for MoveMailSentToEffects {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // The queue's migrations run first, so `queue_effects` exists. (`WHERE true`: SQLite
        // reads `ON CONFLICT` after a bare `FROM t` as a join's constraint.)
        manager
            .get_connection()
            .execute_unprepared(
                "INSERT INTO queue_effects (key, job_id, attempt, done_at) \
                 SELECT 'mail:' || message_id, job_id, 0, sent_at FROM jobs_mail_sent \
                 WHERE true ON CONFLICT DO NOTHING",
            )
            .await?;
        manager
            .drop_table(Table::drop().table(MailSent::Table).to_owned())
            .await
    }
}
