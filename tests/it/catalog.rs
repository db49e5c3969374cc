//! The catalog and inventory on both store pairs: admin-only writes, public cached reads that
//! never lag a write, filters and orders with stable pages, and stock that is never reserved
//! twice or below zero.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use keel::proto::keel::catalog::v1::{
    BatchGetProductsRequest, CommitReservationRequest, CreateProductRequest, DeleteProductRequest,
    GetProductRequest, ListProductsRequest, Product, ReleaseStockRequest, Reservation,
    ReserveStockRequest, StockLine, UpdateProductRequest, reservation,
};
use keel::proto::keel::r#type::v1::Money;
use support::{Stores, TestApp, at_once, authed, clients, eur, expect_code, violated_field};
use tonic::Code;

/// The internal service the saga reserves stock through.
const INVENTORY: &str = "keel.catalog.v1.InventoryService";

fn product(title: &str, price: i64, stock: i64) -> CreateProductRequest {
    CreateProductRequest {
        product: Some(Product {
            title: title.into(),
            description: "d".into(),
            price: eur(price),
            stock,
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

fn reserve(id: &str, lines: &[(&str, i64)]) -> ReserveStockRequest {
    ReserveStockRequest {
        reservation_id: id.into(),
        lines: lines
            .iter()
            .map(|(p, q)| StockLine {
                product: p.to_string(),
                quantity: *q,
            })
            .collect(),
    }
}

async fn create(app: &TestApp, admin: &str, title: &str, price: i64, stock: i64) -> Product {
    app.catalog()
        .await
        .create_product(authed(product(title, price, stock), admin))
        .await
        .unwrap()
        .into_inner()
}

fn list(page_size: i32, page_token: &str, filter: &str, order_by: &str) -> ListProductsRequest {
    ListProductsRequest {
        page_size,
        page_token: page_token.into(),
        filter: filter.into(),
        order_by: order_by.into(),
    }
}

async fn admins_write_and_anyone_reads(app: TestApp) {
    let people = app.people().await;
    let mut catalog = app.catalog().await;
    let lamp = create(&app, &people.admin, "Lamp", 2500, 7).await;
    assert!(lamp.name.starts_with("products/"));
    assert_eq!((lamp.price.clone().unwrap().units, lamp.stock), (2500, 7));

    // Reads need no token.
    let fetched = catalog
        .get_product(GetProductRequest {
            name: lamp.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched, lamp);

    let change = Product {
        name: lamp.name.clone(),
        price: eur(1999),
        title: "ignored".into(),
        ..Default::default()
    };
    let updated = catalog
        .update_product(authed(
            UpdateProductRequest {
                product: Some(change),
                update_mask: mask(&["price"]),
            },
            &people.admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (updated.price.unwrap().units, updated.title.as_str()),
        (1999, "Lamp")
    );

    let chair = create(&app, &people.admin, "Chair", 4000, 0).await;
    let batch = catalog
        .batch_get_products(BatchGetProductsRequest {
            names: vec![chair.name.clone(), lamp.name.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        batch
            .products
            .iter()
            .map(|p| p.title.as_str())
            .collect::<Vec<_>>(),
        vec!["Chair", "Lamp"]
    );
    let missing = format!("products/{}", uuid::Uuid::now_v7());
    expect_code(
        catalog
            .batch_get_products(BatchGetProductsRequest {
                names: vec![lamp.name.clone(), missing],
            })
            .await,
        Code::NotFound,
    );

    catalog
        .delete_product(authed(
            DeleteProductRequest {
                name: chair.name.clone(),
            },
            &people.admin,
        ))
        .await
        .unwrap();
    expect_code(
        catalog
            .get_product(GetProductRequest {
                name: chair.name.clone(),
            })
            .await,
        Code::NotFound,
    );
    expect_code(
        catalog
            .delete_product(authed(
                DeleteProductRequest { name: chair.name },
                &people.admin,
            ))
            .await,
        Code::NotFound,
    );
}

async fn non_admins_cannot_write_and_nothing_changes(app: TestApp) {
    let people = app.people().await;
    let mut catalog = app.catalog().await;
    let lamp = create(&app, &people.admin, "Lamp", 2500, 7).await;
    expect_code(
        catalog
            .create_product(authed(product("Mine", 1, 1), &people.ada))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        catalog.create_product(product("Anon", 1, 1)).await,
        Code::Unauthenticated,
    );
    let change = Product {
        name: lamp.name.clone(),
        price: eur(1),
        ..Default::default()
    };
    expect_code(
        catalog
            .update_product(authed(
                UpdateProductRequest {
                    product: Some(change),
                    update_mask: mask(&["price"]),
                },
                &people.ada,
            ))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        catalog
            .delete_product(authed(
                DeleteProductRequest {
                    name: lamp.name.clone(),
                },
                &people.ada,
            ))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        app.inventory()
            .await
            .reserve_stock(authed(reserve("r1", &[(&lamp.name, 1)]), &people.ada))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(app.count("catalog_products").await, 1);
    assert_eq!(app.count("catalog_reservations").await, 0);
    let unchanged = catalog
        .get_product(GetProductRequest { name: lamp.name })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((unchanged.price.unwrap().units, unchanged.stock), (2500, 7));
}

async fn bad_products_are_invalid_and_write_nothing(app: TestApp) {
    let people = app.people().await;
    let mut catalog = app.catalog().await;
    let cases: Vec<(CreateProductRequest, &str)> = vec![
        (product("", 100, 1), "product.title"),
        (product("Lamp", -1, 1), "product.price"),
        (product("Lamp", 100, -1), "product.stock"),
        (
            CreateProductRequest {
                product: Some(Product {
                    title: "Lamp".into(),
                    price: Some(Money {
                        currency_code: String::new(),
                        units: 100,
                    }),
                    ..Default::default()
                }),
                request_id: String::new(),
            },
            "product.price",
        ),
        (
            CreateProductRequest {
                product: Some(Product {
                    title: "Lamp".into(),
                    price: None,
                    ..Default::default()
                }),
                request_id: String::new(),
            },
            "product.price",
        ),
    ];
    for (request, field) in cases {
        let status = expect_code(
            catalog.create_product(authed(request, &people.admin)).await,
            Code::InvalidArgument,
        );
        assert_eq!(violated_field(&status).as_deref(), Some(field));
    }
    assert_eq!(app.count("catalog_products").await, 0);

    let lamp = create(&app, &people.admin, "Lamp", 2500, 7).await;
    let change = Product {
        name: lamp.name.clone(),
        price: eur(-5),
        stock: -1,
        ..Default::default()
    };
    for paths in [&["price"][..], &["stock"], &["colour"], &[]] {
        expect_code(
            catalog
                .update_product(authed(
                    UpdateProductRequest {
                        product: Some(change.clone()),
                        update_mask: mask(paths),
                    },
                    &people.admin,
                ))
                .await,
            Code::InvalidArgument,
        );
    }
    expect_code(
        catalog
            .get_product(GetProductRequest {
                name: "products/lamp".into(),
            })
            .await,
        Code::InvalidArgument,
    );
    let unchanged = catalog
        .get_product(GetProductRequest { name: lamp.name })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((unchanged.price.unwrap().units, unchanged.stock), (2500, 7));
}

async fn lists_filter_order_and_page(app: TestApp) {
    let people = app.people().await;
    let mut catalog = app.catalog().await;
    for (title, price, stock) in [
        ("e", 500, 1),
        ("a", 100, 0),
        ("c", 300, 2),
        ("b", 200, 3),
        ("d", 400, 0),
        ("c2", 300, 1),
    ] {
        create(&app, &people.admin, title, price, stock).await;
    }
    let titles = |page: &keel::proto::keel::catalog::v1::ListProductsResponse| {
        page.products
            .iter()
            .map(|p| p.title.clone())
            .collect::<Vec<_>>()
    };
    let all = catalog
        .list_products(list(0, "", "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        titles(&all),
        vec!["e", "a", "c", "b", "d", "c2"],
        "oldest first by default"
    );
    let newest = catalog
        .list_products(list(0, "", "", "create_time desc"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(titles(&newest), vec!["c2", "d", "b", "c", "a", "e"]);
    let dear = catalog
        .list_products(list(0, "", "", "price desc"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(titles(&dear), vec!["e", "d", "c2", "c", "b", "a"]);
    let mid = catalog
        .list_products(list(
            0,
            "",
            "price >= 200 AND price <= 400 AND in_stock = true",
            "price",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(titles(&mid), vec!["b", "c", "c2"]);

    // Price order, two at a time, across equal prices: every product exactly once.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = catalog
            .list_products(list(2, &token, "", "price"))
            .await
            .unwrap()
            .into_inner();
        seen.extend(titles(&page));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, vec!["a", "b", "c", "c2", "d", "e"]);

    let none = catalog
        .list_products(list(0, "", "price >= 100000", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(none.products.is_empty() && none.next_page_token.is_empty());

    let first = catalog
        .list_products(list(2, "", "", "price"))
        .await
        .unwrap()
        .into_inner();
    expect_code(
        catalog
            .list_products(list(2, &first.next_page_token, "", "price desc"))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        catalog
            .list_products(list(2, &format!("{}x", first.next_page_token), "", "price"))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        catalog.list_products(list(0, "", "colour = red", "")).await,
        Code::InvalidArgument,
    );
    expect_code(
        catalog.list_products(list(0, "", "", "title")).await,
        Code::InvalidArgument,
    );
}

async fn reservations_hold_release_and_commit_stock(app: TestApp) {
    let people = app.people().await;
    let mut inventory = app.inventory().await;
    let lamp = create(&app, &people.admin, "Lamp", 2500, 5).await;
    let held = inventory
        .reserve_stock(authed(
            reserve("orders/1", &[(&lamp.name, 3)]),
            &people.service,
        ))
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap();
    assert_eq!(held.state, reservation::State::Reserved as i32);
    assert_eq!(held.unit_prices[0].units, 2500);
    assert_eq!(
        app.stock(&lamp.name).await,
        2,
        "the cached product saw the reservation"
    );

    let again = inventory
        .reserve_stock(authed(
            reserve("orders/1", &[(&lamp.name, 3)]),
            &people.service,
        ))
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap();
    assert_eq!(again, held, "a retry returns the first reservation");
    assert_eq!(app.stock(&lamp.name).await, 2, "and takes nothing more");
    let status = expect_code(
        inventory
            .reserve_stock(authed(
                reserve("orders/1", &[(&lamp.name, 1)]),
                &people.service,
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&status).as_deref(), Some("reservation_id"));

    let released = inventory
        .release_stock(authed(
            ReleaseStockRequest {
                reservation_id: "orders/1".into(),
            },
            &people.service,
        ))
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap();
    assert_eq!(released.state, reservation::State::Released as i32);
    assert_eq!(app.stock(&lamp.name).await, 5);
    inventory
        .release_stock(authed(
            ReleaseStockRequest {
                reservation_id: "orders/1".into(),
            },
            &people.service,
        ))
        .await
        .unwrap();
    assert_eq!(
        app.stock(&lamp.name).await,
        5,
        "releasing twice returns stock once"
    );
    expect_code(
        inventory
            .commit_reservation(authed(
                CommitReservationRequest {
                    reservation_id: "orders/1".into(),
                },
                &people.service,
            ))
            .await,
        Code::FailedPrecondition,
    );

    inventory
        .reserve_stock(authed(
            reserve("orders/2", &[(&lamp.name, 5)]),
            &people.service,
        ))
        .await
        .unwrap();
    let committed = inventory
        .commit_reservation(authed(
            CommitReservationRequest {
                reservation_id: "orders/2".into(),
            },
            &people.service,
        ))
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap();
    assert_eq!(committed.state, reservation::State::Committed as i32);
    assert_eq!(app.stock(&lamp.name).await, 0);
}

/// An admin who counted the shelf sets the stock against what they read: a reservation made
/// since makes the write ABORTED, never erased; read again, the write goes through.
async fn a_stock_level_set_against_an_old_read_erases_no_reservation(app: TestApp) {
    let people = app.people().await;
    let mut catalog = app.catalog().await;
    let lamp = create(&app, &people.admin, "Lamp", 2500, 5).await;
    let set_stock = |read: &Product, stock: i64| {
        authed(
            UpdateProductRequest {
                product: Some(Product {
                    stock,
                    ..read.clone()
                }),
                update_mask: mask(&["stock"]),
            },
            &people.admin,
        )
    };
    let blind = Product {
        etag: String::new(),
        ..lamp.clone()
    };
    let status = expect_code(
        catalog.update_product(set_stock(&blind, 50)).await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&status).as_deref(), Some("product.etag"));

    let read = catalog
        .get_product(GetProductRequest {
            name: lamp.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // A buyer reserves between the admin's read and write.
    app.inventory()
        .await
        .reserve_stock(authed(
            reserve("orders/between", &[(&lamp.name, 2)]),
            &people.service,
        ))
        .await
        .unwrap();
    let status = expect_code(
        catalog
            .update_product(set_stock(&read, read.stock + 10))
            .await,
        Code::Aborted,
    );
    assert!(status.message().contains("etag"), "{status:?}");
    assert_eq!(app.stock(&lamp.name).await, 3, "the reservation stands");

    let again = catalog
        .get_product(GetProductRequest {
            name: lamp.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(again.etag, read.etag);
    let restocked = catalog
        .update_product(set_stock(&again, again.stock + 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restocked.stock, 13, "the restock counts the reservation");
    assert_ne!(restocked.etag, again.etag);
}

/// A reservation that arrives after its release (a worker that lost its job, waking up late)
/// must not hold stock for ever: releases are final, even of an id never reserved.
async fn a_released_reservation_is_never_held_again(app: TestApp) {
    let people = app.people().await;
    let mut inventory = app.inventory().await;
    let lamp = create(&app, &people.admin, "Lamp", 2500, 5).await;
    let release = |id: &str| {
        authed(
            ReleaseStockRequest {
                reservation_id: id.into(),
            },
            &people.service,
        )
    };
    let unheard = inventory
        .release_stock(release("orders/early"))
        .await
        .expect("an id never reserved is released all the same")
        .into_inner()
        .reservation
        .unwrap();
    assert_eq!(
        (unheard.state, unheard.lines.len()),
        (reservation::State::Released as i32, 0)
    );
    let late = reserve("orders/early", &[(&lamp.name, 2)]);
    let status = expect_code(
        inventory.reserve_stock(authed(late, &people.service)).await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains("released"), "{status:?}");
    assert_eq!(app.stock(&lamp.name).await, 5, "nothing held");

    inventory
        .reserve_stock(authed(
            reserve("orders/once", &[(&lamp.name, 2)]),
            &people.service,
        ))
        .await
        .unwrap();
    inventory
        .release_stock(release("orders/once"))
        .await
        .unwrap();
    let again = reserve("orders/once", &[(&lamp.name, 2)]);
    expect_code(
        inventory
            .reserve_stock(authed(again, &people.service))
            .await,
        Code::FailedPrecondition,
    );
    let commit = CommitReservationRequest {
        reservation_id: "orders/early".into(),
    };
    expect_code(
        inventory
            .commit_reservation(authed(commit, &people.service))
            .await,
        Code::FailedPrecondition,
    );
    assert_eq!(app.stock(&lamp.name).await, 5);
}

async fn a_reservation_is_all_lines_or_none(app: TestApp) {
    let people = app.people().await;
    let mut inventory = app.inventory().await;
    let lamp = create(&app, &people.admin, "Lamp", 2500, 5).await;
    let chair = create(&app, &people.admin, "Chair", 4000, 1).await;
    let status = expect_code(
        inventory
            .reserve_stock(authed(
                reserve("orders/1", &[(&lamp.name, 2), (&chair.name, 2)]),
                &people.service,
            ))
            .await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains(&chair.name), "{status:?}");
    assert_eq!(
        (app.stock(&lamp.name).await, app.stock(&chair.name).await),
        (5, 1)
    );
    assert_eq!(app.count("catalog_reservations").await, 0);

    let missing = format!("products/{}", uuid::Uuid::now_v7());
    expect_code(
        inventory
            .reserve_stock(authed(
                reserve("orders/2", &[(&lamp.name, 1), (&missing, 1)]),
                &people.service,
            ))
            .await,
        Code::NotFound,
    );
    for quantity in [0, -3] {
        let status = expect_code(
            inventory
                .reserve_stock(authed(
                    reserve("orders/3", &[(&lamp.name, quantity)]),
                    &people.service,
                ))
                .await,
            Code::InvalidArgument,
        );
        assert_eq!(violated_field(&status).as_deref(), Some("lines.quantity"));
    }
    expect_code(
        inventory
            .reserve_stock(authed(
                reserve("orders/4", &[(&lamp.name, 1), (&lamp.name, 1)]),
                &people.service,
            ))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        inventory
            .reserve_stock(authed(reserve("", &[(&lamp.name, 1)]), &people.service))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        inventory
            .reserve_stock(authed(reserve("orders/5", &[]), &people.service))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(app.stock(&lamp.name).await, 5);
    assert_eq!(app.count("catalog_reservations").await, 0);
}

async fn fifty_concurrent_reservations_of_ten_units_succeed_ten_times(app: TestApp) {
    let people = app.people().await;
    let lamp = create(&app, &people.admin, "Lamp", 2500, 10).await;
    let inventories = clients(50, || app.inventory()).await;
    let answers = at_once(inventories, |i, mut inventory| {
        let request = reserve(&format!("orders/{i}"), &[(&lamp.name, 1)]);
        let request = authed(request, &people.service);
        async move { inventory.reserve_stock(request).await }
    })
    .await;
    assert!(
        app.peak_in_flight(INVENTORY).await > 1.0,
        "the reservations overlapped"
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
    assert_eq!(app.stock(&lamp.name).await, 0);
    assert_eq!(app.count("catalog_reservations").await, 10);
}

async fn one_reservation_id_sent_twenty_times_at_once_is_applied_once(app: TestApp) {
    let people = app.people().await;
    let lamp = create(&app, &people.admin, "Lamp", 2500, 10).await;
    let inventories = clients(20, || app.inventory()).await;
    let answers: Vec<Reservation> = at_once(inventories, |_, mut inventory| {
        let request = authed(reserve("orders/same", &[(&lamp.name, 3)]), &people.service);
        async move { inventory.reserve_stock(request).await }
    })
    .await
    .into_iter()
    .map(|answer| {
        let answer = answer.expect("every retry gets the reservation");
        answer.into_inner().reservation.unwrap()
    })
    .collect();
    assert!(
        app.peak_in_flight(INVENTORY).await > 1.0,
        "the retries overlapped"
    );
    assert!(answers.iter().all(|r| *r == answers[0]), "{answers:?}");
    assert_eq!(answers[0].state, reservation::State::Reserved as i32);
    assert_eq!(app.stock(&lamp.name).await, 7);
    assert_eq!(app.count("catalog_reservations").await, 1);
}

async fn after_an_update_no_reader_sees_the_old_price(app: TestApp) {
    let people = app.people().await;
    let lamp = create(&app, &people.admin, "Lamp", 0, 1).await;
    // Readers keep the cache busy (filling it, racing every invalidation) the whole time, and
    // none may read a price older than the last update that had returned when its read began.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicI64::new(0));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (mut catalog, name) = (app.catalog().await, lamp.name.clone());
        let (stop, published) = (stop.clone(), published.clone());
        readers.push(tokio::spawn(async move {
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                let at_least = published.load(Ordering::SeqCst);
                let request = GetProductRequest { name: name.clone() };
                let seen = catalog.get_product(request).await.unwrap().into_inner();
                let price = seen.price.unwrap().units;
                assert!(
                    price >= at_least,
                    "read {price} after {at_least} was written"
                );
                reads += 1;
            }
            reads
        }));
    }
    let mut catalog = app.catalog().await;
    for price in 1..=60 {
        let change = Product {
            name: lamp.name.clone(),
            price: eur(price),
            ..Default::default()
        };
        catalog
            .update_product(authed(
                UpdateProductRequest {
                    product: Some(change),
                    update_mask: mask(&["price"]),
                },
                &people.admin,
            ))
            .await
            .unwrap();
        published.store(price, Ordering::SeqCst);
        for _ in 0..3 {
            let seen = catalog
                .get_product(GetProductRequest {
                    name: lamp.name.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                seen.price.unwrap().units,
                price,
                "read after the write returned"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        assert!(reader.await.unwrap() > 0, "every reader read");
    }
    let hits = app
        .metric(r#"keel_cache_requests_total{cache="catalog.product",result="hit"}"#)
        .await;
    assert!(hits > 0.0, "the cache was in play");
}

async fn a_repeated_request_id_returns_the_first_product(app: TestApp) {
    let people = app.people().await;
    let mut catalog = app.catalog().await;
    let mut request = product("Lamp", 2500, 7);
    request.request_id = uuid::Uuid::new_v4().to_string();
    let first = catalog
        .create_product(authed(request.clone(), &people.admin))
        .await
        .unwrap()
        .into_inner();
    let again = catalog
        .create_product(authed(request.clone(), &people.admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, again);
    request.product.as_mut().unwrap().stock = 8;
    let status = expect_code(
        catalog.create_product(authed(request, &people.admin)).await,
        Code::AlreadyExists,
    );
    assert!(status.message().starts_with("request_id "), "{status:?}");
    assert_eq!(app.count("catalog_products").await, 1);
}

/// A batch of 1000 names is one database query for the misses, not 1000; a second batch is
/// served from the cache alone. Counted exactly: nothing else queries the database on its own
/// (no worker, no health probe within the test, no outbox relay — it runs only beside Redis, so
/// PostgreSQL goes with the in-process cache here), except the queue's sampler every 5 s, which
/// may add a statement to a window but never take one away. So a round over fresh products that
/// counts exactly one statement cold and none warm shows the batch's own; a batch that ran two
/// queries could never show it.
async fn a_batch_of_a_thousand_names_is_one_query_then_none(stores: Stores) {
    let app = TestApp::spawn_with(stores, |s| {
        s.workers.worker_concurrency = Some(0);
        s.operations.health_probe_interval = std::time::Duration::from_secs(3600);
        s.stores.redis_url = None;
    })
    .await;
    let people = app.people().await;
    let catalog = app.catalog().await;
    let mut counted = Vec::new();
    for round in 0..20 {
        let mut distinct = Vec::new();
        for i in 0..10 {
            let title = format!("R{round}P{i}");
            distinct.push(app.product(&people.admin, &title, 100 + i, 1).await.name);
        }
        let names: Vec<String> = (0..1000).map(|i| distinct[i % 10].clone()).collect();
        let batch = || {
            let request = BatchGetProductsRequest {
                names: names.clone(),
            };
            let mut catalog = catalog.clone();
            let app = &app;
            let names = &names;
            async move {
                let statements = "keel_db_statements_total{result=\"ok\"}";
                let before = app.metric(statements).await;
                let batch = catalog.batch_get_products(request).await.unwrap();
                let ran = app.metric(statements).await - before;
                let products = batch.into_inner().products;
                assert!(
                    products.iter().map(|p| &p.name).eq(names.iter()),
                    "all of them, in the order asked"
                );
                ran
            }
        };
        let (cold, warm) = (batch().await, batch().await);
        assert!(cold >= 1.0, "the misses were read from the database");
        if (cold, warm) == (1.0, 0.0) {
            return;
        }
        counted.push((cold, warm));
    }
    panic!("never one statement cold and none warm: {counted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_a_thousand_names_is_one_query_then_none_embedded() {
    a_batch_of_a_thousand_names_is_one_query_then_none(Stores::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_a_thousand_names_is_one_query_then_none_postgres() {
    a_batch_of_a_thousand_names_is_one_query_then_none(Stores::PostgresRedis).await;
}

on_every_store!(
    admins_write_and_anyone_reads,
    non_admins_cannot_write_and_nothing_changes,
    bad_products_are_invalid_and_write_nothing,
    lists_filter_order_and_page,
    reservations_hold_release_and_commit_stock,
    a_released_reservation_is_never_held_again,
    a_stock_level_set_against_an_old_read_erases_no_reservation,
    a_reservation_is_all_lines_or_none,
    fifty_concurrent_reservations_of_ten_units_succeed_ten_times,
    one_reservation_id_sent_twenty_times_at_once_is_applied_once,
    after_an_update_no_reader_sees_the_old_price,
    a_repeated_request_id_returns_the_first_product
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_succeed_with_redis_down() {
    let redis = keel_testkit::Redis::dedicated().await;
    let url = redis.url.clone();
    let app = TestApp::spawn_with(Stores::PostgresRedis, move |s| {
        s.stores.redis_url = Some(url)
    })
    .await;
    let people = app.people().await;
    let lamp = create(&app, &people.admin, "Lamp", 2500, 7).await;
    assert_eq!(app.stock(&lamp.name).await, 7);

    redis.kill();

    let chair = create(&app, &people.admin, "Chair", 4000, 2).await;
    let mut catalog = app.catalog().await;
    let change = Product {
        name: lamp.name.clone(),
        price: eur(1999),
        ..Default::default()
    };
    catalog
        .update_product(authed(
            UpdateProductRequest {
                product: Some(change),
                update_mask: mask(&["price"]),
            },
            &people.admin,
        ))
        .await
        .unwrap();
    let lamp_now = catalog
        .get_product(GetProductRequest { name: lamp.name })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lamp_now.price.unwrap().units, 1999);
    assert_eq!(app.stock(&chair.name).await, 2);
    app.inventory()
        .await
        .reserve_stock(authed(
            reserve("orders/1", &[(&chair.name, 1)]),
            &people.service,
        ))
        .await
        .unwrap();
    assert_eq!(app.stock(&chair.name).await, 1);
}

/// A reservation is written by three statements (the reservation, the product's stock taken
/// with its price read back by the same update, the line) and committed by two (the update
/// that answers the row it moved, the lines); a second commit reads the row it did not move
/// and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserving_is_three_statements_and_committing_two() {
    let app = TestApp::spawn_with(Stores::PostgresRedis, |s| {
        s.workers.worker_concurrency = Some(0);
        s.operations.health_probe_interval = std::time::Duration::from_secs(3600);
        s.stores.redis_url = None;
    })
    .await;
    let people = app.people().await;
    let mut inventory = app.inventory().await;
    let lamp = create(&app, &people.admin, "Lamp", 2500, 100).await;
    let statements = "keel_db_statements_total{result=\"ok\"}";
    let (mut reserving, mut committing, mut again) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..10 {
        let id = format!("orders/{n}");
        let before = app.metric(statements).await;
        inventory
            .reserve_stock(authed(reserve(&id, &[(&lamp.name, 1)]), &people.service))
            .await
            .unwrap();
        reserving.push(app.metric(statements).await - before);
        for counted in [&mut committing, &mut again] {
            let before = app.metric(statements).await;
            let committed = inventory
                .commit_reservation(authed(
                    CommitReservationRequest {
                        reservation_id: id.clone(),
                    },
                    &people.service,
                ))
                .await
                .unwrap()
                .into_inner()
                .reservation
                .unwrap();
            counted.push(app.metric(statements).await - before);
            assert_eq!(committed.state, reservation::State::Committed as i32);
            assert_eq!(committed.unit_prices[0].units, 2500);
        }
    }
    let least = |counted: &[f64]| counted.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(least(&reserving), 3.0, "{reserving:?}");
    assert_eq!(least(&committing), 2.0, "{committing:?}");
    assert_eq!(least(&again), 3.0, "{again:?}");
    assert_eq!(app.stock(&lamp.name).await, 90);
}
