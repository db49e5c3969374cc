//! identity's storage: users and refresh-token families, every multi-row change in one
//! transaction, every invariant held by a conditional write rather than read-then-write.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, ConnectionTrait as _, DatabaseConnection,
    EntityTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _, Set,
    TransactionTrait as _,
};
use uuid::Uuid;

use super::entity::{email_claim, refresh_token, user};
use super::error::IdentityError;

/// A user to create.
#[derive(Debug)]
pub struct NewUser {
    /// Lower-case e-mail.
    pub email: String,
    /// Name shown to others.
    pub display_name: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Whether the user starts as an admin (a listed e-mail, in development).
    pub listed_admin: bool,
    /// Whether the first user ever becomes an admin (development only).
    pub first_is_admin: bool,
}

/// A code mailed to an address a user claims, until they confirm it.
#[derive(Debug)]
pub struct NewClaim {
    /// Hex SHA-256 of the code; the code itself is only in the e-mail.
    pub code_hash: String,
    /// When the code stops working.
    pub expires_at: DateTime<Utc>,
}

/// A refresh token to store.
#[derive(Debug)]
pub struct NewRefreshToken {
    /// Hex SHA-256 of the token.
    pub hash: String,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
}

/// Changes to a user; `None` leaves a field alone. (A new e-mail is a claim, confirmed by its
/// code: [`Directory::claim_email`].)
#[derive(Debug, Default)]
pub struct UserChanges {
    /// New display name.
    pub display_name: Option<String>,
    /// New role.
    pub role: Option<String>,
}

/// What presenting a refresh token did.
#[derive(Debug)]
pub enum Rotation {
    /// The token was spent and a new one of the same family stored.
    Rotated {
        /// The owner.
        user_id: Uuid,
    },
    /// The token had been spent before: its whole family is now revoked, and the user's access
    /// tokens with it.
    Reused {
        /// The owner.
        user_id: Uuid,
    },
    /// Unknown, expired or revoked.
    Invalid,
}

/// Users and their refresh tokens.
#[derive(Debug, Clone)]
pub struct Directory {
    db: DatabaseConnection,
}

use crate::store::is_unique_violation as unique_violation;

impl Directory {
    /// Users and tokens in `db`.
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// Creates a user, their first refresh token, a claim on their address and their welcome
    /// e-mail (a job, `welcome` with the claim's code) together. The first user ever (where
    /// `first_is_admin`) or a `listed_admin` becomes an admin.
    pub async fn register(
        &self,
        new: NewUser,
        token: NewRefreshToken,
        claim: NewClaim,
        welcome: crate::mail::Email,
    ) -> Result<user::Model, IdentityError> {
        let txn = self.db.begin().await?;
        // Exactly one registration can insert row 1: that one is the first user. A failed
        // registration rolls the claim back with everything else.
        let first_row = txn
            .execute_unprepared(
                "INSERT INTO identity_first_admin (id) VALUES (1) ON CONFLICT DO NOTHING",
            )
            .await?;
        let first = first_row.rows_affected() == 1 && new.first_is_admin;
        let now = Utc::now();
        let role = if first || new.listed_admin {
            crate::principal::ADMIN_ROLE
        } else {
            crate::principal::USER_ROLE
        };
        let created = user::ActiveModel {
            id: Set(Uuid::now_v7()),
            email: Set(new.email),
            display_name: Set(new.display_name),
            password_hash: Set(new.password_hash),
            role: Set(role.to_owned()),
            created_at: Set(now),
            updated_at: Set(now),
            token_generation: Set(0),
            email_confirmed_at: Set(None),
        }
        .insert(&txn)
        .await
        .map_err(|e| {
            if unique_violation(&e) {
                IdentityError::EmailTaken
            } else {
                e.into()
            }
        })?;
        insert_token(&txn, created.id, Uuid::now_v7(), token).await?;
        insert_claim(&txn, created.id, &created.email, claim).await?;
        let user = crate::principal::user_name(created.id);
        mail(&txn, &welcome, Some(format!("welcome:{user}"))).await?;
        txn.commit().await?;
        Ok(created)
    }

