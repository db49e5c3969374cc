//! todos' schema, tracked in its own `todos_migrations` table.

use sea_orm_migration::prelude::*;

crate::migrator!("todos", [CreateTodos]);

#[derive(DeriveIden)]
enum Todos {
    #[sea_orm(iden = "todos_todos")]
    Table,
    Id,
    UserId,
    Title,
    Completed,
    RequestId,
    RequestHash,
    CreatedAt,
    UpdatedAt,
}

struct CreateTodos;

impl MigrationName for CreateTodos {
    fn name(&self) -> &str {
        "m0001_create_todos"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateTodos {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Todos::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Todos::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(Todos::UserId).uuid().not_null())
                    .col(ColumnDef::new(Todos::Title).string().not_null())
                    .col(ColumnDef::new(Todos::Completed).boolean().not_null())
                    .col(ColumnDef::new(Todos::RequestId).string().null())
                    .col(ColumnDef::new(Todos::RequestHash).string().null())
                    .col(
                        ColumnDef::new(Todos::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Todos::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // ListTodos: a user's todos newest first, optionally only (not) completed.
        manager
            .create_index(
                Index::create()
                    .name("todos_todos_owner")
                    .table(Todos::Table)
                    .col(Todos::UserId)
                    .col(Todos::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("todos_todos_owner_completed")
                    .table(Todos::Table)
                    .col(Todos::UserId)
                    .col(Todos::Completed)
                    .col(Todos::Id)
                    .to_owned(),
            )
            .await?;
        // CreateTodo retries: one todo per owner and request id (NULLs never collide).
        manager
            .create_index(
                Index::create()
                    .name("todos_todos_request")
                    .table(Todos::Table)
                    .col(Todos::UserId)
                    .col(Todos::RequestId)
                    .unique()
                    .to_owned(),
            )
            .await
    }
}
