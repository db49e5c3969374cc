//! PaymentService (a user's wallet and ledger) and the internal LedgerService (charges and
//! refunds for orders).

use keel_auth::Caller;
use keel_pagetoken::PageRequest;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::entity::{transaction, wallet};
use super::error::PaymentError;
use super::ledger::{CHARGE, Ledger, Movement, REFUND, TOP_UP};
use crate::input::{self, Amount, FieldError, Sign};
use crate::principal::{self, AccessError, Reach};
use crate::proto::keel::payments::v1::ledger_service_server::LedgerService as LedgerApi;
use crate::proto::keel::payments::v1::payment_service_server::PaymentService as PaymentApi;
use crate::proto::keel::payments::v1::{
    ChargeRequest, ChargeResponse, GetWalletRequest, ListTransactionsRequest,
    ListTransactionsResponse, RefundRequest, RefundResponse, TopUpWalletRequest,
    TopUpWalletResponse, Transaction, Wallet, transaction::Kind,
};
use crate::proto::keel::r#type::v1::Money;

const MAX_KEY_CHARS: usize = 200;

/// Wallets and the ledger.
#[derive(Debug, Clone)]
pub struct PaymentService {
    ledger: Ledger,
    owners_top_up: bool,
}

impl PaymentService {
    /// The service over `ledger`; `owners_top_up` lets owners top up their own wallet
    /// (development mode), otherwise only admins do.
    pub fn new(ledger: Ledger, owners_top_up: bool) -> Self {
        Self {
            ledger,
            owners_top_up,
        }
    }

    async fn get_wallet(
        &self,
        caller: &Caller,
        r: GetWalletRequest,
    ) -> Result<Wallet, PaymentError> {
        let owner = wallet_owner(&r.name, "name", caller)?;
        Ok(wallet_proto(
            &self
                .ledger
                .wallet(principal::may_reach(owner, caller, Reach::OwnerOrAdmin)?)
                .await?,
        ))
    }

    async fn top_up(
        &self,
        caller: &Caller,
        r: TopUpWalletRequest,
    ) -> Result<TopUpWalletResponse, PaymentError> {
        let owner = wallet_owner(&r.name, "name", caller)?;
        // Development lets owners fund their own wallet; otherwise only admins move money in.
        if self.owners_top_up {
            principal::may_reach(owner, caller, Reach::OwnerOrAdmin)?;
        } else {
            principal::require_admin(caller, "only admins top up wallets")?;
        }
        let amount = input::money(r.amount.as_ref(), "amount", Sign::Positive)?;
        let request_id = input::request_id(&r.request_id)?
            .ok_or_else(|| FieldError::new("request_id", "required"))?;
        let canonical = TopUpWalletRequest {
            name: wallet_name(owner),
            amount: r.amount.clone(),
            request_id: request_id.clone(),
        };
        let entry = self
            .ledger
            .apply(Movement {
                user_id: owner,
                kind: TOP_UP,
                amount,
                idempotency_key: format!("top_up:{owner}:{request_id}"),
                request_hash: input::fingerprint(&canonical),
                reference: String::new(),
            })
            .await?;
        if principal::caller_id(caller).ok() != Some(owner) {
            // An admin's top-up of another's wallet: the owner reads it at once too.
            self.ledger.show_owner(owner).await;
        }
        Ok(TopUpWalletResponse {
            wallet: Some(wallet_proto(&self.ledger.wallet(owner).await?)),
            transaction: Some(transaction_proto(&entry)),
        })
    }

    async fn list(
        &self,
        caller: &Caller,
        r: ListTransactionsRequest,
    ) -> Result<ListTransactionsResponse, PaymentError> {
        let owner = principal::may_reach(
            wallet_owner(&r.parent, "parent", caller)?,
            caller,
            Reach::OwnerOrAdmin,
        )?;
        let page = PageRequest::new(r.page_size, &r.page_token, owner.to_string())?;
        let rows = self
            .ledger
            .entries(owner, page.after(), page.fetch())
            .await?;
        let (rows, next_page_token) = page.finish(rows, |last| last.id);
        Ok(ListTransactionsResponse {
            transactions: rows.iter().map(transaction_proto).collect(),
            next_page_token,
        })
    }