    /// Replaces user `id`'s pending claim with one on `email` and mails `letter` (which carries
    /// the claim's code) there, together.
    pub async fn claim_email(
        &self,
        id: Uuid,
        email: &str,
        claim: NewClaim,
        letter: crate::mail::Email,
    ) -> Result<(), IdentityError> {
        let txn = self.db.begin().await?;
        email_claim::Entity::delete_by_id(id).exec(&txn).await?;
        if user::Entity::find_by_id(id).one(&txn).await?.is_none() {
            return Err(IdentityError::UserNotFound);
        }
        insert_claim(&txn, id, email, claim).await?;
        mail(&txn, &letter, None).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Spends user `id`'s claim whose code hashes to `code_hash`: the address becomes theirs,
    /// confirmed, and an admin's when `admin_emails` lists it. Refused when the code is not their live one,
    /// or the address was taken meanwhile (the claim stays, for after it is freed).
    pub async fn confirm_email(
        &self,
        id: Uuid,
        code_hash: &str,
        admin_emails: &[String],
    ) -> Result<user::Model, IdentityError> {
        let txn = self.db.begin().await?;
        // Spend first, with a condition: of two confirmations with one code, one wins.
        let claim = email_claim::Entity::delete_many()
            .filter(email_claim::Column::UserId.eq(id))
            .filter(email_claim::Column::CodeHash.eq(code_hash))
            .filter(email_claim::Column::ExpiresAt.gt(Utc::now()))
            .exec_with_returning(&txn)
            .await?
            .pop()
            .ok_or(IdentityError::BadEmailCode)?;
        let before = user::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or(IdentityError::UserNotFound)?;
        let mut update = user::Entity::update_many()
            .col_expr(user::Column::Email, Expr::value(claim.email.clone()))
            .col_expr(user::Column::EmailConfirmedAt, Expr::value(Utc::now()))
            .col_expr(user::Column::UpdatedAt, Expr::value(Utc::now()))
            .filter(user::Column::Id.eq(id));
        // A listed address makes its owner an admin on their first confirmation only: an admin
        // who demotes them is not undone by a code spent later.
        if admin_emails.contains(&claim.email) && before.email_confirmed_at.is_none() {
            update = update
                .col_expr(
                    user::Column::Role,
                    Expr::value(crate::principal::ADMIN_ROLE),
                )
                .col_expr(user::Column::TokenGeneration, next_generation());
        }
        update.exec(&txn).await.map_err(|e| {
            if unique_violation(&e) {
                IdentityError::EmailTaken
            } else {
                e.into()
            }
        })?;
        let confirmed = user::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or(IdentityError::UserNotFound)?;
        txn.commit().await?;
        Ok(confirmed)
    }

    /// Makes the user with `email` (lower case) an admin: the operator's way to name one.
    /// `None` when no user has that address.
    pub async fn grant_admin(&self, email: &str) -> Result<Option<user::Model>, IdentityError> {
        let granted = user::Entity::update_many()
            .col_expr(
                user::Column::Role,
                Expr::value(crate::principal::ADMIN_ROLE),
            )
            .col_expr(user::Column::UpdatedAt, Expr::value(Utc::now()))
            .col_expr(user::Column::TokenGeneration, next_generation())
            .filter(user::Column::Email.eq(email))
            .exec(&self.db)
            .await?;
        if granted.rows_affected == 0 {
            return Ok(None);
        }
        self.find_by_email(email).await
    }

    /// The user with `email` (lower case), if any.
    pub async fn find_by_email(&self, email: &str) -> Result<Option<user::Model>, IdentityError> {
        Ok(user::Entity::find()
            .filter(user::Column::Email.eq(email))
            .one(&self.db)
            .await?)
    }

    /// The user with `id`, if any.
    pub async fn find(&self, id: Uuid) -> Result<Option<user::Model>, sea_orm::DbErr> {
        user::Entity::find_by_id(id).one(&self.db).await
    }

    /// Up to `limit` users after `after`, in id (= registration) order.
    pub async fn list(
        &self,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<user::Model>, IdentityError> {
        let mut query = user::Entity::find()
            .order_by_asc(user::Column::Id)
            .limit(limit);
        if let Some(after) = after {
            query = query.filter(user::Column::Id.gt(after));
        }
        Ok(query.all(&self.db).await?)
    }

    /// Applies `changes` to user `id` and returns the result.
    pub async fn update(
        &self,
        id: Uuid,
        changes: UserChanges,
    ) -> Result<user::Model, IdentityError> {
        let txn = self.db.begin().await?;
        let mut update = user::Entity::update_many()
            .col_expr(user::Column::UpdatedAt, Expr::value(Utc::now()))
            .filter(user::Column::Id.eq(id));
        if let Some(name) = changes.display_name {
            update = update.col_expr(user::Column::DisplayName, Expr::value(name));
        }
        if let Some(role) = changes.role {
            update = update
                .col_expr(user::Column::Role, Expr::value(role))
                .col_expr(user::Column::TokenGeneration, next_generation());
        }
        let result = update.exec(&txn).await?;
        if result.rows_affected == 0 {
            return Err(IdentityError::UserNotFound);
        }
        let updated = user::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or(IdentityError::UserNotFound)?;
        txn.commit().await?;
        Ok(updated)
    }

    /// Deletes user `id` and, by cascade, their refresh tokens. False if there was no such user.
    pub async fn delete(&self, id: Uuid) -> Result<bool, IdentityError> {
        let txn = self.db.begin().await?;
        refresh_token::Entity::delete_many()
            .filter(refresh_token::Column::UserId.eq(id))
            .exec(&txn)
            .await?;
        email_claim::Entity::delete_by_id(id).exec(&txn).await?;
        let deleted = user::Entity::delete_by_id(id).exec(&txn).await?;
        txn.commit().await?;
        Ok(deleted.rows_affected == 1)
    }

    /// Stores the first refresh token of a new family (a login).
    pub async fn start_family(
        &self,
        user_id: Uuid,
        token: NewRefreshToken,
    ) -> Result<(), IdentityError> {
        insert_token(&self.db, user_id, Uuid::now_v7(), token).await
    }

    /// Spends the token with hash `presented` and stores `next` in its family. A token spent
    /// before revokes its family; an unknown, expired or revoked one changes nothing.
    pub async fn rotate(
        &self,
        presented: &str,
        next: NewRefreshToken,
    ) -> Result<Rotation, IdentityError> {
        let now = Utc::now();
        let txn = self.db.begin().await?;
        // Spend first, with a condition: of two concurrent refreshes with one token, one wins.
        let spent = refresh_token::Entity::update_many()
            .col_expr(refresh_token::Column::UsedAt, Expr::value(now))
            .filter(refresh_token::Column::TokenHash.eq(presented))
            .filter(refresh_token::Column::UsedAt.is_null())
            .filter(refresh_token::Column::RevokedAt.is_null())
            .filter(refresh_token::Column::ExpiresAt.gt(now))
            .exec(&txn)
            .await?;
        let row = refresh_token::Entity::find()
            .filter(refresh_token::Column::TokenHash.eq(presented))
            .one(&txn)
            .await?;
        let rotation = match row {
            Some(row) if spent.rows_affected == 1 => {
                insert_token(&txn, row.user_id, row.family_id, next).await?;
                Rotation::Rotated {
                    user_id: row.user_id,
                }
            }
            Some(row) if row.used_at.is_some() && row.revoked_at.is_none() => {
                // A thief or the owner refreshed first: end the family and every access token
                // of the user, the one minted from the stolen token included.
                revoke_family(&txn, row.family_id, now).await?;
                user::Entity::update_many()
                    .col_expr(user::Column::TokenGeneration, next_generation())
                    .filter(user::Column::Id.eq(row.user_id))
                    .exec(&txn)
                    .await?;
                Rotation::Reused {
                    user_id: row.user_id,
                }
            }
            _ => Rotation::Invalid,
        };
        txn.commit().await?;
        Ok(rotation)
    }

    /// The generation user `id`'s access tokens must carry; `None` when there is no such user.
    pub async fn generation(&self, id: Uuid) -> Result<Option<u64>, sea_orm::DbErr> {
        // The one column: every process reads it, none needs the rest of the row.
        let found: Option<i64> = user::Entity::find_by_id(id)
            .select_only()
            .column(user::Column::TokenGeneration)
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok(found.map(|g| u64::try_from(g).unwrap_or(u64::MAX)))
    }

    /// Signs the owner of the token with hash `presented` out: its family is revoked and every
    /// access token of theirs with it (their other sessions refresh). The owner, if any.
    /// A spent, revoked or expired token revokes what is left of its family and nothing else:
    /// an old token found somewhere cannot sign its owner out again and again.
    pub async fn sign_out(&self, presented: &str) -> Result<Option<Uuid>, IdentityError> {
        let owner = refresh_token::Entity::find()
            .filter(refresh_token::Column::TokenHash.eq(presented))
            .filter(refresh_token::Column::UsedAt.is_null())
            .filter(refresh_token::Column::RevokedAt.is_null())
            .filter(refresh_token::Column::ExpiresAt.gt(Utc::now()))
            .one(&self.db)
            .await?
            .map(|t| t.user_id);
        self.revoke_family_of(presented).await?;
        if let Some(owner) = owner {
            user::Entity::update_many()
                .col_expr(user::Column::TokenGeneration, next_generation())
                .filter(user::Column::Id.eq(owner))
                .exec(&self.db)
                .await?;
        }
        Ok(owner)
    }

    /// Revokes the family of the token with hash `presented`, if it exists.
    pub async fn revoke_family_of(&self, presented: &str) -> Result<(), IdentityError> {
        // One statement that writes: a transaction that read first would fail on SQLite when
        // another writer committed in between, instead of waiting its turn.
        let family = sea_orm::sea_query::Query::select()
            .column(refresh_token::Column::FamilyId)
            .from(refresh_token::Entity)
            .and_where(refresh_token::Column::TokenHash.eq(presented))
            .to_owned();
        refresh_token::Entity::update_many()
            .col_expr(refresh_token::Column::RevokedAt, Expr::value(Utc::now()))
            .filter(refresh_token::Column::FamilyId.in_subquery(family))
            .filter(refresh_token::Column::RevokedAt.is_null())
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// The token row with hash `presented`, for tests and diagnostics.
    pub async fn token(
        &self,
        presented: &str,
    ) -> Result<Option<refresh_token::Model>, IdentityError> {
        Ok(refresh_token::Entity::find()
            .filter(refresh_token::Column::TokenHash.eq(presented))
            .one(&self.db)
            .await?)
    }
}

async fn insert_claim(
    db: &impl sea_orm::ConnectionTrait,
    user_id: Uuid,
    email: &str,
    claim: NewClaim,
) -> Result<(), IdentityError> {
    email_claim::ActiveModel {
        user_id: Set(user_id),
        email: Set(email.to_owned()),
        code_hash: Set(claim.code_hash),
        expires_at: Set(claim.expires_at),
    }
    .insert(db)
    .await?;
    Ok(())
}

/// Queues `letter` in the caller's transaction, made by identity itself: a letter carrying a
/// code is no job its addressee may read through JobService.
async fn mail(
    db: &impl sea_orm::ConnectionTrait,
    letter: &crate::mail::Email,
    unique_key: Option<String>,
) -> Result<(), IdentityError> {
    keel_queue::enqueue(db, letter.job(crate::principal::IDENTITY, unique_key))
        .await
        .map_err(|e| IdentityError::Internal(e.into()))?;
    Ok(())
}

async fn insert_token(
    db: &impl sea_orm::ConnectionTrait,
    user_id: Uuid,
    family_id: Uuid,
    token: NewRefreshToken,
) -> Result<(), IdentityError> {
    refresh_token::ActiveModel {
        id: Set(Uuid::now_v7()),
        family_id: Set(family_id),
        user_id: Set(user_id),
        token_hash: Set(token.hash),
        created_at: Set(Utc::now()),
        expires_at: Set(token.expires_at),
        used_at: Set(None),
        revoked_at: Set(None),
    }
    .insert(db)
    .await?;
    Ok(())
}

/// A user's token generation, moved on: every access token signed before is revoked.
fn next_generation() -> Expr {
    Expr::col(user::Column::TokenGeneration).add(1)
}

async fn revoke_family(
    db: &impl sea_orm::ConnectionTrait,
    family_id: Uuid,
    now: DateTime<Utc>,
) -> Result<(), IdentityError> {
    refresh_token::Entity::update_many()
        .col_expr(refresh_token::Column::RevokedAt, Expr::value(now))
        .filter(refresh_token::Column::FamilyId.eq(family_id))
        .filter(refresh_token::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(())
}
