//! Wallets and the ledger on both store pairs: top-ups, charges and refunds applied once per
//! key, a balance that is the sum of the ledger and never goes below zero under any concurrency,
//! and owner-only access.

use crate::support;

use keel::proto::keel::payments::v1::{
    ChargeRequest, GetWalletRequest, ListTransactionsRequest, RefundRequest, TopUpWalletRequest,
    transaction::Kind,
};
use keel::proto::keel::r#type::v1::Money;
use support::{TestApp, at_once, authed, clients, eur, expect_code, violated_field};
use tonic::Code;

/// The internal service the saga charges through.
const LEDGER: &str = "keel.payments.v1.LedgerService";

fn top_up(name: &str, units: i64) -> TopUpWalletRequest {
    TopUpWalletRequest {
        name: name.into(),
        amount: eur(units),
        request_id: uuid::Uuid::new_v4().to_string(),
    }
}

fn charge(payment_id: &str, wallet: &str, units: i64) -> ChargeRequest {
    ChargeRequest {
        payment_id: payment_id.into(),
        wallet: wallet.into(),
        amount: eur(units),
        reference: "orders/1".into(),
    }
}

async fn wallet_of(app: &TestApp, token: &str) -> (String, i64) {
    let wallet = app
        .payments()
        .await
        .get_wallet(authed(
            GetWalletRequest {
                name: "users/me/wallet".into(),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    (wallet.name, wallet.balance.unwrap().units)
}

/// The balance equals the sum of the ledger.
async fn ledger_sum(app: &TestApp, token: &str) -> i64 {
    let mut sum = 0;
    let mut token_page = String::new();
    loop {
        let page = app
            .payments()
            .await
            .list_transactions(authed(
                ListTransactionsRequest {
                    parent: "users/me/wallet".into(),
                    page_size: 1000,
                    page_token: token_page,
                },
                token,
            ))
            .await
            .unwrap()
            .into_inner();
        sum += page
            .transactions
            .iter()
            .map(|t| t.amount.as_ref().unwrap().units)
            .sum::<i64>();
        if page.next_page_token.is_empty() {
            return sum;
        }
        token_page = page.next_page_token;
    }
}

async fn a_new_wallet_is_empty_and_top_ups_add_up(app: TestApp) {
    let people = app.people().await;
    let (name, balance) = wallet_of(&app, &people.ada).await;
    assert!(name.ends_with("/wallet"));
    assert_eq!(balance, 0);
    let mut payments = app.payments().await;
    // Development mode: the owner may top up; an admin may top up anyone.
    payments
        .top_up_wallet(authed(top_up("users/me/wallet", 1500), &people.ada))
        .await
        .unwrap();
    let topped = payments
        .top_up_wallet(authed(top_up(&name, 500), &people.admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(topped.wallet.unwrap().balance.unwrap().units, 2000);
    let entry = topped.transaction.unwrap();
    assert_eq!(
        (entry.kind, entry.amount.unwrap().units),
        (Kind::TopUp as i32, 500)
    );
    assert_eq!(ledger_sum(&app, &people.ada).await, 2000);
}

async fn a_repeated_top_up_is_applied_once(app: TestApp) {
    let people = app.people().await;
    let mut payments = app.payments().await;
    let request = top_up("users/me/wallet", 700);
    let first = payments
        .top_up_wallet(authed(request.clone(), &people.ada))
        .await
        .unwrap()
        .into_inner();
    let again = payments
        .top_up_wallet(authed(request.clone(), &people.ada))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.transaction, again.transaction);
    assert_eq!(wallet_of(&app, &people.ada).await.1, 700);
    let mut other = request;
    other.amount = eur(701);
    let status = expect_code(
        payments.top_up_wallet(authed(other, &people.ada)).await,
        Code::AlreadyExists,
    );
    assert!(status.message().starts_with("request_id "), "{status:?}");
    assert_eq!(wallet_of(&app, &people.ada).await.1, 700);
    assert_eq!(app.count("payments_transactions").await, 1);
}

async fn bad_amounts_are_invalid_and_write_nothing(app: TestApp) {
    let people = app.people().await;
    let mut payments = app.payments().await;
    let cases = [
        (
            TopUpWalletRequest {
                amount: eur(0),
                ..top_up("users/me/wallet", 0)
            },
            "amount",
        ),
        (
            TopUpWalletRequest {
                amount: eur(-5),
                ..top_up("users/me/wallet", 0)
            },
            "amount",
        ),
        (
            TopUpWalletRequest {
                amount: Some(Money {
                    currency_code: String::new(),
                    units: 5,
                }),
                ..top_up("users/me/wallet", 0)
            },
            "amount",
        ),
        (
            TopUpWalletRequest {
                amount: Some(Money {
                    currency_code: "USD".into(),
                    units: 5,
                }),
                ..top_up("users/me/wallet", 0)
            },
            "amount",
        ),
        (
            TopUpWalletRequest {
                amount: None,
                ..top_up("users/me/wallet", 0)
            },
            "amount",
        ),
        (
            TopUpWalletRequest {
                request_id: String::new(),
                ..top_up("users/me/wallet", 5)
            },
            "request_id",
        ),
        (
            TopUpWalletRequest {
                request_id: "x".into(),
                ..top_up("users/me/wallet", 5)
            },
            "request_id",
        ),
        (top_up("users/me/purse", 5), "name"),
    ];
    for (request, field) in cases {
        let status = expect_code(
            payments.top_up_wallet(authed(request, &people.ada)).await,
            Code::InvalidArgument,
        );
        assert_eq!(violated_field(&status).as_deref(), Some(field));
    }
    let mut ledger = app.ledger().await;
    expect_code(
        ledger
            .charge(authed(charge("", "users/me/wallet", 5), &people.service))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        ledger
            .charge(authed(charge("p1", "users/me/wallet", 0), &people.service))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(app.count("payments_transactions").await, 0);
    assert_eq!(app.count("payments_wallets").await, 0);
}

async fn other_users_wallets_are_out_of_reach(app: TestApp) {
    let people = app.people().await;
    let (ada_wallet, _) = wallet_of(&app, &people.ada).await;
    let mut payments = app.payments().await;
    expect_code(
        payments
            .get_wallet(authed(
                GetWalletRequest {
                    name: ada_wallet.clone(),
                },
                &people.bob,
            ))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        payments
            .list_transactions(authed(
                ListTransactionsRequest {
                    parent: ada_wallet.clone(),
                    page_size: 0,
                    page_token: String::new(),
                },
                &people.bob,
            ))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        payments
            .top_up_wallet(authed(top_up(&ada_wallet, 100), &people.bob))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        app.ledger()
            .await
            .charge(authed(charge("p1", &ada_wallet, 5), &people.bob))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        payments
            .get_wallet(GetWalletRequest {
                name: ada_wallet.clone(),
            })
            .await,
        Code::Unauthenticated,
    );
    payments
        .get_wallet(authed(GetWalletRequest { name: ada_wallet }, &people.admin))
        .await
        .unwrap();
    assert_eq!(app.count("payments_transactions").await, 0);
}

async fn charges_and_refunds_move_money_once(app: TestApp) {
    let people = app.people().await;
    let mut payments = app.payments().await;
    payments
        .top_up_wallet(authed(top_up("users/me/wallet", 100), &people.ada))
        .await
        .unwrap();
    let (wallet, _) = wallet_of(&app, &people.ada).await;
    let mut ledger = app.ledger().await;

    let charged = ledger
        .charge(authed(charge("orders/1", &wallet, 30), &people.service))
        .await
        .unwrap()
        .into_inner()
        .transaction
        .unwrap();
    assert_eq!(
        (charged.kind, charged.amount.unwrap().units),
        (Kind::Charge as i32, -30)
    );
    ledger
        .charge(authed(charge("orders/1", &wallet, 30), &people.service))
        .await
        .unwrap();
    assert_eq!(
        wallet_of(&app, &people.ada).await.1,
        70,
        "a repeated charge is taken once"
    );
    expect_code(
        ledger
            .charge(authed(charge("orders/1", &wallet, 31), &people.service))
            .await,
        Code::AlreadyExists,
    );

    let status = expect_code(
        ledger
            .charge(authed(charge("orders/2", &wallet, 71), &people.service))
            .await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains("insufficient funds"));
    assert_eq!(
        wallet_of(&app, &people.ada).await.1,
        70,
        "a short balance changes nothing"
    );

    let refund = ledger
        .refund(authed(
            RefundRequest {
                payment_id: "orders/1".into(),
            },
            &people.service,
        ))
        .await
        .unwrap()
        .into_inner()
        .transaction
        .unwrap();
    assert_eq!(
        (refund.kind, refund.amount.unwrap().units),
        (Kind::Refund as i32, 30)
    );
    ledger
        .refund(authed(
            RefundRequest {
                payment_id: "orders/1".into(),
            },
            &people.service,
        ))
        .await
        .unwrap();
    assert_eq!(
        wallet_of(&app, &people.ada).await.1,
        100,
        "a repeated refund gives back once"
    );
    expect_code(
        ledger
            .refund(authed(
                RefundRequest {
                    payment_id: "orders/404".into(),
                },
                &people.service,
            ))
            .await,
        Code::NotFound,
    );
    assert_eq!(ledger_sum(&app, &people.ada).await, 100);
    assert_eq!(app.count("payments_transactions").await, 3);
}

/// A charge that arrives after its refund (a worker that lost its job, waking up late) must not
/// keep the money: a refund closes the payment id for good, even one never charged.
async fn a_refunded_payment_id_is_never_charged(app: TestApp) {
    let people = app.people().await;
    app.payments()
        .await
        .top_up_wallet(authed(top_up("users/me/wallet", 100), &people.ada))
        .await
        .unwrap();
    let (wallet, _) = wallet_of(&app, &people.ada).await;
    let mut ledger = app.ledger().await;
    let refund = |id: &str| {
        authed(
            RefundRequest {
                payment_id: id.into(),
            },
            &people.service,
        )
    };
    expect_code(ledger.refund(refund("orders/early")).await, Code::NotFound);
    let status = expect_code(
        ledger
            .charge(authed(charge("orders/early", &wallet, 30), &people.service))
            .await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains("refunded"), "{status:?}");

    ledger
        .charge(authed(charge("orders/once", &wallet, 30), &people.service))
        .await
        .unwrap();
    ledger.refund(refund("orders/once")).await.unwrap();
    expect_code(
        ledger
            .charge(authed(charge("orders/once", &wallet, 30), &people.service))
            .await,
        Code::FailedPrecondition,
    );
    assert_eq!(wallet_of(&app, &people.ada).await.1, 100, "nothing kept");
    assert_eq!(ledger_sum(&app, &people.ada).await, 100);
}

async fn transactions_page_newest_first(app: TestApp) {
    let people = app.people().await;
    let mut payments = app.payments().await;
    for units in [1, 2, 3] {
        payments
            .top_up_wallet(authed(top_up("users/me/wallet", units), &people.ada))
            .await
            .unwrap();
    }
    let mut amounts = Vec::new();
    let mut token = String::new();
    loop {
        let page = payments
            .list_transactions(authed(
                ListTransactionsRequest {
                    parent: "users/me/wallet".into(),
                    page_size: 2,
                    page_token: token.clone(),
                },
                &people.ada,
            ))
            .await
            .unwrap()
            .into_inner();
        amounts.extend(
            page.transactions
                .iter()
                .map(|t| t.amount.as_ref().unwrap().units),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(amounts, vec![3, 2, 1]);
    let first = payments
        .list_transactions(authed(
            ListTransactionsRequest {
                parent: "users/me/wallet".into(),
                page_size: 1,
                page_token: String::new(),
            },
            &people.ada,
        ))
        .await
        .unwrap()
        .into_inner();
    expect_code(
        payments
            .list_transactions(authed(
                ListTransactionsRequest {
                    parent: "users/me/wallet".into(),
                    page_size: 1,
                    page_token: first.next_page_token.clone(),
                },
                &people.bob,
            ))
            .await,
        Code::InvalidArgument,
    );
    let empty = payments
        .list_transactions(authed(
            ListTransactionsRequest {
                parent: "users/me/wallet".into(),
                page_size: 0,
                page_token: String::new(),
            },
            &people.bob,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(empty.transactions.is_empty() && empty.next_page_token.is_empty());
}

async fn fifty_concurrent_charges_of_ten_on_a_hundred_succeed_ten_times(app: TestApp) {
    let people = app.people().await;
    app.payments()
        .await
        .top_up_wallet(authed(top_up("users/me/wallet", 100), &people.ada))
        .await
        .unwrap();
    let (wallet, _) = wallet_of(&app, &people.ada).await;
    let ledgers = clients(50, || app.ledger()).await;
    let answers = at_once(ledgers, |i, mut ledger| {
        let request = authed(charge(&format!("p{i}"), &wallet, 10), &people.service);
        async move { ledger.charge(request).await }
    })
    .await;
    assert!(
        app.peak_in_flight(LEDGER).await > 1.0,
        "the charges overlapped"
    );
    let (mut ok, mut short) = (0, 0);
    for answer in answers {
        match answer {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::FailedPrecondition => short += 1,
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert_eq!((ok, short), (10, 40));
    assert_eq!(wallet_of(&app, &people.ada).await.1, 0);
    assert_eq!(ledger_sum(&app, &people.ada).await, 0);
}

async fn one_payment_id_sent_twenty_times_at_once_is_charged_once(app: TestApp) {
    let people = app.people().await;
    app.payments()
        .await
        .top_up_wallet(authed(top_up("users/me/wallet", 100), &people.ada))
        .await
        .unwrap();
    let (wallet, _) = wallet_of(&app, &people.ada).await;
    let ledgers = clients(20, || app.ledger()).await;
    let entries: std::collections::HashSet<String> = at_once(ledgers, |_, mut ledger| {
        let request = authed(charge("orders/same", &wallet, 10), &people.service);
        async move { ledger.charge(request).await.map(|r| r.into_inner()) }
    })
    .await
    .into_iter()
    .map(|answer| {
        answer
            .expect("every retry gets the charge")
            .transaction
            .unwrap()
            .name
    })
    .collect();
    assert!(
        app.peak_in_flight(LEDGER).await > 1.0,
        "the retries overlapped"
    );
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(wallet_of(&app, &people.ada).await.1, 90);
}

on_every_store!(
    a_new_wallet_is_empty_and_top_ups_add_up,
    a_repeated_top_up_is_applied_once,
    bad_amounts_are_invalid_and_write_nothing,
    other_users_wallets_are_out_of_reach,
    charges_and_refunds_move_money_once,
    a_refunded_payment_id_is_never_charged,
    transactions_page_newest_first,
    fifty_concurrent_charges_of_ten_on_a_hundred_succeed_ten_times,
    one_payment_id_sent_twenty_times_at_once_is_charged_once
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_production_only_admins_top_up() {
    let app = TestApp::production(|_| {}).await;
    let people = app.people().await;
    let mut payments = app.payments().await;
    expect_code(
        payments
            .top_up_wallet(authed(top_up("users/me/wallet", 100), &people.ada))
            .await,
        Code::PermissionDenied,
    );
    let (wallet, balance) = wallet_of(&app, &people.ada).await;
    assert_eq!(balance, 0);
    payments
        .top_up_wallet(authed(top_up(&wallet, 100), &people.admin))
        .await
        .unwrap();
    assert_eq!(wallet_of(&app, &people.ada).await.1, 100);
}
