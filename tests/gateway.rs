//! The REST gateway as REST clients meet it: every public RPC gives over REST what it gives over
//! gRPC, bad requests are clear 4xx answers that never reach a backend, errors are
//! `google.rpc.Status` JSON, and the edge protects itself.

mod support;

use std::collections::BTreeSet;

use keel::proto::keel::catalog::v1::{
    BatchGetProductsRequest, CreateProductRequest, GetProductRequest, ListProductsRequest, Product,
};
use keel::proto::keel::identity::v1::{
    GetJwksRequest, GetUserRequest, ListUsersRequest, RegisterRequest,
};
use keel::proto::keel::payments::v1::{
    GetWalletRequest, ListTransactionsRequest, TopUpWalletRequest,
};
use keel::proto::keel::todos::v1::{CreateTodoRequest, GetTodoRequest, ListTodosRequest, Todo};
use keel::proto::keel::r#type::v1::Money;
use reqwest::Method;
use serde_json::{Value, json};
use support::{PASSWORD, Stores, TestApp, authed, json_of, rest};
use tonic::Code;

/// Records which bindings the parity test exercised.
#[derive(Default)]
struct Covered(BTreeSet<(String, String)>);

impl Covered {
    fn mark(&mut self, method: &str, template: &str) {
        self.0.insert((method.to_owned(), template.to_owned()));
    }

