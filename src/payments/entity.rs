//! payments' tables as sea-orm entities.

/// `payments_wallets`: one balance per user, always the sum of their ledger.
pub mod wallet {
    use sea_orm::entity::prelude::*;

    /// A wallet row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "payments_wallets")]
    pub struct Model {
        /// The owner.
        #[sea_orm(primary_key, auto_increment = false)]
        pub user_id: Uuid,
        /// Balance in minor units; never negative.
        pub balance_units: i64,
        /// ISO 4217 code.
        pub currency_code: String,
        /// Last change of balance.
        pub updated_at: DateTimeUtc,
    }

    /// No relations are navigated through sea-orm.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `payments_transactions`: the append-only ledger.
pub mod transaction {
    use sea_orm::entity::prelude::*;

    /// A ledger row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "payments_transactions")]
    pub struct Model {
        /// UUIDv7: ledger order.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        /// The wallet's owner.
        pub user_id: Uuid,
        /// `TOP_UP`, `CHARGE` or `REFUND`.
        pub kind: String,
        /// Signed change of the balance, minor units.
        pub amount_units: i64,
        /// ISO 4217 code.
        pub currency_code: String,
        /// Unique: `top_up:{user}:{request_id}`, `charge:{payment_id}`, `refund:{payment_id}`.
        pub idempotency_key: String,
        /// Fingerprint of the request, to tell a retry from a reuse.
        pub request_hash: String,
        /// What it pays for.
        pub reference: String,
        /// When it was applied.
        pub created_at: DateTimeUtc,
    }

    /// No relations are navigated through sea-orm.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
