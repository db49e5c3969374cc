//! todos' table as a sea-orm entity.

/// `todos_todos`: one row per todo.
pub mod todo {
    use sea_orm::entity::prelude::*;

    /// A todo row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "todos_todos")]
    pub struct Model {
        /// UUIDv7: creation order.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        /// The owner.
        pub user_id: Uuid,
        /// What to do.
        pub title: String,
        /// Whether it is done.
        pub completed: bool,
        /// The AIP-155 request id it was created under, unique per owner.
        pub request_id: Option<String>,
        /// Fingerprint of the create request, to tell a retry from a reuse.
        pub request_hash: Option<String>,
        /// Creation time.
        pub created_at: DateTimeUtc,
        /// Last change.
        pub updated_at: DateTimeUtc,
    }

    /// No relations are navigated through sea-orm.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
