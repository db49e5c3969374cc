//! orders' schema, tracked in its own `orders_migrations` table: orders, their lines (with the
//! product's title when it was placed), and the saga's history.

use sea_orm_migration::prelude::*;

crate::migrator!("orders", [CreateOrders, TitlesAndDecisions]);

#[derive(DeriveIden)]
enum Orders {
    #[sea_orm(iden = "orders_orders")]
    Table,
    Id,
    UserId,
    State,
    Stage,
    RejectionReason,
    CurrencyCode,
    TotalUnits,
    BuyerEmail,
    RequestId,
    RequestHash,
    Version,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Lines {
    #[sea_orm(iden = "orders_lines")]
    Table,
    OrderId,
    Position,
    ProductId,
    Quantity,
    UnitPriceUnits,
    CurrencyCode,
    Title,
}

#[derive(DeriveIden)]
enum History {
    #[sea_orm(iden = "orders_history")]
    Table,
    OrderId,
    Seq,
    Action,
    Outcome,
    Detail,
    Compensation,
    CreatedAt,
}

struct CreateOrders;

impl MigrationName for CreateOrders {
    fn name(&self) -> &str {
        "m0001_create_orders"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateOrders {
    #[allow(
        clippy::too_many_lines,
        reason = "the schema, one statement per table and index, read top to bottom"
    )]
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        fn time(col: impl IntoIden) -> ColumnDef {
            ColumnDef::new(col)
                .timestamp_with_time_zone()
                .not_null()
                .to_owned()
        }
        manager
            .create_table(
                Table::create()
                    .table(Orders::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Orders::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(Orders::UserId).uuid().not_null())
                    .col(ColumnDef::new(Orders::State).string().not_null())
                    .col(ColumnDef::new(Orders::Stage).string().not_null())
                    .col(ColumnDef::new(Orders::RejectionReason).string().not_null())
                    .col(ColumnDef::new(Orders::CurrencyCode).string().not_null())
                    .col(ColumnDef::new(Orders::TotalUnits).big_integer().not_null())
                    .col(ColumnDef::new(Orders::BuyerEmail).string().not_null())
                    .col(ColumnDef::new(Orders::RequestId).string().not_null())
                    .col(ColumnDef::new(Orders::RequestHash).string().not_null())
                    .col(ColumnDef::new(Orders::Version).big_integer().not_null())
                    .col(time(Orders::CreatedAt))
                    .col(time(Orders::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        // ListOrders: a buyer's orders, newest first.
        manager
            .create_index(
                Index::create()
                    .name("orders_orders_buyer")
                    .table(Orders::Table)
                    .col(Orders::UserId)
                    .col(Orders::Id)
                    .to_owned(),
            )
            .await?;
        // AIP-155: one order per buyer and request id; concurrent retries meet here.
        manager
            .create_index(
                Index::create()
                    .name("orders_orders_request")
                    .table(Orders::Table)
                    .col(Orders::UserId)
                    .col(Orders::RequestId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Lines::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Lines::OrderId).uuid().not_null())
                    .col(ColumnDef::new(Lines::Position).integer().not_null())
                    .col(ColumnDef::new(Lines::ProductId).uuid().not_null())
                    .col(ColumnDef::new(Lines::Quantity).big_integer().not_null())
                    .col(
                        ColumnDef::new(Lines::UnitPriceUnits)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Lines::CurrencyCode).string().not_null())
                    .primary_key(Index::create().col(Lines::OrderId).col(Lines::Position))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(History::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(History::OrderId).uuid().not_null())
                    .col(ColumnDef::new(History::Seq).integer().not_null())
                    .col(ColumnDef::new(History::Action).string().not_null())
                    .col(ColumnDef::new(History::Outcome).string().not_null())
                    .col(ColumnDef::new(History::Detail).string().not_null())
                    .col(ColumnDef::new(History::Compensation).boolean().not_null())
                    .col(time(History::CreatedAt))
                    .primary_key(Index::create().col(History::OrderId).col(History::Seq))
                    .to_owned(),
            )
            .await
    }
}

/// Lines keep their product's title for the buyer's e-mails; a cancellation is one decided
/// stage (`cancel`), its refund and release idempotent steps of it; and the reconciler reads the
/// orders whose saga is not done.
struct TitlesAndDecisions;

impl MigrationName for TitlesAndDecisions {
    fn name(&self) -> &str {
        "m0002_titles_and_decisions"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for TitlesAndDecisions {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Lines::Table)
                    .add_column(ColumnDef::new(Lines::Title).string().not_null().default(""))
                    .to_owned(),
            )
            .await?;
        let db = manager.get_connection();
        db.execute_unprepared(
            "UPDATE orders_orders SET stage = 'cancel' \
             WHERE stage IN ('cancel.refund', 'cancel.release')",
        )
        .await?;
        // The reconciler's sweep: unsettled orders, oldest change first; partial, so that it
        // costs what it finds, not every order ever placed.
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS orders_orders_unsettled ON orders_orders (updated_at) \
             WHERE stage <> 'done'",
        )
        .await?;
        Ok(())
    }
}
