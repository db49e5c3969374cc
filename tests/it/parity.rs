//! REST/gRPC parity as a table: every REST binding the gateway serves answers what the same call
//! made directly over gRPC answers. Each case is a REST request and the gRPC call a client would
//! make instead (its request written as proto3 JSON, sent with a generic codec); the table must
//! cover every binding of every served service, so it grows with the API.

use crate::support;

use std::collections::BTreeSet;

use keel_gateway::call::RawCodec;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};
use reqwest::Method;
use serde_json::{Value, json};
use support::{PASSWORD, Stores, TestApp, authed, rest_over};
use tonic::codegen::Bytes;

/// How a REST answer must match the gRPC one.
#[derive(Debug, Clone, Copy)]
enum Compare {
    /// The same JSON.
    Same,
    /// The same fields of the same kinds, all the way down: calls that mint something new each
    /// time (tokens, users).
    SameShape,
    /// The same JSON but for these top-level fields (an update's `updateTime`).
    SameBut(&'static [&'static str]),
    /// The same top-level fields: the same kind of answer about different resources whose
    /// state moves on its own (an order the saga is working on).
    SameFields,
}

/// One row of the table.
struct Case {
    binding: (&'static str, &'static str),
    rest: (Method, String, Option<String>, Option<Value>),
    grpc: (&'static str, Option<String>, Value),
    compare: Compare,
}

impl Case {
    /// The binding `method template` as the route table names it.
    fn binding(method: &'static str, template: &'static str) -> CaseBuilder {
        CaseBuilder {
            binding: (method, template),
            rest: None,
        }
    }
}

struct CaseBuilder {
    binding: (&'static str, &'static str),
    rest: Option<(Method, String, Option<String>, Option<Value>)>,
}

impl CaseBuilder {
    /// The REST request: method, path and query, bearer token, JSON body.
    fn rest(
        mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Self {
        self.rest = Some((method, path.to_owned(), token.map(str::to_owned), body));
        self
    }

    /// The gRPC call: `package.Service/Method`, bearer token, the request as proto3 JSON.
    fn grpc(self, method: &'static str, token: Option<&str>, request: Value) -> Case {
        Case {
            binding: self.binding,
            rest: self.rest.expect("the REST request comes first"),
            grpc: (method, token.map(str::to_owned), request),
            compare: Compare::Same,
        }
    }
}

impl Case {
    fn compared(mut self, compare: Compare) -> Self {
        self.compare = compare;
        self
    }
}

/// A call of `method` with the request given as proto3 JSON, answered as proto3 JSON: the
/// response of a unary call, or the array of every message of a server stream.
async fn grpc_json(
    app: &TestApp,
    pool: &DescriptorPool,
    method: &str,
    token: Option<&str>,
    request: &Value,
) -> Result<Value, tonic::Status> {
    let (service, name) = method.split_once('/').expect("Service/Method");
    let descriptor = pool
        .get_service_by_name(service)
        .and_then(|s| s.methods().find(|m| m.name() == name))
        .unwrap_or_else(|| panic!("no method {method}"));
    let message = DynamicMessage::deserialize(descriptor.input(), request)
        .unwrap_or_else(|e| panic!("{method} request {request}: {e}"));
    let body = Bytes::from(message.encode_to_vec());
    let request = match token {
        Some(token) => authed(body, token),
        None => tonic::Request::new(body),
    };
    let mut grpc = tonic::client::Grpc::new(app.channel().await);
    grpc.ready().await.expect("channel ready");
    let path =
        tonic::codegen::http::uri::PathAndQuery::try_from(format!("/{method}")).expect("path");
    let as_json = |bytes: Bytes| {
        let answer = DynamicMessage::decode(descriptor.output(), bytes).expect("a message");
        let json = keel_gateway::transcode::to_json(&answer, None).expect("proto3 JSON");
        serde_json::from_slice::<Value>(&json).expect("JSON")
    };
    if descriptor.is_server_streaming() {
        let mut stream = grpc
            .server_streaming(request, path, RawCodec)
            .await?
            .into_inner();
        let mut messages = Vec::new();
        while let Some(message) = stream.message().await? {
            messages.push(as_json(message));
        }
        return Ok(Value::Array(messages));
    }
    Ok(as_json(
        grpc.unary(request, path, RawCodec).await?.into_inner(),
    ))
}

/// A REST call of a server-streaming binding, answered as NDJSON: every line, as an array.
async fn rest_stream(
    client: &reqwest::Client,
    app: &TestApp,
    path: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let mut request = client.get(format!("{}{path}", app.rest_base));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("REST call");
    let status = response.status().as_u16();
    let text = response.text().await.expect("REST body");
    let lines = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    (status, Value::Array(lines))
}

/// The kinds of `value`'s fields, all the way down.
fn shape(value: &Value) -> Value {
    match value {
        Value::Object(fields) => fields
            .iter()
            .map(|(k, v)| (k.clone(), shape(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        Value::Array(items) => items.iter().map(shape).collect(),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => Value::Null,
    }
}

/// The names of `value`'s top-level fields.
fn fields(value: &Value) -> Value {
    value
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn without(value: &Value, fields: &[&str]) -> Value {
    let mut value = value.clone();
    if let Some(object) = value.as_object_mut() {
        for field in fields {
            object.remove(*field);
        }
    }
    value
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A registered user: access token, refresh token, resource name.
struct Person {
    token: String,
    name: String,
}

async fn person(app: &TestApp, email: &str) -> Person {
    let registered = app.register(email).await;
    Person {
        token: registered.access_token,
        name: registered.user.expect("the user").name,
    }
}

/// The subject of the e-mail that carries a new account's code.
const WELCOME: &str = "Welcome to keel";

/// What the table reads and writes, made over gRPC first.
struct World {
    admin: Person,
    ada: Person,
    bob: Person,
    carol: Person,
    refresh: [String; 4],
    todos: [String; 3],
    products: [String; 3],
    /// A job scheduled far ahead (it stays QUEUED), and two dead ones.
    jobs: [String; 3],
    /// Three of Ada's orders, CONFIRMED.
    orders: [String; 3],
    /// The codes of Bob's and Carol's welcome e-mails.
    codes: [String; 2],
}

/// Ada's order of one `product`, placed over gRPC and waited for until CONFIRMED.
async fn confirmed_order(app: &TestApp, pool: &DescriptorPool, ada: &str, product: &str) -> String {
    let placed = grpc_json(
        app,
        pool,
        "keel.orders.v1.OrderService/PlaceOrder",
        Some(ada),
        &json!({
            "parent": "users/me",
            "order": {"lineItems": [{"product": product, "quantity": 1}]},
            "requestId": uuid(),
        }),
    )
    .await
    .unwrap();
    let name = placed["name"].as_str().unwrap().to_owned();
    keel_testkit::eventually(
        std::time::Duration::from_secs(20),
        "the order to be confirmed",
        || async {
            let order = grpc_json(
                app,
                pool,
                "keel.orders.v1.OrderService/GetOrder",
                Some(ada),
                &json!({"name": name}),
            )
            .await
            .unwrap();
            (order["state"] == "CONFIRMED").then_some(())
        },
    )
    .await;
    name
}

/// A `noop` job made by `token` over gRPC: `fail`ing every attempt, or scheduled a day ahead.
async fn noop_job(app: &TestApp, pool: &DescriptorPool, token: &str, fail: bool) -> String {
    let job = if fail {
        json!({"type": "noop", "payload": {"fail": "on purpose"}})
    } else {
        json!({"type": "noop", "scheduleTime": "2099-01-01T00:00:00Z"})
    };
    let created = grpc_json(
        app,
        pool,
        "keel.jobs.v1.JobService/CreateJob",
        Some(token),
        &json!({"job": job}),
    )
    .await
    .unwrap();
    created["name"].as_str().unwrap().to_owned()
}

async fn world(app: &TestApp, pool: &DescriptorPool) -> World {
    let admin = person(app, "admin@example.com").await;
    let ada = person(app, "ada@example.com").await;
    let bob = person(app, "bob@example.com").await;
    let carol = person(app, "carol@example.com").await;
    // Sessions of someone no other row uses: signing out ends every access token of theirs.
    app.register("dave@example.com").await;
    let mut refresh: [String; 4] = Default::default();
    for token in &mut refresh {
        *token = app.login("dave@example.com").await.1;
    }
    let mut todos: [String; 3] = Default::default();
    for (k, todo) in todos.iter_mut().enumerate() {
        let request = json!({"parent": "users/me", "todo": {"title": format!("todo {k}")}});
        let created = grpc_json(
            app,
            pool,
            "keel.todos.v1.TodoService/CreateTodo",
            Some(&ada.token),
            &request,
        )
        .await
        .unwrap();
        *todo = created["name"].as_str().unwrap().to_owned();
    }
    let mut products: [String; 3] = Default::default();
    for (k, product) in products.iter_mut().enumerate() {
        let request = json!({"product": {
            "title": format!("Lamp {k}"),
            "price": {"currencyCode": "EUR", "units": 2500 + k},
            "stock": 7,
        }});
        let created = grpc_json(
            app,
            pool,
            "keel.catalog.v1.CatalogService/CreateProduct",
            Some(&admin.token),
            &request,
        )
        .await
        .unwrap();
        *product = created["name"].as_str().unwrap().to_owned();
    }
    let later = noop_job(app, pool, &admin.token, false).await;
    let doomed = [
        noop_job(app, pool, &admin.token, true).await,
        noop_job(app, pool, &admin.token, true).await,
    ];
    for name in &doomed {
        keel_testkit::eventually(
            std::time::Duration::from_secs(20),
            "a failing job to be dead",
            || async {
                let job = grpc_json(
                    app,
                    pool,
                    "keel.jobs.v1.JobService/GetJob",
                    Some(&admin.token),
                    &json!({"name": name}),
                )
                .await
                .unwrap();
                (job["state"] == "DEAD").then_some(())
            },
        )
        .await;
    }
    let [first_dead, second_dead] = doomed;
    grpc_json(
        app,
        pool,
        "keel.payments.v1.PaymentService/TopUpWallet",
        Some(&ada.token),
        &json!({
            "name": "users/me/wallet",
            "amount": {"currencyCode": "EUR", "units": 100_000},
            "requestId": uuid(),
        }),
    )
    .await
    .unwrap();
    let mut orders: [String; 3] = Default::default();
    for order in &mut orders {
        *order = confirmed_order(app, pool, &ada.token, &products[0]).await;
    }
    World {
        admin,
        ada,
        bob,
        carol,
        refresh,
        todos,
        products,
        jobs: [later, first_dead, second_dead],
        orders,
        codes: [
            app.mailed_code("bob@example.com", WELCOME).await,
            app.mailed_code("carol@example.com", WELCOME).await,
        ],
    }
}

/// The table, in the order it runs: reads before the writes that would change them, deletes
/// last.
fn table(w: &World) -> Vec<Case> {
    let (admin, ada) = (Some(w.admin.token.as_str()), Some(w.ada.token.as_str()));
    let (todo, first_gone, second_gone) = (&w.todos[0], &w.todos[1], &w.todos[2]);
    let (product, first_sold_out, second_sold_out) =
        (&w.products[0], &w.products[1], &w.products[2]);
    let (todo_key, product_key, top_up_key, job_key) = (uuid(), uuid(), uuid(), uuid());
    let (later_job, first_dead, second_dead) = (&w.jobs[0], &w.jobs[1], &w.jobs[2]);
    let (order, first_cancelled, second_cancelled) = (&w.orders[0], &w.orders[1], &w.orders[2]);
    let order_key = uuid();
    // Two jobs under request ids: both calls answer the same two.
    let later = json!({"type": "noop", "scheduleTime": "2099-01-01T00:00:00Z"});
    let batch = json!([
        {"job": later, "requestId": uuid()},
        {"job": later, "requestId": uuid()},
    ]);
    let line = json!([{"product": product, "quantity": 1}]);
    let eur = |units: i64| json!({"currencyCode": "EUR", "units": units.to_string()});
    vec![
        // identity
        Case::binding("POST", "/v1/auth:register")
            .rest(
                Method::POST,
                "/v1/auth:register",
                None,
                Some(json!({"email": "rest@example.com", "password": PASSWORD})),
            )
            .grpc(
                "keel.identity.v1.IdentityService/Register",
                None,
                json!({"email": "grpc@example.com", "password": PASSWORD}),
            )
            .compared(Compare::SameShape),
        Case::binding("POST", "/v1/auth:login")
            .rest(
                Method::POST,
                "/v1/auth:login",
                None,
                Some(json!({"email": "ada@example.com", "password": PASSWORD})),
            )
            .grpc(
                "keel.identity.v1.IdentityService/Login",
                None,
                json!({"email": "ada@example.com", "password": PASSWORD}),
            )
            .compared(Compare::SameShape),
        Case::binding("POST", "/v1/auth:refresh")
            .rest(
                Method::POST,
                "/v1/auth:refresh",
                None,
                Some(json!({"refreshToken": w.refresh[0]})),
            )
            .grpc(
                "keel.identity.v1.IdentityService/RefreshToken",
                None,
                json!({"refreshToken": w.refresh[1]}),
            )
            .compared(Compare::SameShape),
        Case::binding("POST", "/v1/auth:logout")
            .rest(
                Method::POST,
                "/v1/auth:logout",
                None,
                Some(json!({"refreshToken": w.refresh[2]})),
            )
            .grpc(
                "keel.identity.v1.IdentityService/Logout",
                None,
                json!({"refreshToken": w.refresh[3]}),
            ),
        Case::binding("GET", "/v1/{name=users/*}")
            .rest(Method::GET, "/v1/users/me", ada, None)
            .grpc(
                "keel.identity.v1.IdentityService/GetUser",
                ada,
                json!({"name": "users/me"}),
            ),
        Case::binding("GET", "/v1/users")
            .rest(Method::GET, "/v1/users?pageSize=2", admin, None)
            .grpc(
                "keel.identity.v1.IdentityService/ListUsers",
                admin,
                json!({"pageSize": 2}),
            ),
        Case::binding("PATCH", "/v1/{user.name=users/*}")
            .rest(
                Method::PATCH,
                "/v1/users/me?updateMask=displayName",
                ada,
                Some(json!({"displayName": "Ada L."})),
            )
            .grpc(
                "keel.identity.v1.IdentityService/UpdateUser",
                ada,
                json!({
                    "user": {"name": "users/me", "displayName": "Ada L."},
                    "updateMask": "displayName",
                }),
            )
            .compared(Compare::SameBut(&["updateTime"])),
        Case::binding("GET", "/v1/auth/jwks")
            .rest(Method::GET, "/v1/auth/jwks", None, None)
            .grpc("keel.identity.v1.IdentityService/GetJwks", None, json!({})),
        Case::binding("GET", "/.well-known/jwks.json")
            .rest(Method::GET, "/.well-known/jwks.json", None, None)
            .grpc("keel.identity.v1.IdentityService/GetJwks", None, json!({})),
        // todos
        Case::binding("POST", "/v1/{parent=users/*}/todos")
            .rest(
                Method::POST,
                &format!("/v1/users/me/todos?requestId={todo_key}"),
                ada,
                Some(json!({"title": "parity"})),
            )
            .grpc(
                "keel.todos.v1.TodoService/CreateTodo",
                ada,
                json!({"parent": "users/me", "todo": {"title": "parity"}, "requestId": todo_key}),
            ),
        Case::binding("GET", "/v1/{name=users/*/todos/*}")
            .rest(Method::GET, &format!("/v1/{todo}"), ada, None)
            .grpc(
                "keel.todos.v1.TodoService/GetTodo",
                ada,
                json!({"name": todo}),
            ),
        Case::binding("GET", "/v1/{parent=users/*}/todos")
            .rest(
                Method::GET,
                "/v1/users/me/todos?filter=completed%3Dfalse&pageSize=2",
                ada,
                None,
            )
            .grpc(
                "keel.todos.v1.TodoService/ListTodos",
                ada,
                json!({"parent": "users/me", "filter": "completed=false", "pageSize": 2}),
            ),
        Case::binding("PATCH", "/v1/{todo.name=users/*/todos/*}")
            .rest(
                Method::PATCH,
                &format!("/v1/{todo}?updateMask=completed"),
                ada,
                Some(json!({"completed": true})),
            )
            .grpc(
                "keel.todos.v1.TodoService/UpdateTodo",
                ada,
                json!({"todo": {"name": todo, "completed": true}, "updateMask": "completed"}),
            )
            .compared(Compare::SameBut(&["updateTime"])),
        Case::binding("DELETE", "/v1/{name=users/*/todos/*}")
            .rest(Method::DELETE, &format!("/v1/{first_gone}"), ada, None)
            .grpc(
                "keel.todos.v1.TodoService/DeleteTodo",
                ada,
                json!({"name": second_gone}),
            ),
        // catalog
        Case::binding("POST", "/v1/products")
            .rest(
                Method::POST,
                &format!("/v1/products?requestId={product_key}"),
                admin,
                Some(json!({"title": "Chair", "price": eur(4000), "stock": "3"})),
            )
            .grpc(
                "keel.catalog.v1.CatalogService/CreateProduct",
                admin,
                json!({
                    "product": {"title": "Chair", "price": eur(4000), "stock": 3},
                    "requestId": product_key,
                }),
            ),
        Case::binding("GET", "/v1/{name=products/*}")
            .rest(Method::GET, &format!("/v1/{product}"), None, None)
            .grpc(
                "keel.catalog.v1.CatalogService/GetProduct",
                None,
                json!({"name": product}),
            ),
        Case::binding("GET", "/v1/products")
            .rest(
                Method::GET,
                "/v1/products?orderBy=price%20desc&filter=in_stock%20%3D%20true&pageSize=2",
                None,
                None,
            )
            .grpc(
                "keel.catalog.v1.CatalogService/ListProducts",
                None,
                json!({"orderBy": "price desc", "filter": "in_stock = true", "pageSize": 2}),
            ),
        Case::binding("GET", "/v1/products:batchGet")
            .rest(
                Method::GET,
                &format!("/v1/products:batchGet?names={product}&names={first_sold_out}"),
                None,
                None,
            )
            .grpc(
                "keel.catalog.v1.CatalogService/BatchGetProducts",
                None,
                json!({"names": [product, first_sold_out]}),
            ),
        Case::binding("PATCH", "/v1/{product.name=products/*}")
            .rest(
                Method::PATCH,
                &format!("/v1/{product}?updateMask=price"),
                admin,
                Some(json!({"price": eur(1999)})),
            )
            .grpc(
                "keel.catalog.v1.CatalogService/UpdateProduct",
                admin,
                json!({"product": {"name": product, "price": eur(1999)}, "updateMask": "price"}),
            )
            // Two updates, one after the other: each moves the version on.
            .compared(Compare::SameBut(&["updateTime", "etag"])),
        Case::binding("DELETE", "/v1/{name=products/*}")
            .rest(
                Method::DELETE,
                &format!("/v1/{first_sold_out}"),
                admin,
                None,
            )
            .grpc(
                "keel.catalog.v1.CatalogService/DeleteProduct",
                admin,
                json!({"name": second_sold_out}),
            ),
        // payments
        Case::binding("POST", "/v1/{name=users/*/wallet}:topUp")
            .rest(
                Method::POST,
                "/v1/users/me/wallet:topUp",
                ada,
                Some(json!({"amount": eur(500), "requestId": top_up_key})),
            )
            .grpc(
                "keel.payments.v1.PaymentService/TopUpWallet",
                ada,
                json!({"name": "users/me/wallet", "amount": eur(500), "requestId": top_up_key}),
            ),
        Case::binding("GET", "/v1/{name=users/*/wallet}")
            .rest(Method::GET, "/v1/users/me/wallet", ada, None)
            .grpc(
                "keel.payments.v1.PaymentService/GetWallet",
                ada,
                json!({"name": "users/me/wallet"}),
            ),
        Case::binding("GET", "/v1/{parent=users/*/wallet}/transactions")
            .rest(Method::GET, "/v1/users/me/wallet/transactions", ada, None)
            .grpc(
                "keel.payments.v1.PaymentService/ListTransactions",
                ada,
                json!({"parent": "users/me/wallet"}),
            ),
        // orders
        Case::binding("GET", "/v1/{name=users/*/orders/*}")
            .rest(Method::GET, &format!("/v1/{order}"), ada, None)
            .grpc(
                "keel.orders.v1.OrderService/GetOrder",
                ada,
                json!({"name": order}),
            ),
        Case::binding("GET", "/v1/{name=users/*/orders/*}:watch")
            .rest(Method::GET, &format!("/v1/{order}:watch"), ada, None)
            .grpc(
                "keel.orders.v1.OrderService/WatchOrder",
                ada,
                json!({"name": order}),
            ),
        Case::binding("GET", "/v1/{parent=users/*}/orders")
            .rest(Method::GET, "/v1/users/me/orders?pageSize=2", ada, None)
            .grpc(
                "keel.orders.v1.OrderService/ListOrders",
                ada,
                json!({"parent": "users/me", "pageSize": 2}),
            ),
        Case::binding("POST", "/v1/{parent=users/*}/orders")
            .rest(
                Method::POST,
                &format!("/v1/users/me/orders?requestId={order_key}"),
                ada,
                Some(json!({"lineItems": line})),
            )
            .grpc(
                "keel.orders.v1.OrderService/PlaceOrder",
                ada,
                json!({
                    "parent": "users/me",
                    "order": {"lineItems": line},
                    "requestId": order_key,
                }),
            )
            // The same order, which the saga may have moved on between the two answers.
            .compared(Compare::SameBut(&["state", "history", "updateTime"])),
        Case::binding("POST", "/v1/{name=users/*/orders/*}:cancel")
            .rest(
                Method::POST,
                &format!("/v1/{first_cancelled}:cancel"),
                ada,
                Some(json!({})),
            )
            .grpc(
                "keel.orders.v1.OrderService/CancelOrder",
                ada,
                json!({"name": second_cancelled}),
            )
            .compared(Compare::SameFields),
        // jobs
        Case::binding("POST", "/v1/jobs")
            .rest(
                Method::POST,
                &format!("/v1/jobs?requestId={job_key}"),
                admin,
                Some(json!({"type": "noop", "scheduleTime": "2099-01-01T00:00:00Z"})),
            )
            .grpc(
                "keel.jobs.v1.JobService/CreateJob",
                admin,
                json!({
                    "job": {"type": "noop", "scheduleTime": "2099-01-01T00:00:00Z"},
                    "requestId": job_key,
                }),
            ),
        Case::binding("POST", "/v1/jobs:batchCreate")
            .rest(
                Method::POST,
                "/v1/jobs:batchCreate",
                admin,
                Some(json!({"requests": batch})),
            )
            .grpc(
                "keel.jobs.v1.JobService/BatchCreateJobs",
                admin,
                json!({"requests": batch}),
            ),
        Case::binding("GET", "/v1/{name=jobs/*}")
            .rest(Method::GET, &format!("/v1/{later_job}"), admin, None)
            .grpc(
                "keel.jobs.v1.JobService/GetJob",
                admin,
                json!({"name": later_job}),
            ),
        Case::binding("GET", "/v1/jobs")
            .rest(
                Method::GET,
                "/v1/jobs?filter=type%20%3D%20noop%20AND%20state%20%3D%20QUEUED",
                admin,
                None,
            )
            .grpc(
                "keel.jobs.v1.JobService/ListJobs",
                admin,
                json!({"filter": "type = noop AND state = QUEUED"}),
            ),
        Case::binding("POST", "/v1/{name=jobs/*}:retry")
            .rest(
                Method::POST,
                &format!("/v1/{first_dead}:retry"),
                admin,
                Some(json!({})),
            )
            .grpc(
                "keel.jobs.v1.JobService/RetryJob",
                admin,
                json!({"name": second_dead}),
            )
            .compared(Compare::SameShape),
        Case::binding("POST", "/v1/{name=users/*}:confirmEmail")
            .rest(
                Method::POST,
                "/v1/users/me:confirmEmail",
                Some(w.bob.token.as_str()),
                Some(json!({"code": w.codes[0]})),
            )
            .grpc(
                "keel.identity.v1.IdentityService/ConfirmEmail",
                Some(w.carol.token.as_str()),
                json!({"name": "users/me", "code": w.codes[1]}),
            )
            .compared(Compare::SameShape),
        // identity, last: deleting users revokes nothing the rows above need.
        Case::binding("DELETE", "/v1/{name=users/*}")
            .rest(Method::DELETE, &format!("/v1/{}", w.bob.name), admin, None)
            .grpc(
                "keel.identity.v1.IdentityService/DeleteUser",
                admin,
                json!({"name": w.carol.name}),
            ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rest_binding_answers_what_grpc_answers_over_http1() {
    let client = reqwest::Client::builder().http1_only().build().unwrap();
    every_rest_binding_answers_what_grpc_answers(&client, None).await;
}

/// The REST port speaks HTTP/2 without TLS (h2c, prior knowledge) as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rest_binding_answers_what_grpc_answers_over_h2c() {
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    every_rest_binding_answers_what_grpc_answers(&client, None).await;
}

/// And HTTP/2 over TLS, chosen by ALPN, when it serves HTTPS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rest_binding_answers_what_grpc_answers_over_tls_h2() {
    let certs = tempfile::tempdir().unwrap();
    keel_devcerts::write_all(certs.path(), &["gateway"]).unwrap();
    let ca = std::fs::read(certs.path().join("ca.pem")).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .https_only(true)
        .build()
        .unwrap();
    every_rest_binding_answers_what_grpc_answers(&client, Some(certs.path())).await;
}

/// The parity table over `client`, with the REST port serving TLS with the development
/// certificate `gateway` in `certs` when given.
async fn every_rest_binding_answers_what_grpc_answers(
    client: &reqwest::Client,
    certs: Option<&std::path::Path>,
) {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        // A failing job is dead at its first attempt.
        s.jobs.job_max_attempts = 1;
        if let Some(certs) = certs {
            s.edge.http_tls_cert = Some(certs.join("gateway.pem"));
            s.edge.http_tls_key = Some(certs.join("gateway-key.pem"));
        }
    })
    .await;
    let pool = DescriptorPool::decode(keel::proto::FILE_DESCRIPTOR_SET).unwrap();
    let world = world(&app, &pool).await;
    let mut covered = BTreeSet::new();
    for case in table(&world) {
        let (method, template) = case.binding;
        let (verb, path, token, body) = case.rest;
        let (status, over_rest) = if path.ends_with(":watch") {
            rest_stream(client, &app, &path, token.as_deref()).await
        } else {
            rest_over(client, &app, verb, &path, token.as_deref(), body).await
        };
        let (grpc_method, token, request) = case.grpc;
        let over_grpc = grpc_json(&app, &pool, grpc_method, token.as_deref(), &request)
            .await
            .unwrap_or_else(|s| panic!("{method} {template}: gRPC {grpc_method} failed: {s:?}"));
        assert_eq!(status, 200, "{method} {template}: {over_rest}");
        let (rest_view, grpc_view) = match case.compare {
            Compare::Same => (over_rest, over_grpc),
            Compare::SameShape => (shape(&over_rest), shape(&over_grpc)),
            Compare::SameBut(fields) => (without(&over_rest, fields), without(&over_grpc, fields)),
            Compare::SameFields => (fields(&over_rest), fields(&over_grpc)),
        };
        assert_eq!(
            rest_view, grpc_view,
            "{method} {template}: REST and gRPC differ"
        );
        covered.insert((method.to_owned(), template.to_owned()));
    }

    // The table grows with the API: every binding of every served service has its row.
    let served = keel::domain::grpc_names(keel::registry::DOMAINS);
    let routes = keel_gateway::RouteTable::from_pool(&pool).unwrap();
    let expected: BTreeSet<(String, String)> = routes
        .routes()
        .iter()
        .filter(|r| served.contains(&r.method.parent_service().full_name()))
        .map(|r| (r.http_method.to_string(), r.template.to_string()))
        .collect();
    let missing: Vec<_> = expected.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "REST bindings without a parity case: {missing:?}"
    );
}
