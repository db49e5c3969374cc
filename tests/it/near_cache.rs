//! Two replicas over one PostgreSQL and one Redis, each with its near tier: what changes through
//! one is what the other answers once Redis's invalidation arrives, for products, users and
//! todos, long before the near tier's own TTL (a minute here) would have let it go.

use crate::support;

use std::time::Duration;

use keel::proto::keel::catalog::v1::{GetProductRequest, Product, UpdateProductRequest};
use keel::proto::keel::identity::v1::{GetUserRequest, UpdateUserRequest, User};
use keel::proto::keel::todos::v1::{CreateTodoRequest, GetTodoRequest, Todo, UpdateTodoRequest};
use support::{Stores, TestApp, authed, eur};

/// A second replica of `first`: its stores, its data dir (so its signing keys), a long near TTL.
async fn replica_of(first: &TestApp) -> TestApp {
    let stores = first.settings.stores.clone();
    TestApp::spawn_with(Stores::PostgresRedis, move |s| {
        s.stores = stores;
        s.stores.near_cache_ttl = Duration::from_secs(60);
    })
    .await
}

fn mask(path: &str) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: vec![path.into()],
    })
}

/// Polls `read` until it answers `expected`: the invalidation travels from Redis to the other
/// replica on its own connection, so it may trail the writer's answer by a moment.
async fn until<F, Fut>(what: &str, expected: String, read: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    keel_testkit::eventually(Duration::from_secs(5), what, || {
        let read = read();
        let expected = expected.clone();
        async move { (read.await == expected).then_some(()) }
    })
    .await;
}

/// Reads `what` through `b` until the answer comes from its near tier (tracking is armed in
/// the background once B starts): what B holds there is what an invalidation must reach.
async fn held<F, Fut>(what: &str, b: &TestApp, read: F, is: &str)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let hits = "keel_cache_near_hits_total";
    keel_testkit::eventually(
        Duration::from_secs(5),
        &format!("B to hold {what}"),
        || async {
            let before = b.metric(hits).await;
            assert_eq!(read().await, is);
            (b.metric(hits).await > before).then_some(())
        },
    )
    .await;
}

async fn price(app: &TestApp, product: &str) -> String {
    let read = GetProductRequest {
        name: product.into(),
    };
    let product = app.catalog().await.get_product(read).await.unwrap();
    product.into_inner().price.unwrap().units.to_string()
}

async fn display_name(app: &TestApp, token: &str) -> String {
    let read = GetUserRequest {
        name: "users/me".into(),
    };
    let user = app.identity().await.get_user(authed(read, token)).await;
    user.unwrap().into_inner().display_name
}

async fn completed(app: &TestApp, todo: &str, token: &str) -> String {
    let read = GetTodoRequest { name: todo.into() };
    let found = app.todos().await.get_todo(authed(read, token)).await;
    found.unwrap().into_inner().completed.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_replica_is_what_the_other_answers() {
    let a = TestApp::spawn_with(Stores::PostgresRedis, |s| {
        s.stores.near_cache_ttl = Duration::from_secs(60);
    })
    .await;
    let b = replica_of(&a).await;
    let people = a.people().await;
    let (admin, ada) = (people.admin.as_str(), people.ada.as_str());

    // Products: B reads (and keeps) the price, A changes it.
    let lamp = a.product(admin, "Lamp", 1200, 5).await.name;
    assert_eq!(price(&b, &lamp).await, "1200");
    held("the price", &b, || price(&b, &lamp), "1200").await;
    let change = Product {
        name: lamp.clone(),
        price: eur(1500),
        ..Default::default()
    };
    let update = UpdateProductRequest {
        product: Some(change),
        update_mask: mask("price"),
    };
    a.catalog()
        .await
        .update_product(authed(update, admin))
        .await
        .unwrap();
    until("B to see the new price", "1500".into(), || price(&b, &lamp)).await;

    // Users: B reads Ada, A renames her.
    let before = display_name(&b, ada).await;
    held("the user", &b, || display_name(&b, ada), &before).await;
    let rename = UpdateUserRequest {
        user: Some(User {
            name: "users/me".into(),
            display_name: "Ada L.".into(),
            ..Default::default()
        }),
        update_mask: mask("display_name"),
    };
    a.identity()
        .await
        .update_user(authed(rename, ada))
        .await
        .unwrap();
    until("B to see the new name", "Ada L.".into(), || {
        display_name(&b, ada)
    })
    .await;

    // Todos: B reads a todo, A completes it.
    let create = CreateTodoRequest {
        parent: "users/me".into(),
        todo: Some(Todo {
            title: "Water the plants".into(),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    let todos = a.todos().await.create_todo(authed(create, ada)).await;
    let todo = todos.unwrap().into_inner().name;
    assert_eq!(completed(&b, &todo, ada).await, "false");
    held("the todo", &b, || completed(&b, &todo, ada), "false").await;
    let finish = UpdateTodoRequest {
        todo: Some(Todo {
            name: todo.clone(),
            completed: true,
            ..Default::default()
        }),
        update_mask: mask("completed"),
    };
    a.todos()
        .await
        .update_todo(authed(finish, ada))
        .await
        .unwrap();
    until("B to see the todo done", "true".into(), || {
        completed(&b, &todo, ada)
    })
    .await;
}