    /// REST answered 200 with exactly what gRPC answered; the binding counts as covered.
    fn same(&mut self, method: &str, template: &str, rest: (u16, &Value), grpc: &Value) {
        assert_eq!(
            rest,
            (200, grpc),
            "{method} {template}: REST and gRPC differ"
        );
        self.mark(method, template);
    }
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_rpc_answers_the_same_over_rest_and_grpc() {
    let app = TestApp::spawn(Stores::Embedded).await;
    let mut covered = Covered::default();
    let people = app.people().await;
    let (admin, ada) = (people.admin.as_str(), people.ada.as_str());
    let mut identity = app.identity().await;

    // identity
    let (status, registered) = rest(
        &app,
        Method::POST,
        "/v1/auth:register",
        None,
        Some(json!({"email": "rest@example.com", "password": PASSWORD})),
    )
    .await;
    assert_eq!(status, 200);
    let grpc_registered = identity
        .register(RegisterRequest {
            email: "grpc@example.com".into(),
            password: PASSWORD.into(),
            display_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let grpc_registered = json_of(&grpc_registered, "keel.identity.v1.RegisterResponse");
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&registered), keys(&grpc_registered));
    assert_eq!(keys(&registered["user"]), keys(&grpc_registered["user"]));
    assert_eq!(
        (
            registered["tokenType"].clone(),
            registered["expiresIn"].clone()
        ),
        (json!("Bearer"), json!("900"))
    );
    let (status, duplicate) = rest(
        &app,
        Method::POST,
        "/v1/auth:register",
        None,
        Some(json!({"email": "grpc@example.com", "password": PASSWORD})),
    )
    .await;
    assert_eq!(
        (status, duplicate["code"].clone()),
        (409, json!(Code::AlreadyExists as i32))
    );
    covered.mark("POST", "/v1/auth:register");

    let (status, login) = rest(
        &app,
        Method::POST,
        "/v1/auth:login",
        None,
        Some(json!({"email": "rest@example.com", "password": PASSWORD})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        keys(&login),
        vec!["accessToken", "expiresIn", "refreshToken", "tokenType"]
    );
    covered.mark("POST", "/v1/auth:login");
    let (status, refreshed) = rest(
        &app,
        Method::POST,
        "/v1/auth:refresh",
        None,
        Some(json!({"refreshToken": login["refreshToken"]})),
    )
    .await;
    assert_eq!((status, keys(&refreshed)), (200, keys(&login)));
    let reused = identity
        .refresh_token(keel::proto::keel::identity::v1::RefreshTokenRequest {
            refresh_token: login["refreshToken"].as_str().unwrap().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        reused.code(),
        Code::Unauthenticated,
        "the same rotation rules over both"
    );
    covered.mark("POST", "/v1/auth:refresh");
    let (status, logout) = rest(
        &app,
        Method::POST,
        "/v1/auth:logout",
        None,
        Some(json!({"refreshToken": refreshed["refreshToken"]})),
    )
    .await;
    assert_eq!((status, logout), (200, json!({})));
    covered.mark("POST", "/v1/auth:logout");

    let (status, me) = rest(&app, Method::GET, "/v1/users/me", Some(ada), None).await;
    let grpc_me = identity
        .get_user(authed(
            GetUserRequest {
                name: "users/me".into(),
            },
            ada,
        ))
        .await
        .unwrap()
        .into_inner();
    covered.same(
        "GET",
        "/v1/{name=users/*}",
        (status, &me),
        &json_of(&grpc_me, "keel.identity.v1.User"),
    );

    let (status, users) = rest(&app, Method::GET, "/v1/users?pageSize=2", Some(admin), None).await;
    let grpc_users = identity
        .list_users(authed(
            ListUsersRequest {
                page_size: 2,
                page_token: String::new(),
            },
            admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status, &users),
        (
            200,
            &json_of(&grpc_users, "keel.identity.v1.ListUsersResponse")
        )
    );
    covered.mark("GET", "/v1/users");

    let (status, updated) = rest(
        &app,
        Method::PATCH,
        "/v1/users/me?updateMask=displayName",
        Some(ada),
        Some(json!({"displayName": "Ada L."})),
    )
    .await;
    let grpc_me = identity
        .get_user(authed(
            GetUserRequest {
                name: "users/me".into(),
            },
            ada,
        ))
        .await
        .unwrap()
        .into_inner();
    covered.same(
        "PATCH",
        "/v1/{user.name=users/*}",
        (status, &updated),
        &json_of(&grpc_me, "keel.identity.v1.User"),
    );

    let (status, jwks) = rest(&app, Method::GET, "/v1/auth/jwks", None, None).await;
    let grpc_jwks = identity
        .get_jwks(GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status, &jwks),
        (
            200,
            &json_of(&grpc_jwks, "keel.identity.v1.GetJwksResponse")
        )
    );
    let (status, well_known) = rest(&app, Method::GET, "/.well-known/jwks.json", None, None).await;
    assert_eq!((status, well_known), (200, jwks));
    covered.mark("GET", "/v1/auth/jwks");
    covered.mark("GET", "/.well-known/jwks.json");

    // todos
    let request_id = uuid();
    let (status, todo) = rest(
        &app,
        Method::POST,
        &format!("/v1/users/me/todos?requestId={request_id}"),
        Some(ada),
        Some(json!({"title": "parity"})),
    )
    .await;
    let mut todos = app.todos().await;
    let same = todos
        .create_todo(authed(
            CreateTodoRequest {
                parent: "users/me".into(),
                todo: Some(Todo {
                    title: "parity".into(),
                    ..Default::default()
                }),
                request_id,
            },
            ada,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status, &todo),
        (200, &json_of(&same, "keel.todos.v1.Todo")),
        "one request id over both"
    );
    covered.mark("POST", "/v1/{parent=users/*}/todos");
    let todo_name = todo["name"].as_str().unwrap().to_owned();
    let (status, fetched) = rest(
        &app,
        Method::GET,
        &format!("/v1/{todo_name}"),
        Some(ada),
        None,
    )
    .await;
    let grpc_todo = todos
        .get_todo(authed(
            GetTodoRequest {
                name: todo_name.clone(),
            },
            ada,
        ))
        .await
        .unwrap()
        .into_inner();
    covered.same(
        "GET",
        "/v1/{name=users/*/todos/*}",
        (status, &fetched),
        &json_of(&grpc_todo, "keel.todos.v1.Todo"),
    );
    let (status, list) = rest(
        &app,
        Method::GET,
        "/v1/users/me/todos?filter=completed%3Dfalse",
        Some(ada),
        None,
    )
    .await;
    let grpc_list = todos
        .list_todos(authed(
            ListTodosRequest {
                parent: "users/me".into(),
                filter: "completed=false".into(),
                ..Default::default()
            },
            ada,
        ))
        .await
        .unwrap()
        .into_inner();
    covered.same(
        "GET",
        "/v1/{parent=users/*}/todos",
        (status, &list),
        &json_of(&grpc_list, "keel.todos.v1.ListTodosResponse"),
    );
    let (status, done) = rest(
        &app,
        Method::PATCH,
        &format!("/v1/{todo_name}?updateMask=completed"),
        Some(ada),
        Some(json!({"completed": true})),
    )
    .await;
    let grpc_todo = todos
        .get_todo(authed(
            GetTodoRequest {
                name: todo_name.clone(),
            },
            ada,
        ))
        .await
        .unwrap()
        .into_inner();
    covered.same(
        "PATCH",
        "/v1/{todo.name=users/*/todos/*}",
        (status, &done),
        &json_of(&grpc_todo, "keel.todos.v1.Todo"),
    );
    let (status, deleted) = rest(
        &app,
        Method::DELETE,
        &format!("/v1/{todo_name}"),
        Some(ada),
        None,
    )
    .await;
    assert_eq!((status, deleted), (200, json!({})));
    assert_eq!(
        todos
            .get_todo(authed(
                GetTodoRequest {
                    name: todo_name.clone()
                },
                ada
            ))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let (status, _) = rest(
        &app,
        Method::DELETE,
        &format!("/v1/{todo_name}"),
        Some(ada),
        None,
    )
    .await;
    assert_eq!(status, 404);
    covered.mark("DELETE", "/v1/{name=users/*/todos/*}");

    // catalog
    let request_id = uuid();
    let price = json!({"currencyCode": "EUR", "units": "2500"});
    let (status, product) = rest(
        &app,
        Method::POST,
        &format!("/v1/products?requestId={request_id}"),
        Some(admin),
        Some(json!({"title": "Lamp", "price": price, "stock": "7"})),
    )
    .await;
    let mut catalog = app.catalog().await;
    let same = catalog
        .create_product(authed(
            CreateProductRequest {
                product: Some(Product {
                    title: "Lamp".into(),
                    price: Some(Money {
                        currency_code: "EUR".into(),
                        units: 2500,
                    }),
                    stock: 7,
                    ..Default::default()
                }),
                request_id,
            },
            admin,
        ))
        .await
        .unwrap()
        .into_inner();
    covered.same(
        "POST",
        "/v1/products",
        (status, &product),
        &json_of(&same, "keel.catalog.v1.Product"),
    );
    let product_name = product["name"].as_str().unwrap().to_owned();
    let (status, fetched) = rest(
        &app,
        Method::GET,
        &format!("/v1/{product_name}"),
        None,
        None,
    )
    .await;
    let grpc_product = catalog
        .get_product(GetProductRequest {
            name: product_name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    covered.same(
        "GET",
        "/v1/{name=products/*}",
        (status, &fetched),
        &json_of(&grpc_product, "keel.catalog.v1.Product"),
    );
    let (status, list) = rest(
        &app,
        Method::GET,
        "/v1/products?orderBy=price%20desc&filter=in_stock%20%3D%20true",
        None,
        None,
    )
    .await;
    let grpc_list = catalog
        .list_products(ListProductsRequest {
            order_by: "price desc".into(),
            filter: "in_stock = true".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status, &list),
        (
            200,
            &json_of(&grpc_list, "keel.catalog.v1.ListProductsResponse")
        )
    );
    covered.mark("GET", "/v1/products");
    let (status, batch) = rest(
        &app,
        Method::GET,
        &format!("/v1/products:batchGet?names={product_name}&names={product_name}"),
        None,
        None,
    )
    .await;
    let grpc_batch = catalog
        .batch_get_products(BatchGetProductsRequest {
            names: vec![product_name.clone(), product_name.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status, &batch),
        (
            200,
            &json_of(&grpc_batch, "keel.catalog.v1.BatchGetProductsResponse")
        )
    );
    assert_eq!(
        batch["products"].as_array().unwrap().len(),
        2,
        "repeated query parameters"
    );
    covered.mark("GET", "/v1/products:batchGet");
    let (status, cheaper) = rest(
        &app,
        Method::PATCH,
        &format!("/v1/{product_name}?updateMask=price"),
        Some(admin),
        Some(json!({"price": {"currencyCode": "EUR", "units": 1999}})),
    )
    .await;
    let grpc_product = catalog
        .get_product(GetProductRequest {
            name: product_name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    covered.same(
        "PATCH",
        "/v1/{product.name=products/*}",
        (status, &cheaper),
        &json_of(&grpc_product, "keel.catalog.v1.Product"),
    );
    let (status, deleted) = rest(
        &app,
        Method::DELETE,
        &format!("/v1/{product_name}"),
        Some(admin),
        None,
    )
    .await;
    assert_eq!((status, deleted), (200, json!({})));
    covered.mark("DELETE", "/v1/{name=products/*}");

    // payments
    let request_id = uuid();
    let (status, topped) = rest(
        &app,
        Method::POST,
        "/v1/users/me/wallet:topUp",
        Some(ada),
        Some(json!({"amount": {"currencyCode": "EUR", "units": "500"}, "requestId": request_id})),
    )
    .await;
    let mut payments = app.payments().await;
    let same = payments
        .top_up_wallet(authed(
            TopUpWalletRequest {
                name: "users/me/wallet".into(),
                amount: Some(Money {
                    currency_code: "EUR".into(),
                    units: 500,
                }),
                request_id,
            },
            ada,
        ))
        .await
        .unwrap()
        .into_inner();
    let same = json_of(&same, "keel.payments.v1.TopUpWalletResponse");
    assert_eq!(
        (status, &topped["transaction"]),
        (200, &same["transaction"])
    );
    assert_eq!(
        topped["wallet"]["balance"],
        json!({"currencyCode": "EUR", "units": "500"})
    );
    covered.mark("POST", "/v1/{name=users/*/wallet}:topUp");
    let (status, wallet) = rest(&app, Method::GET, "/v1/users/me/wallet", Some(ada), None).await;
    let grpc_wallet = payments
        .get_wallet(authed(
            GetWalletRequest {
                name: "users/me/wallet".into(),
            },
            ada,
        ))
        .await
        .unwrap()
        .into_inner();
    covered.same(
        "GET",
        "/v1/{name=users/*/wallet}",
        (status, &wallet),
        &json_of(&grpc_wallet, "keel.payments.v1.Wallet"),
    );
    let (status, ledger) = rest(
        &app,
        Method::GET,
        "/v1/users/me/wallet/transactions",
        Some(ada),
        None,
    )
    .await;
    let grpc_ledger = payments
        .list_transactions(authed(
            ListTransactionsRequest {
                parent: "users/me/wallet".into(),
                ..Default::default()
            },
            ada,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status, &ledger),
        (
            200,
            &json_of(&grpc_ledger, "keel.payments.v1.ListTransactionsResponse")
        )
    );
    covered.mark("GET", "/v1/{parent=users/*/wallet}/transactions");

    // identity: delete last, it revokes Bob.
    let bob_name = identity
        .get_user(authed(
            GetUserRequest {
                name: "users/me".into(),
            },
            &people.bob,
        ))
        .await
        .unwrap()
        .into_inner()
        .name;
    let (status, deleted) = rest(
        &app,
        Method::DELETE,
        &format!("/v1/{bob_name}"),
        Some(admin),
        None,
    )
    .await;
    assert_eq!((status, deleted), (200, json!({})));
    assert_eq!(
        identity
            .get_user(authed(GetUserRequest { name: bob_name }, admin))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    covered.mark("DELETE", "/v1/{name=users/*}");

    // The table must grow with the API: every binding the gateway serves was exercised above.
    let served = keel::app::grpc_names(keel::config::ServiceName::ALL);
    let pool = prost_reflect::DescriptorPool::decode(keel::proto::FILE_DESCRIPTOR_SET).unwrap();
    let table = keel_gateway::RouteTable::from_pool(&pool).unwrap();
    let expected: BTreeSet<(String, String)> = table
        .routes()
        .iter()
        .filter(|r| served.contains(&r.method.parent_service().full_name()))
        .map(|r| (r.http_method.to_string(), r.template.to_string()))
        .collect();
    let missing: Vec<_> = expected.difference(&covered.0).collect();
    assert!(
        missing.is_empty(),
        "REST bindings without a parity case: {missing:?}"
    );
}

/// The total of `grpc_server_started_total`: how many calls reached a gRPC service.
async fn backend_calls(app: &TestApp) -> f64 {
    app.metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("grpc_server_started_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

async fn raw(app: &TestApp, method: Method, path: &str, body: &str) -> reqwest::Response {
    reqwest::Client::new()
        .request(method, format!("http://{}{path}", app.http_addr))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_clear_4xx_and_never_reach_a_backend() {
    let app = TestApp::spawn_with(Stores::Embedded, |s| s.max_message_bytes = 1024).await;
    let before = backend_calls(&app).await;
    let cases: Vec<(Method, &str, String, u16, &str)> = vec![
        (
            Method::POST,
            "/v1/auth:login",
            "{not json".into(),
            400,
            "malformed JSON",
        ),
        (
            Method::POST,
            "/v1/auth:login",
            r#"{"email": 42, "password": "x"}"#.into(),
            400,
            "invalid email",
        ),
        (
            Method::POST,
            "/v1/auth:login",
            r#"{"email": "a@b.co", "password": "x", "colour": "red"}"#.into(),
            400,
            "colour",
        ),
        (
            Method::POST,
            "/v1/auth:login",
            "[1, 2]".into(),
            400,
            "JSON object",
        ),
        (
            Method::GET,
            "/v1/users/me/todos?pageSize=ten",
            String::new(),
            400,
            "pageSize",
        ),
        (
            Method::GET,
            "/v1/users/me/todos?shoeSize=10",
            String::new(),
            400,
            "shoeSize",
        ),
        (
            Method::POST,
            "/v1/auth:login?x=1",
            "{}".into(),
            400,
            "query string",
        ),
        (Method::GET, "/v1/users/", String::new(), 404, "no route"),
        (Method::GET, "/v2/nothing", String::new(), 404, "no route"),
        (
            Method::POST,
            "/v1/auth:register",
            format!(r#"{{"email":"{}"}}"#, "x".repeat(2000)),
            413,
            "larger than",
        ),
    ];
    for (method, path, body, status, message) in cases {
        let response = raw(&app, method.clone(), path, &body).await;
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["message"].as_str().unwrap().contains(message),
            "{method} {path}: {body}"
        );
        assert!(
            body["code"].is_i64() && body["details"].is_array(),
            "{body}"
        );
    }
    let response = raw(&app, Method::DELETE, "/v1/auth:login", "").await;
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    assert_eq!(
        backend_calls(&app).await,
        before,
        "no call reached a backend"
    );

    // A violation names its field.
    for (method, path, body, field) in [
        (
            Method::GET,
            "/v1/users/me/todos?shoeSize=10",
            "",
            "shoeSize",
        ),
        (
            Method::GET,
            "/v1/users/me/todos?pageSize=ten",
            "",
            "pageSize",
        ),
        (Method::POST, "/v1/auth:login", r#"{"email": 42}"#, "email"),
        (
            Method::POST,
            "/v1/auth:login",
            r#"{"colour": "red"}"#,
            "colour",
        ),
    ] {
        let response = raw(&app, method, path, body).await;
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["details"][0]["@type"],
            "type.googleapis.com/google.rpc.BadRequest"
        );
        assert_eq!(
            body["details"][0]["fieldViolations"][0]["field"], field,
            "{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_keep_their_code_and_details() {
    let app = TestApp::spawn(Stores::Embedded).await;
    let people = app.people().await;
    let (status, body) = rest(
        &app,
        Method::POST,
        "/v1/auth:register",
        None,
        Some(json!({"email": "nope", "password": PASSWORD})),
    )
    .await;
    assert_eq!((status, body["code"].as_i64()), (400, Some(3)));
    assert_eq!(body["details"][0]["fieldViolations"][0]["field"], "email");
    let (status, body) = rest(&app, Method::GET, "/v1/users/me", None, None).await;
    assert_eq!((status, body["code"].as_i64()), (401, Some(16)));
    let (status, body) = rest(&app, Method::GET, "/v1/users", Some(&people.ada), None).await;
    assert_eq!((status, body["code"].as_i64()), (403, Some(7)));
    let (status, body) = rest(
        &app,
        Method::GET,
        &format!("/v1/products/{}", uuid::Uuid::now_v7()),
        None,
        None,
    )
    .await;
    assert_eq!((status, body["code"].as_i64()), (404, Some(5)));
    let (status, body) = rest(&app, Method::GET, "/v1/users/me", Some("garbage"), None).await;
    assert_eq!((status, body["code"].as_i64()), (401, Some(16)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_crosses_and_deadlines_apply() {
    let app = TestApp::spawn(Stores::Embedded).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/auth/jwks", app.http_addr);
    let response = client
        .get(&url)
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-42", "echoed");
    let response = client.get(&url).send().await.unwrap();
    assert_eq!(
        response.headers()["x-request-id"].len(),
        36,
        "generated when absent"
    );

    // A deadline the backend cannot meet.
    let login = format!("http://{}/v1/auth:login", app.http_addr);
    let response = client
        .post(&login)
        .header("grpc-timeout", "1u")
        .json(&json!({"email": "a@example.com", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert!(
        matches!(response.status().as_u16(), 504 | 499),
        "{}",
        response.status()
    );
    let response = client
        .post(&login)
        .header("x-timeout", "soon")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_sets_security_headers_cors_and_compression() {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.cors_origins = vec!["https://app.example.com".into()]
    })
    .await;
    let client = reqwest::Client::builder().gzip(true).build().unwrap();
    let response = client
        .get(format!("http://{}/openapi.json", app.http_addr))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
    ] {
        assert_eq!(response.headers()[name], value);
    }
    assert!(
        response
            .headers()
            .get("strict-transport-security")
            .is_none(),
        "HSTS only behind TLS"
    );
    let document: Value = response.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");

    // The gateway answers health and metrics on its own port too.
    let ready = client
        .get(format!("http://{}/readyz", app.http_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    client
        .get(format!("http://{}/v1/auth/jwks", app.http_addr))
        .send()
        .await
        .unwrap();
    let metrics = client
        .get(format!("http://{}/metrics", app.http_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = r#"http_requests_total{method="GET",route="/v1/auth/jwks",status="200"}"#;
    assert_eq!(
        keel_testkit::http::metric(&metrics, series),
        1.0,
        "{metrics}"
    );

    let raw = reqwest::Client::builder().no_gzip().build().unwrap();
    let compressed = raw
        .get(format!("http://{}/openapi.json", app.http_addr))
        .header("accept-encoding", "gzip")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(compressed.headers()["content-encoding"], "gzip");
    assert!(
        compressed
            .headers()
            .contains_key("strict-transport-security")
    );

    let preflight = raw
        .request(
            Method::OPTIONS,
            format!("http://{}/v1/users/me", app.http_addr),
        )
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let stranger = raw
        .request(
            Method::OPTIONS,
            format!("http://{}/v1/users/me", app.http_addr),
        )
        .header("origin", "https://evil.example.com")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(
        stranger
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

/// Ten logins per minute per client IP; the eleventh waits. Another client IP is unaffected.
async fn the_eleventh_login_is_refused(app: &TestApp) {
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(ip))
            .build()
            .unwrap()
    };
    let (first, second) = (from([127, 0, 0, 1]), from([127, 0, 0, 2]));
    let login = format!("http://{}/v1/auth:login", app.http_addr);
    let body = json!({"email": "nobody@example.com", "password": PASSWORD});
    for _ in 0..10 {
        let response = first.post(&login).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 401, "wrong credentials, but admitted");
    }
    let refused = first.post(&login).json(&body).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=6).contains(&retry_after), "{retry_after}");
    let status: Value = refused.json().await.unwrap();
    assert_eq!(status["code"], Code::ResourceExhausted as i32);
    assert!(
        status["details"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo")
    );
    let other = second.post(&login).json(&body).send().await.unwrap();
    assert_eq!(other.status(), 401, "another client is unaffected");
}

on_both_stores! {
    async fn sign_in_is_rate_limited_per_client(app: TestApp) {
        the_eleventh_login_is_refused(&app).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_is_a_503_with_a_status_body() {
    let dead = keel_testkit::loopback_listener().await;
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let channel = tonic::transport::Channel::from_shared(format!("http://{dead_addr}"))
        .unwrap()
        .connect_lazy();
    let config = keel_gateway::GatewayConfig {
        services: vec!["keel.identity.v1.IdentityService".into()],
        max_body_bytes: 1 << 20,
        cors_origins: vec![],
        quota: None,
        strict_quota: None,
        strict_paths: vec![],
        title: "t".into(),
        version: "v".into(),
    };
    let metrics = keel_gateway::HttpMetrics::register(&prometheus::Registry::new()).unwrap();
    let gateway = std::sync::Arc::new(
        keel_gateway::Gateway::new(
            keel::proto::FILE_DESCRIPTOR_SET,
            keel_gateway::Backends::all(channel),
            keel_gateway::RateLimiter::local(),
            None,
            metrics,
            config,
        )
        .unwrap(),
    );
    let listener = keel_testkit::loopback_listener().await;
    let addr = listener.local_addr().unwrap();
    let app = gateway
        .router(axum::Router::new())
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let response = reqwest::get(format!("http://{addr}/v1/auth/jwks"))
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], Code::Unavailable as i32);
    // Only the configured services are routed.
    let response = reqwest::get(format!("http://{addr}/v1/products"))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}