    async fn charge(&self, caller: &Caller, r: ChargeRequest) -> Result<Transaction, PaymentError> {
        principal::require_service(caller)?;
        let payment_id = input::text(&r.payment_id, "payment_id", 1, MAX_KEY_CHARS, false)?;
        let amount = input::money(r.amount.as_ref(), "amount", Sign::Positive)?;
        let owner = wallet_owner(&r.wallet, "wallet", caller)?;
        let canonical = ChargeRequest {
            wallet: wallet_name(owner),
            payment_id: payment_id.clone(),
            ..r.clone()
        };
        let entry = self
            .ledger
            .charge(
                &payment_id,
                Movement {
                    user_id: owner,
                    kind: CHARGE,
                    amount: Amount {
                        units: -amount.units,
                        ..amount
                    },
                    idempotency_key: format!("charge:{payment_id}"),
                    request_hash: input::fingerprint(&canonical),
                    reference: r.reference,
                },
            )
            .await?;
        self.ledger.show_owner(owner).await;
        Ok(transaction_proto(&entry))
    }

    async fn refund(&self, caller: &Caller, r: RefundRequest) -> Result<Transaction, PaymentError> {
        principal::require_service(caller)?;
        let payment_id = input::text(&r.payment_id, "payment_id", 1, MAX_KEY_CHARS, false)?;
        let hash = input::fingerprint(&RefundRequest {
            payment_id: payment_id.clone(),
        });
        // Closed to charges either way; nothing to give back when nothing was charged.
        let entry = self
            .ledger
            .refund(&payment_id, hash)
            .await?
            .ok_or(PaymentError::PaymentNotFound(payment_id))?;
        self.ledger.show_owner(entry.user_id).await;
        Ok(transaction_proto(&entry))
    }
}

/// The owner of `users/{user}/wallet` (`me` allowed), without an access check.
fn wallet_owner(name: &str, field: &'static str, caller: &Caller) -> Result<Uuid, PaymentError> {
    match crate::names::captures(name, &["users", "*", "wallet"]).as_deref() {
        Some([user]) => Ok(principal::user_id(user, caller, field)?),
        _ => Err(AccessError::MalformedName { field }.into()),
    }
}

fn wallet_name(owner: Uuid) -> String {
    format!("{}/wallet", principal::user_name(owner))
}

fn wallet_proto(w: &wallet::Model) -> Wallet {
    Wallet {
        name: wallet_name(w.user_id),
        balance: Some(Money {
            currency_code: w.currency_code.clone(),
            units: w.balance_units,
        }),
        update_time: Some(crate::proto::timestamp(w.updated_at)),
    }
}

fn transaction_proto(t: &transaction::Model) -> Transaction {
    let kind = match t.kind.as_str() {
        TOP_UP => Kind::TopUp,
        CHARGE => Kind::Charge,
        REFUND => Kind::Refund,
        _ => Kind::Unspecified,
    };
    Transaction {
        name: format!("{}/transactions/{}", wallet_name(t.user_id), t.id),
        kind: kind as i32,
        amount: Some(Money {
            currency_code: t.currency_code.clone(),
            units: t.amount_units,
        }),
        idempotency_key: t.idempotency_key.clone(),
        reference: t.reference.clone(),
        create_time: Some(crate::proto::timestamp(t.created_at)),
    }
}

#[tonic::async_trait]
impl PaymentApi for PaymentService {
    async fn get_wallet(
        &self,
        request: Request<GetWalletRequest>,
    ) -> Result<Response<Wallet>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            Self::get_wallet(self, &caller, request.into_inner()).await?,
        ))
    }

    async fn top_up_wallet(
        &self,
        request: Request<TopUpWalletRequest>,
    ) -> Result<Response<TopUpWalletResponse>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            self.top_up(&caller, request.into_inner()).await?,
        ))
    }

    async fn list_transactions(
        &self,
        request: Request<ListTransactionsRequest>,
    ) -> Result<Response<ListTransactionsResponse>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            self.list(&caller, request.into_inner()).await?,
        ))
    }
}

#[tonic::async_trait]
impl LedgerApi for PaymentService {
    async fn charge(
        &self,
        request: Request<ChargeRequest>,
    ) -> Result<Response<ChargeResponse>, Status> {
        let caller = principal::caller(&request)?;
        let transaction = Self::charge(self, &caller, request.into_inner()).await?;
        Ok(Response::new(ChargeResponse {
            transaction: Some(transaction),
        }))
    }

    async fn refund(
        &self,
        request: Request<RefundRequest>,
    ) -> Result<Response<RefundResponse>, Status> {
        let caller = principal::caller(&request)?;
        let transaction = Self::refund(self, &caller, request.into_inner()).await?;
        Ok(Response::new(RefundResponse {
            transaction: Some(transaction),
        }))
    }
}
