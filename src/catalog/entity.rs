//! catalog's tables as sea-orm entities.

/// `catalog_products`: one row per product.
pub mod product {
    use sea_orm::entity::prelude::*;

    /// A product row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "catalog_products")]
    pub struct Model {
        /// UUIDv7: creation order.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        /// Title.
        pub title: String,
        /// Description.
        pub description: String,
        /// Price in minor units.
        pub price_units: i64,
        /// ISO 4217 code of the price.
        pub currency_code: String,
        /// Units on the shelf; never negative.
        pub stock: i64,
        /// AIP-155 request id of the create, unique.
        pub request_id: Option<String>,
        /// Fingerprint of the create request.
        pub request_hash: Option<String>,
        /// Creation time.
        pub created_at: DateTimeUtc,
        /// Last change.
        pub updated_at: DateTimeUtc,
        /// Bumped by every change, a reservation's included: the product's etag.
        pub version: i64,
    }

    /// No relations are navigated through sea-orm.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `catalog_reservations`: stock held for one order.
pub mod reservation {
    use sea_orm::entity::prelude::*;

    /// A reservation row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "catalog_reservations")]
    pub struct Model {
        /// The caller's idempotency key (the order's name).
        #[sea_orm(primary_key, auto_increment = false)]
        pub reservation_id: String,
        /// `RESERVED`, `RELEASED` or `COMMITTED`.
        pub state: String,
        /// Fingerprint of the lines, to tell a retry from a reuse.
        pub request_hash: String,
        /// Creation time.
        pub created_at: DateTimeUtc,
        /// Last change of state.
        pub updated_at: DateTimeUtc,
    }

    /// No relations are navigated through sea-orm.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `catalog_reservation_lines`: what a reservation holds.
pub mod reservation_line {
    use sea_orm::entity::prelude::*;

    /// A line row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "catalog_reservation_lines")]
    pub struct Model {
        /// The reservation.
        #[sea_orm(primary_key, auto_increment = false)]
        pub reservation_id: String,
        /// Position in the request.
        #[sea_orm(primary_key, auto_increment = false)]
        pub position: i32,
        /// The product.
        pub product_id: Uuid,
        /// Units held.
        pub quantity: i64,
        /// Price of one unit when reserved, minor units.
        pub unit_price_units: i64,
        /// Its currency.
        pub currency_code: String,
    }

    /// No relations are navigated through sea-orm.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
