//! identity's tables as sea-orm entities.

/// `identity_users`: one row per user.
pub mod user {
    use sea_orm::entity::prelude::*;

    /// A user row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "identity_users")]
    pub struct Model {
        /// UUIDv7.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        /// Lower-case e-mail, unique.
        #[sea_orm(unique)]
        pub email: String,
        /// Name shown to others.
        pub display_name: String,
        /// argon2id PHC string.
        pub password_hash: String,
        /// `user` or `admin`.
        pub role: String,
        /// Registration time.
        pub created_at: DateTimeUtc,
        /// Last change.
        pub updated_at: DateTimeUtc,
        /// The generation access tokens are signed at; moving it on revokes the older ones.
        pub token_generation: i64,
        /// When the address was confirmed with its mailed code; `None` until then.
        pub email_confirmed_at: Option<DateTimeUtc>,
    }

    /// No relations are navigated through sea-orm.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `identity_refresh_tokens`: one row per issued refresh token, stored as a SHA-256 hash.
pub mod refresh_token {
    use sea_orm::entity::prelude::*;

    /// A refresh token row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "identity_refresh_tokens")]
    pub struct Model {
        /// UUIDv7.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        /// Every token rotated from one sign-in shares a family.
        pub family_id: Uuid,
        /// The owner.
        pub user_id: Uuid,
        /// Hex SHA-256 of the token; the token itself is never stored.
        #[sea_orm(unique)]
        pub token_hash: String,
        /// Issue time.
        pub created_at: DateTimeUtc,
        /// After this the token is refused.
        pub expires_at: DateTimeUtc,
        /// When it was exchanged for a new pair; a second use revokes the family.
        pub used_at: Option<DateTimeUtc>,
        /// When its family was revoked (logout, reuse, user deleted).
        pub revoked_at: Option<DateTimeUtc>,
    }

    /// No relations are navigated through sea-orm.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `identity_email_claims`: an address a user asked for, until they confirm it with the code
/// mailed there.
pub mod email_claim {
    use sea_orm::entity::prelude::*;

    /// A pending claim on an address.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "identity_email_claims")]
    pub struct Model {
        /// The claimant; one claim per user, a new one replaces it.
        #[sea_orm(primary_key, auto_increment = false)]
        pub user_id: Uuid,
        /// Lower-case address the code was mailed to.
        pub email: String,
        /// Hex SHA-256 of the code.
        #[sea_orm(unique)]
        pub code_hash: String,
        /// After this the code is refused.
        pub expires_at: DateTimeUtc,
    }

    /// No relations are navigated through sea-orm.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
