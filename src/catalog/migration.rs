//! catalog's schema, tracked in its own `catalog_migrations` table: products (with a version
//! that every change bumps, their etag), reservations and their lines.

use sea_orm_migration::prelude::*;

crate::migrator!("catalog", [CreateProductsAndReservations, ProductVersions]);

#[derive(DeriveIden)]
enum Products {
    #[sea_orm(iden = "catalog_products")]
    Table,
    Id,
    Title,
    Description,
    PriceUnits,
    CurrencyCode,
    Stock,
    RequestId,
    RequestHash,
    CreatedAt,
    UpdatedAt,
    Version,
}

#[derive(DeriveIden)]
enum Reservations {
    #[sea_orm(iden = "catalog_reservations")]
    Table,
    ReservationId,
    State,
    RequestHash,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum ReservationLines {
    #[sea_orm(iden = "catalog_reservation_lines")]
    Table,
    ReservationId,
    Position,
    ProductId,
    Quantity,
    UnitPriceUnits,
    CurrencyCode,
}

struct CreateProductsAndReservations;

impl MigrationName for CreateProductsAndReservations {
    fn name(&self) -> &str {
        "m0001_create_products_and_reservations"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateProductsAndReservations {
    #[allow(
        clippy::too_many_lines,
        reason = "the schema, one statement per table and index, read top to bottom"
    )]
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Products::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Products::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(Products::Title).string().not_null())
                    .col(ColumnDef::new(Products::Description).text().not_null())
                    .col(
                        ColumnDef::new(Products::PriceUnits)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Products::CurrencyCode)
                            .string_len(3)
                            .not_null(),
                    )
                    .col(ColumnDef::new(Products::Stock).big_integer().not_null())
                    .col(
                        ColumnDef::new(Products::RequestId)
                            .string()
                            .null()
                            .unique_key(),
                    )
                    .col(ColumnDef::new(Products::RequestHash).string().null())
                    .col(
                        ColumnDef::new(Products::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Products::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .check(Expr::col(Products::Stock).gte(0))
                    .check(Expr::col(Products::PriceUnits).gte(0))
                    .to_owned(),
            )
            .await?;
        // ListProducts ordered by price (either way), keyset on (price, id); create_time order
        // is the primary key (UUIDv7). The in-stock filter rides on the stock index.
        manager
            .create_index(
                Index::create()
                    .name("catalog_products_price")
                    .table(Products::Table)
                    .col(Products::PriceUnits)
                    .col(Products::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("catalog_products_stock")
                    .table(Products::Table)
                    .col(Products::Stock)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Reservations::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Reservations::ReservationId)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Reservations::State).string().not_null())
                    .col(
                        ColumnDef::new(Reservations::RequestHash)
                            .string()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Reservations::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Reservations::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ReservationLines::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(ReservationLines::ReservationId)
                            .string()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReservationLines::Position)
                            .integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReservationLines::ProductId)
                            .uuid()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReservationLines::Quantity)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReservationLines::UnitPriceUnits)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReservationLines::CurrencyCode)
                            .string_len(3)
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(ReservationLines::ReservationId)
                            .col(ReservationLines::Position),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(ReservationLines::Table, ReservationLines::ReservationId)
                            .to(Reservations::Table, Reservations::ReservationId)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }
}

/// Every product gets a version, bumped by every change (a reservation's stock included): its
/// etag, against which an admin sets the stock.
struct ProductVersions;

impl MigrationName for ProductVersions {
    fn name(&self) -> &str {
        "m0002_product_versions"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ProductVersions {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Products::Table)
                    .add_column(
                        ColumnDef::new(Products::Version)
                            .big_integer()
                            .not_null()
                            .default(1),
                    )
                    .to_owned(),
            )
            .await
    }
}
