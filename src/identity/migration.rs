//! identity's schema, tracked in its own `identity_migrations` table.

use sea_orm_migration::prelude::*;

crate::migrator!(
    "identity",
    [CreateUsersAndTokens, CreateEmailClaims, AddTokenGeneration]
);

#[derive(DeriveIden)]
enum Users {
    #[sea_orm(iden = "identity_users")]
    Table,
    Id,
    Email,
    DisplayName,
    PasswordHash,
    Role,
    CreatedAt,
    UpdatedAt,
    TokenGeneration,
    EmailConfirmedAt,
}

#[derive(DeriveIden)]
enum RefreshTokens {
    #[sea_orm(iden = "identity_refresh_tokens")]
    Table,
    Id,
    FamilyId,
    UserId,
    TokenHash,
    CreatedAt,
    ExpiresAt,
    UsedAt,
    RevokedAt,
}

/// One row, id 1, inserted by the first registration: whoever inserts it is the first admin.
#[derive(DeriveIden)]
enum FirstAdmin {
    #[sea_orm(iden = "identity_first_admin")]
    Table,
    Id,
}

struct CreateUsersAndTokens;

impl MigrationName for CreateUsersAndTokens {
    fn name(&self) -> &str {
        "m0001_create_users_and_tokens"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateUsersAndTokens {
    #[allow(
        clippy::too_many_lines,
        reason = "the schema, one statement per table and index, read top to bottom"
    )]
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Users::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Users::Id).uuid().not_null().primary_key())
                    .col(
                        ColumnDef::new(Users::Email)
                            .string()
                            .not_null()
                            .unique_key(),
                    )
                    .col(ColumnDef::new(Users::DisplayName).string().not_null())
                    .col(ColumnDef::new(Users::PasswordHash).string().not_null())
                    .col(ColumnDef::new(Users::Role).string().not_null())
                    .col(
                        ColumnDef::new(Users::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Users::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RefreshTokens::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(RefreshTokens::Id)
                            .uuid()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(RefreshTokens::FamilyId).uuid().not_null())
                    .col(ColumnDef::new(RefreshTokens::UserId).uuid().not_null())
                    .col(
                        ColumnDef::new(RefreshTokens::TokenHash)
                            .string()
                            .not_null()
                            .unique_key(),
                    )
                    .col(
                        ColumnDef::new(RefreshTokens::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(RefreshTokens::ExpiresAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(RefreshTokens::UsedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(RefreshTokens::RevokedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(RefreshTokens::Table, RefreshTokens::UserId)
                            .to(Users::Table, Users::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // Revoking a family and deleting a user's tokens are the two other query paths.
        manager
            .create_index(
                Index::create()
                    .name("identity_refresh_tokens_family")
                    .table(RefreshTokens::Table)
                    .col(RefreshTokens::FamilyId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("identity_refresh_tokens_user")
                    .table(RefreshTokens::Table)
                    .col(RefreshTokens::UserId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(FirstAdmin::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(FirstAdmin::Id)
                            .integer()
                            .not_null()
                            .primary_key(),
                    )
                    .to_owned(),
            )
            .await
    }
}

/// An address a user asked for and has not confirmed yet: at most one per user, the code it was
/// mailed stored only as a hash.
#[derive(DeriveIden)]
enum EmailClaims {
    #[sea_orm(iden = "identity_email_claims")]
    Table,
    UserId,
    Email,
    CodeHash,
    ExpiresAt,
}

struct CreateEmailClaims;

impl MigrationName for CreateEmailClaims {
    fn name(&self) -> &str {
        "m0002_create_email_claims"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateEmailClaims {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(EmailClaims::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(EmailClaims::UserId)
                            .uuid()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(EmailClaims::Email).string().not_null())
                    .col(
                        ColumnDef::new(EmailClaims::CodeHash)
                            .string()
                            .not_null()
                            .unique_key(),
                    )
                    .col(
                        ColumnDef::new(EmailClaims::ExpiresAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(EmailClaims::Table, EmailClaims::UserId)
                            .to(Users::Table, Users::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }
}

/// The generation of a user's access tokens (moved on to revoke every token signed before), and
/// when the user's address was confirmed with its mailed code.
struct AddTokenGeneration;

impl MigrationName for AddTokenGeneration {
    fn name(&self) -> &str {
        "m0003_add_token_generation"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for AddTokenGeneration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Users::Table)
                    .add_column(
                        ColumnDef::new(Users::TokenGeneration)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .to_owned(),
            )
            .await?;
        // One column per statement: SQLite alters one at a time.
        manager
            .alter_table(
                Table::alter()
                    .table(Users::Table)
                    .add_column(
                        ColumnDef::new(Users::EmailConfirmedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .to_owned(),
            )
            .await
    }
}
