//! jobs' schema, tracked in its own `jobs_migrations` table: the e-mails already sent, so that a
//! redelivered `email.send` job sends nothing twice. (The jobs themselves are the queue's table.)

use sea_orm_migration::prelude::*;

/// Applies jobs' migrations.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateMailSent)]
    }

    fn migration_table_name() -> DynIden {
        Alias::new("jobs_migrations").into_iden()
    }
}

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
