//! payments' schema, tracked in its own `payments_migrations` table: wallets, their ledger, and
//! the payment ids charged or closed to charges.

use sea_orm_migration::prelude::*;

crate::migrator!("payments", [CreateWalletsAndLedger, CreatePayments]);

#[derive(DeriveIden)]
enum Wallets {
    #[sea_orm(iden = "payments_wallets")]
    Table,
    UserId,
    BalanceUnits,
    CurrencyCode,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Transactions {
    #[sea_orm(iden = "payments_transactions")]
    Table,
    Id,
    UserId,
    Kind,
    AmountUnits,
    CurrencyCode,
    IdempotencyKey,
    RequestHash,
    Reference,
    CreatedAt,
}

struct CreateWalletsAndLedger;

impl MigrationName for CreateWalletsAndLedger {
    fn name(&self) -> &str {
        "m0001_create_wallets_and_ledger"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateWalletsAndLedger {
    #[allow(
        clippy::too_many_lines,
        reason = "the schema, one statement per table and index, read top to bottom"
    )]
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Wallets::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Wallets::UserId)
                            .uuid()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(Wallets::BalanceUnits)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Wallets::CurrencyCode)
                            .string_len(3)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Wallets::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    // The last line of defence: the database itself refuses a negative balance.
                    .check(Expr::col(Wallets::BalanceUnits).gte(0))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Transactions::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Transactions::Id)
                            .uuid()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Transactions::UserId).uuid().not_null())
                    .col(ColumnDef::new(Transactions::Kind).string().not_null())
                    .col(
                        ColumnDef::new(Transactions::AmountUnits)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Transactions::CurrencyCode)
                            .string_len(3)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Transactions::IdempotencyKey)
                            .string()
                            .not_null()
                            .unique_key(),
                    )
                    .col(
                        ColumnDef::new(Transactions::RequestHash)
                            .string()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Transactions::Reference).string().not_null())
                    .col(
                        ColumnDef::new(Transactions::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // ListTransactions: a wallet's ledger newest first.
        manager
            .create_index(
                Index::create()
                    .name("payments_transactions_owner")
                    .table(Transactions::Table)
                    .col(Transactions::UserId)
                    .col(Transactions::Id)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum Payments {
    #[sea_orm(iden = "payments_payments")]
    Table,
    PaymentId,
    State,
    UpdatedAt,
}

struct CreatePayments;

impl MigrationName for CreatePayments {
    fn name(&self) -> &str {
        "m0002_create_payments"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreatePayments {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One row per payment id that was charged (CHARGED) or refunded (CLOSED, even if never
        // charged): charges and refunds of one id take turns on it.
        manager
            .create_table(
                Table::create()
                    .table(Payments::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Payments::PaymentId)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Payments::State).string().not_null())
                    .col(ColumnDef::new(Payments::UpdatedAt).big_integer().not_null())
                    .to_owned(),
            )
            .await
    }
}
