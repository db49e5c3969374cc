//! orders' tables as sea-orm entities.

/// `orders_orders`: one row per order.
pub mod order {
    use sea_orm::entity::prelude::*;

    /// An order row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "orders_orders")]
    pub struct Model {
        /// UUIDv7: placement order.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        /// The buyer.
        pub user_id: Uuid,
        /// PENDING, CONFIRMED, REJECTED, CANCELLED.
        pub state: String,
        /// Where the saga is: reserve, charge, commit, reject, cancel, done.
        pub stage: String,
        /// Why it was rejected; empty otherwise.
        pub rejection_reason: String,
        /// The currency of every line.
        pub currency_code: String,
        /// Sum of the lines, minor units.
        pub total_units: i64,
        /// Where the confirmation goes (the buyer's e-mail when the order was placed).
        pub buyer_email: String,
        /// The AIP-155 request id it was placed under.
        pub request_id: String,
        /// Fingerprint of the placing request.
        pub request_hash: String,
        /// Bumped by every change, for watchers.
        pub version: i64,
        /// Placement time.
        pub created_at: DateTimeUtc,
        /// Last change.
        pub updated_at: DateTimeUtc,
    }

    /// Its lines, read with it in one statement where the history is not wanted.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        /// The order's lines.
        #[sea_orm(has_many = "super::line::Entity")]
        Lines,
    }

    impl Related<super::line::Entity> for Entity {
        fn to() -> RelationDef {
            Relation::Lines.def()
        }
    }

    impl ActiveModelBehavior for ActiveModel {}
}

/// `orders_lines`: the lines of an order, in request order.
pub mod line {
    use sea_orm::entity::prelude::*;

    /// A line row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "orders_lines")]
    pub struct Model {
        /// The order.
        #[sea_orm(primary_key, auto_increment = false)]
        pub order_id: Uuid,
        /// Its place in the order.
        #[sea_orm(primary_key, auto_increment = false)]
        pub position: i32,
        /// The product.
        pub product_id: Uuid,
        /// Units.
        pub quantity: i64,
        /// Price of one unit when the order was placed.
        pub unit_price_units: i64,
        /// Its currency.
        pub currency_code: String,
        /// The product's title when the order was placed (empty for orders placed before
        /// titles were kept).
        pub title: String,
    }

    /// The order a line belongs to.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        /// Its order.
        #[sea_orm(
            belongs_to = "super::order::Entity",
            from = "Column::OrderId",
            to = "super::order::Column::Id"
        )]
        Order,
    }

    impl Related<super::order::Entity> for Entity {
        fn to() -> RelationDef {
            Relation::Order.def()
        }
    }

    impl ActiveModelBehavior for ActiveModel {}
}

/// `orders_history`: the saga's steps of an order.
pub mod step {
    use sea_orm::entity::prelude::*;

    /// A step row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "orders_history")]
    pub struct Model {
        /// The order.
        #[sea_orm(primary_key, auto_increment = false)]
        pub order_id: Uuid,
        /// 1, 2, …
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i32,
        /// What was done (the proto's Action name).
        pub action: String,
        /// DONE or REFUSED.
        pub outcome: String,
        /// Why it was refused, or what it undid.
        pub detail: String,
        /// Whether it undid an earlier step.
        pub compensation: bool,
        /// When it ended.
        pub created_at: DateTimeUtc,
    }

    /// No relations are navigated through sea-orm.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
