//! Security at every door: sign-in is limited by the method called, not the path's spelling nor
//! the protocol; accounts under attack from many addresses are slowed, and recover; the client
//! behind a proxy is believed only when the proxy is trusted; a flood of sign-ins is refused
//! past a bounded queue while reads go on; signing keys rotate; in production an admin is named
//! by the operator or proves a listed mailbox, and an address change waits for the mailed code.

use crate::support;

use std::net::IpAddr;

use keel::config::RateLimit;
use keel::proto::keel::identity::v1::identity_service_client::IdentityServiceClient;
use keel::proto::keel::identity::v1::{GetJwksRequest, GetUserRequest, LoginRequest};
use reqwest::Method;
use serde_json::{Value, json};
use support::process::keel_command;
use support::{PASSWORD, Stores, TestApp, authed, expect_code};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

fn limit(quota: &str) -> RateLimit {
    quota.parse().expect("a quota")
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// A REST client whose connections come from `from`.
fn rest_from(from: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from)
        .build()
        .unwrap()
}

/// An identity client whose connections come from `from`.
async fn grpc_from(app: &TestApp, from: IpAddr) -> IdentityServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .local_address(Some(from))
        .connect()
        .await
        .unwrap();
    IdentityServiceClient::new(channel)
}

/// A wrong-password login for `email` over REST at `path` (however it is spelled).
async fn rest_login(app: &TestApp, client: &reqwest::Client, path: &str, email: &str) -> u16 {
    rest_login_as(app, client, path, email, "wrong password", &[])
        .await
        .0
}

async fn rest_login_as(
    app: &TestApp,
    client: &reqwest::Client,
    path: &str,
    email: &str,
    password: &str,
    headers: &[(&str, String)],
) -> (u16, Value, Option<String>) {
    let mut request = client
        .post(format!("http://{}{path}", app.http_addr))
        .json(&json!({"email": email, "password": password}));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, response.json().await.unwrap(), retry_after)
}

async fn grpc_login(identity: &mut IdentityServiceClient<Channel>, email: &str) -> Code {
    match identity
        .login(LoginRequest {
            email: email.into(),
            password: "wrong password".into(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_login_and_grpc_login_share_one_budget_per_address() {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.edge.auth_rate_limit = limit("4/60s");
        s.identity.login_failures = RateLimit(None);
    })
    .await;
    let here = rest_from(ip(1));
    let mut grpc_here = grpc_from(&app, ip(1)).await;
    // A new e-mail each time: the address is what is limited.
    assert_eq!(
        rest_login(&app, &here, "/v1/auth:login", "a@example.com").await,
        401
    );
    assert_eq!(
        rest_login(&app, &here, "/v1/%61uth:login", "b@example.com").await,
        401
    );
    assert_eq!(
        rest_login(&app, &here, "/v1/%61%75th:log%69n", "c@example.com").await,
        401
    );
    assert_eq!(
        grpc_login(&mut grpc_here, "d@example.com").await,
        Code::Unauthenticated
    );

    // The budget is spent, whatever the spelling or the protocol.
    for path in ["/v1/auth:login", "/v1/%61uth:login", "/v1/%61%75th:log%69n"] {
        assert_eq!(
            rest_login(&app, &here, path, "e@example.com").await,
            429,
            "{path}"
        );
    }
    let refused = grpc_here
        .login(LoginRequest {
            email: "f@example.com".into(),
            password: "wrong password".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.get_details_retry_info().is_some(), "{refused:?}");

    // Other addresses have budgets of their own.
    assert_eq!(
        rest_login(&app, &rest_from(ip(2)), "/v1/auth:login", "g@example.com").await,
        401
    );
    let mut grpc_elsewhere = grpc_from(&app, ip(3)).await;
    assert_eq!(
        grpc_login(&mut grpc_elsewhere, "h@example.com").await,
        Code::Unauthenticated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_two_gateways_share_one_sign_in_budget() {
    let first = TestApp::spawn_with(Stores::PostgresRedis, |s| {
        s.edge.auth_rate_limit = limit("3/60s");
        s.identity.login_failures = RateLimit(None);
    })
    .await;
    let shared = first.settings.stores.clone();
    let second = TestApp::spawn_with(Stores::Embedded, move |s| {
        s.stores = shared;
        s.edge.auth_rate_limit = limit("3/60s");
        s.identity.login_failures = RateLimit(None);
    })
    .await;
    let client = rest_from(ip(1));
    let login = "/v1/auth:login";
    assert_eq!(
        rest_login(&first, &client, login, "a@example.com").await,
        401
    );
    assert_eq!(
        rest_login(&second, &client, login, "b@example.com").await,
        401
    );
    assert_eq!(
        rest_login(&first, &client, login, "c@example.com").await,
        401
    );
    assert_eq!(
        rest_login(&second, &client, login, "d@example.com").await,
        429,
        "the second gateway counts the first one's sign-ins"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_attacked_from_twenty_addresses_is_slowed_then_recovers() {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.edge.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
        s.identity.login_failures = limit("3/4s");
    })
    .await;
    app.register("ada@example.com").await;
    let proxy = rest_from(ip(1));
    let (mut refused, mut wrong) = (0, 0);
    for k in 0..20 {
        let address = [("x-forwarded-for", format!("203.0.113.{k}"))];
        let (status, body, retry_after) = rest_login_as(
            &app,
            &proxy,
            "/v1/auth:login",
            "ada@example.com",
            "not her password",
            &address,
        )
        .await;
        match status {
            401 => wrong += 1,
            429 => {
                refused += 1;
                assert_eq!(body["code"], Code::ResourceExhausted as i32);
                let wait: u64 = retry_after.expect("Retry-After").parse().unwrap();
                assert!(
                    (1..=4).contains(&wait),
                    "the wait is bounded by the period: {wait}"
                );
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(
        refused >= 1,
        "twenty addresses, one account: slowed ({wrong} got through)"
    );
    assert!(wrong >= 3, "the first failures are answered as such");

    // The penalty drains: the right password from a fresh address gets in once it has.
    let fresh = [("x-forwarded-for", "198.51.100.7".to_owned())];
    keel_testkit::eventually(
        std::time::Duration::from_secs(30),
        "the account's penalty to drain",
        || {
            let (app, proxy, fresh) = (&app, &proxy, &fresh);
            async move {
                let (status, _, _) = rest_login_as(
                    app,
                    proxy,
                    "/v1/auth:login",
                    "ada@example.com",
                    PASSWORD,
                    fresh,
                )
                .await;
                assert!(status == 200 || status == 429, "{status}");
                (status == 200).then_some(())
            }
        },
    )
    .await;
}

/// A gRPC sign-in to `email` with `password` and `device` (a device token, or none).
async fn sign_in(app: &TestApp, email: &str, password: &str, device: &str) -> Result<String, Code> {
    let request = LoginRequest {
        email: email.into(),
        password: password.into(),
        device_token: device.into(),
    };
    match app.identity().await.login(request).await {
        Ok(signed_in) => Ok(signed_in.into_inner().device_token),
        Err(status) => Err(status.code()),
    }
}

/// Failures aimed at one account slow every sign-in that cannot show this account's device
/// token, and never its owner's client that signed in before: the owner signs in during the
/// attack. Another account's token proves nothing here, and a stolen token buys a guesser
/// only that device's own small budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_signs_in_from_a_known_device_while_the_account_is_attacked() {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.edge.auth_rate_limit = RateLimit(None);
        s.identity.login_failures = limit("3/60s");
    })
    .await;
    let (ada, bob) = ("ada@example.com", "bob@example.com");
    app.register(ada).await;
    app.register(bob).await;
    let adas_phone = sign_in(&app, ada, PASSWORD, "").await.unwrap();
    let bobs_phone = sign_in(&app, bob, PASSWORD, "").await.unwrap();
    assert!(adas_phone.starts_with("kdv_"), "{adas_phone}");
    let absurd = "kdv_".repeat(60);
    assert_eq!(
        sign_in(&app, ada, PASSWORD, &absurd).await,
        Err(Code::InvalidArgument)
    );

    let mut attempts = Vec::new();
    for _ in 0..6 {
        attempts.push(sign_in(&app, ada, "a guess", "").await.unwrap_err());
    }
    assert_eq!(attempts[..3], [Code::Unauthenticated; 3], "{attempts:?}");
    assert_eq!(
        attempts[3..],
        [Code::ResourceExhausted; 3],
        "the account is slowed"
    );
    for not_hers in ["", bobs_phone.as_str(), "kdv_forged"] {
        assert_eq!(
            sign_in(&app, ada, PASSWORD, not_hers).await,
            Err(Code::ResourceExhausted),
            "{not_hers}"
        );
    }
    let renewed = sign_in(&app, ada, PASSWORD, &adas_phone).await;
    assert!(
        renewed.is_ok_and(|t| t.starts_with("kdv_")),
        "the owner gets in"
    );

    // A thief holding her token guesses at that device's pace only, and Bob is untouched.
    for _ in 0..3 {
        let guess = sign_in(&app, ada, "a guess", &adas_phone).await;
        assert_eq!(guess, Err(Code::Unauthenticated));
    }
    let over = sign_in(&app, ada, PASSWORD, &adas_phone).await;
    assert_eq!(over, Err(Code::ResourceExhausted));
    assert!(sign_in(&app, bob, PASSWORD, &bobs_phone).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_trusted_proxies_a_forged_forwarded_for_changes_nothing() {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.edge.auth_rate_limit = limit("3/60s");
        s.identity.login_failures = RateLimit(None);
    })
    .await;
    let client = rest_from(ip(1));
    for k in 0..3 {
        let forged = [
            ("x-forwarded-for", format!("198.51.100.{k}")),
            ("forwarded", format!("for=192.0.2.{k}")),
        ];
        let email = format!("n{k}@example.com");
        let (status, _, _) =
            rest_login_as(&app, &client, "/v1/auth:login", &email, "wrong", &forged).await;
        assert_eq!(status, 401);
    }
    let forged = [("x-forwarded-for", "198.51.100.99".to_owned())];
    let (status, _, _) = rest_login_as(
        &app,
        &client,
        "/v1/auth:login",
        "z@example.com",
        "wrong",
        &forged,
    )
    .await;
    assert_eq!(
        status, 429,
        "the socket peer is the client, whatever it claims"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_sign_ins_past_the_queue_is_refused_while_reads_go_on() {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.identity.max_concurrent_hashes = Some(1);
        s.identity.max_queued_hashes = Some(2);
        s.edge.auth_rate_limit = RateLimit(None);
        s.identity.login_failures = RateLimit(None);
    })
    .await;
    let ada = app.register("ada@example.com").await.access_token;
    let identity = app.identity().await;
    let logins: Vec<_> = (0..30)
        .map(|_| {
            let mut identity = identity.clone();
            tokio::spawn(async move {
                identity
                    .login(LoginRequest {
                        email: "ada@example.com".into(),
                        password: PASSWORD.into(),
                        ..Default::default()
                    })
                    .await
            })
        })
        .collect();
    let reads: Vec<_> = (0..20)
        .map(|_| {
            let (mut identity, ada) = (identity.clone(), ada.clone());
            tokio::spawn(async move {
                identity
                    .get_user(authed(
                        GetUserRequest {
                            name: "users/me".into(),
                        },
                        &ada,
                    ))
                    .await
            })
        })
        .collect();
    for read in reads {
        read.await.unwrap().expect("reads beside the flood succeed");
    }
    let (mut ok, mut refused) = (0, 0);
    for login in logins {
        match login.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.get_details_retry_info().is_some());
                refused += 1;
            }
        }
    }
    assert!(
        refused >= 1,
        "past the queue, sign-ins are refused ({ok} got in)"
    );
    assert!(ok >= 3, "one hashing and two queued always get in: {ok}");
}

/// The key ids identity publishes.
async fn published(app: &TestApp) -> Vec<String> {
    app.identity()
        .await
        .get_jwks(GetJwksRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.kid)
        .collect()
}

fn kid_of(token: &str) -> String {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap();
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    serde_json::from_slice::<Value>(&header).unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Runs `keel keys <args>` on `app`'s data dir.
async fn keys(app: &TestApp, args: &[&str]) -> String {
    let output = keel_command(app.data_dir.path())
        .arg("keys")
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

async fn until_published(app: &TestApp, kids: &[String]) {
    keel_testkit::eventually(
        std::time::Duration::from_secs(10),
        "identity to publish the rotated keys",
        || async move { (published(app).await == kids).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_rotate_and_a_removed_key_stops_verifying() {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.identity.signing_key_reload = std::time::Duration::from_millis(100);
        s.identity.key_set_refresh = std::time::Duration::from_millis(100);
    })
    .await;
    let before = app.register("ada@example.com").await.access_token;
    let first = kid_of(&before);
    assert_eq!(published(&app).await, vec![first.clone()]);

    keys(&app, &["rotate"]).await;
    let listed = keys(&app, &["list"]).await;
    let second = listed
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    until_published(&app, &[first.clone(), second.clone()]).await;
    let (after, _) = app.login("ada@example.com").await;
    assert_eq!(kid_of(&after), second, "the new key signs");
    let me = || GetUserRequest {
        name: "users/me".into(),
    };
    let mut identity = app.identity().await;
    identity
        .get_user(authed(me(), &before))
        .await
        .expect("a token of the previous key still verifies");
    identity.get_user(authed(me(), &after)).await.unwrap();

    keys(&app, &["remove", &first]).await;
    until_published(&app, &[second]).await;
    keel_testkit::eventually(
        std::time::Duration::from_secs(10),
        "the removed key to stop verifying",
        || {
            let (mut identity, before) = (identity.clone(), before.clone());
            async move {
                match identity.get_user(authed(me(), &before)).await {
                    Err(status) if status.code() == Code::Unauthenticated => Some(()),
                    _ => None,
                }
            }
        },
    )
    .await;
    identity
        .get_user(authed(me(), &after))
        .await
        .expect("the current key verifies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_login_reaches_login_however_its_path_is_spelled() {
    let app = TestApp::spawn(Stores::Embedded).await;
    app.register("ada@example.com").await;
    for path in ["/v1/auth:login", "/v1/%61uth:login", "/v1/%61%75th:log%69n"] {
        let (status, body) = support::rest(
            &app,
            Method::POST,
            path,
            None,
            Some(json!({"email": "ada@example.com", "password": PASSWORD})),
        )
        .await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    // An escaped `:` is not the verb separator (a reserved character stays escaped, as in
    // grpc-gateway): that path names no method, so it reaches nothing to get around.
    let (status, _) = support::rest(
        &app,
        Method::POST,
        "/v1/auth%3Alogin",
        None,
        Some(json!({"email": "ada@example.com", "password": PASSWORD})),
    )
    .await;
    assert_eq!(status, 404);
}

/// The distinct `grpc_method` label values `/metrics` holds.
fn method_labels(metrics: &str) -> std::collections::BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split("grpc_method=\"").nth(1)?.split('"').next())
        .map(str::to_owned)
        .collect()
}

/// An anonymous caller sends thousands of made-up method paths: each is refused UNIMPLEMENTED,
/// and `/metrics` gains no series for them (one `unknown`, whatever their number).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_method_paths_add_no_metric_series() {
    let app = TestApp::spawn(Stores::Embedded).await;
    let before = method_labels(&app.metrics().await);
    let mut grpc = tonic::client::Grpc::new(app.channel().await);
    for k in 0..5000 {
        grpc.ready().await.unwrap();
        let service = if k % 2 == 0 {
            format!("made.up{k}.Service")
        } else {
            "keel.orders.v1.OrderService".to_owned()
        };
        let path = format!("/{service}/Method{k}").parse().unwrap();
        let call = grpc
            .unary(
                tonic::Request::new(bytes::Bytes::new()),
                path,
                keel_gateway::call::RawCodec,
            )
            .await;
        assert_eq!(call.unwrap_err().code(), Code::Unimplemented);
    }
    let after = method_labels(&app.metrics().await);
    let added: Vec<&String> = after.difference(&before).collect();
    assert_eq!(added, vec!["unknown"], "new series: {added:?}");
    let text = app.metrics().await;
    let refused = "grpc_server_handled_total{grpc_code=\"Unimplemented\",grpc_method=\"unknown\",\
                   grpc_service=\"unknown\",grpc_type=\"unary\"}";
    assert_eq!(keel_testkit::http::metric(&text, refused), 5000.0);
}

/// A deadline no call could need — ten trillion seconds — is refused at the edge (400), on
/// every REST call, rather than reaching tonic, which cannot write it (and used to panic and drop
/// the connection); the connection stays and the next call is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_deadline_is_a_bad_request_and_the_connection_lives_on() {
    let app = TestApp::spawn(Stores::Embedded).await;
    let client = reqwest::Client::new();
    let jwks = format!("http://{}/v1/auth/jwks", app.http_addr);
    for huge in ["10000000000000s", "99999999H"] {
        let header = if huge.ends_with('H') {
            "grpc-timeout"
        } else {
            "x-timeout"
        };
        let response = client.get(&jwks).header(header, huge).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 400, "{header}: {huge}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["message"].as_str().unwrap().contains("at most 24h"),
            "{body}"
        );
    }
    let fine = client.get(&jwks).header("x-timeout", "5s").send().await;
    assert_eq!(fine.unwrap().status().as_u16(), 200);
}

/// Credentials sent around the edge — `Grpc-Metadata-Authorization`, which the backend would
/// believe while the edge limited the call by address — are refused (400), not forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_grpc_metadata_are_refused_at_the_edge() {
    let app = TestApp::spawn(Stores::Embedded).await;
    let token = app.register("ada@example.com").await.access_token;
    let client = reqwest::Client::new();
    let me = format!("http://{}/v1/users/me", app.http_addr);
    let around = client
        .get(&me)
        .header("grpc-metadata-authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(around.status().as_u16(), 400);
    let body: Value = around.json().await.unwrap();
    assert!(body.get("email").is_none(), "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("Grpc-Metadata-Authorization"),
        "{body}"
    );
    let through = client.get(&me).bearer_auth(&token).send().await.unwrap();
    assert_eq!(through.status().as_u16(), 200);
}

/// Registration as a spam relay: the welcome e-mail goes to whatever address is typed, so it
/// carries none of the registrant's text; and an address that is not one address (a list, a
/// quoted part) is refused before anything is written, not left to die in the mailer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_mails_no_text_of_the_registrants_and_only_to_one_address() {
    use keel::proto::keel::identity::v1::RegisterRequest;
    let app = TestApp::spawn(Stores::Embedded).await;
    let mut identity = app.identity().await;
    let (users, jobs) = (
        app.count("identity_users").await,
        app.count("queue_jobs").await,
    );
    for list in ["a,b@x.org", "victim@x.org,other@y.org", "\"a b\"@x.org"] {
        let status = identity
            .register(RegisterRequest {
                email: list.into(),
                password: PASSWORD.into(),
                display_name: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{list}");
        assert_eq!(
            support::violated_field(&status).as_deref(),
            Some("email"),
            "{list}"
        );
    }
    assert_eq!(app.count("identity_users").await, users, "nothing written");
    assert_eq!(app.count("queue_jobs").await, jobs, "nothing queued");

    let pitch = "Cheap pills at spam.example";
    identity
        .register(RegisterRequest {
            email: "victim@example.com".into(),
            password: PASSWORD.into(),
            display_name: pitch.into(),
        })
        .await
        .unwrap();
    let welcome = keel_testkit::eventually(
        std::time::Duration::from_secs(30),
        "the welcome e-mail",
        || async {
            app.mail()
                .into_iter()
                .find(|m| m.to == "victim@example.com")
        },
    )
    .await;
    assert!(!welcome.body.contains("spam"), "{}", welcome.body);
    assert!(!welcome.subject.contains("spam"), "{}", welcome.subject);
}

/// Money that would overflow: two top-ups of the largest amount. The second is refused (400)
/// before anything is written, on both store pairs, and the wallet stays readable (on SQLite
/// the sum used to become a REAL, and every read of the wallet a 500).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_that_would_overflow_is_refused_and_the_wallet_stays_readable() {
    use keel::proto::keel::payments::v1::{GetWalletRequest, TopUpWalletRequest};
    for stores in [Stores::Embedded, Stores::PostgresRedis] {
        let app = TestApp::spawn(stores).await;
        let ada = app.register("ada@example.com").await.access_token;
        let mut payments = app.payments().await;
        let top_up = || {
            authed(
                TopUpWalletRequest {
                    name: "users/me/wallet".into(),
                    amount: support::eur(i64::MAX),
                    request_id: uuid::Uuid::new_v4().to_string(),
                },
                &ada,
            )
        };
        payments.top_up_wallet(top_up()).await.unwrap();
        let status = payments.top_up_wallet(top_up()).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{stores:?}: {status:?}"
        );
        assert_eq!(support::violated_field(&status).as_deref(), Some("amount"));
        assert_eq!(app.count("payments_transactions").await, 1, "{stores:?}");
        let wallet = payments
            .get_wallet(authed(
                GetWalletRequest {
                    name: "users/me/wallet".into(),
                },
                &ada,
            ))
            .await
            .expect("the wallet reads")
            .into_inner();
        assert_eq!(wallet.balance.unwrap().units, i64::MAX, "{stores:?}");
    }
}

/// Malformed gRPC framing from a client — a compressed flag with no encoding, a flag that is no
/// flag, a frame cut short, no message at all (also what a call cancelled while it waited to
/// be admitted looks like) — is the client's error: INVALID_ARGUMENT, and no ERROR in the log
/// (an anonymous caller must not be able to page an operator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grpc_frames_are_invalid_arguments_and_log_no_error() {
    let keel = support::process::KeelProcess::start(&[]).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let method = format!(
        "http://{}/keel.catalog.v1.CatalogService/GetProduct",
        keel.grpc_addr()
    );
    let frames: [&[u8]; 5] = [
        &[1, 0, 0, 0, 2, 8, 1],
        &[7, 0, 0, 0, 0],
        &[0, 0, 0, 0, 10, 1, 2],
        &[0, 0],
        &[],
    ];
    for frame in frames {
        let response = client
            .post(&method)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(frame.to_vec())
            .send()
            .await
            .unwrap();
        let status = response.headers().get("grpc-status").cloned();
        assert_eq!(
            status.as_ref().and_then(|s| s.to_str().ok()),
            Some("3"),
            "{frame:?}: {:?}",
            response.headers()
        );
    }
    // Everything it logged, to its last line.
    keel.terminate();
    keel_testkit::eventually(
        std::time::Duration::from_secs(30),
        "keel to stop",
        || async {
            keel.logs()
                .contains("\"message\":\"stopped\"")
                .then_some(())
        },
    )
    .await;
    let logs = keel.logs();
    assert!(!logs.contains("\"level\":\"ERROR\""), "{logs}");
}

/// What a stranger learns from the server itself: in production, reflection lists the services
/// meant for clients (not keel's internal InventoryService, LedgerService and
/// ServiceTokenService), and `/metrics` names the mesh's endpoints by a digest, not by address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_only_public_services_and_metrics_name_no_address() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        // What production does unless asked for all; two replicas, so the gateway calls its
        // services through the mesh.
        s.operations.reflection = Some(keel::config::Reflection::Public);
        s.mesh.replicas = 2;
    })
    .await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(app.channel().await)
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(listed)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("a service list");
    };
    let names: Vec<String> = listed.service.into_iter().map(|s| s.name).collect();
    for public in ["keel.catalog.v1.CatalogService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == public), "{public} in {names:?}");
    }
    for internal in ["InventoryService", "LedgerService", "ServiceTokenService"] {
        assert!(
            !names.iter().any(|n| n.ends_with(internal)),
            "{internal} in {names:?}"
        );
    }

    let products = format!("http://{}/v1/products", app.http_addr);
    assert_eq!(reqwest::get(&products).await.unwrap().status(), 200);
    let metrics = app.metrics().await;
    let endpoints: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("keel_mesh_endpoint_attempts_total{"))
        .collect();
    assert!(!endpoints.is_empty());
    for line in endpoints {
        assert!(!line.contains("127.0.0.1"), "{line}");
    }
}

/// Three hundred sockets opened and left idle on the REST, gRPC and admin ports: those past
/// the address's share are closed as they are accepted, the rest once idle; meanwhile another
/// client is served on every port, and afterwards the same address is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_are_closed_and_never_crowd_out_a_fresh_client() {
    use tokio::io::AsyncReadExt as _;
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.limits.idle_timeout = std::time::Duration::from_secs(2);
        s.limits.max_connections_per_address = 64;
    })
    .await;
    let ports = [app.http_addr, app.grpc_addr, app.admin_addr];
    let mut idle = Vec::new();
    for k in 0..300 {
        idle.push(
            tokio::net::TcpStream::connect(ports[k % 3])
                .await
                .expect("connect"),
        );
    }
    let served = |from: IpAddr| {
        let app = &app;
        async move {
            let client = rest_from(from);
            let jwks = client
                .get(format!("http://{}/v1/auth/jwks", app.http_addr))
                .send()
                .await;
            let ready = client
                .get(format!("http://{}/readyz", app.admin_addr))
                .send()
                .await;
            let h2 = reqwest::Client::builder()
                .local_address(from)
                .http2_prior_knowledge()
                .build()
                .unwrap();
            let health = h2
                .post(format!(
                    "http://{}/grpc.health.v1.Health/Check",
                    app.grpc_addr
                ))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(vec![0, 0, 0, 0, 0])
                .send()
                .await;
            [jwks, ready, health].map(|r| r.map(|r| r.status().as_u16()).ok())
        }
    };
    assert_eq!(
        served(ip(2)).await,
        [Some(200); 3],
        "another client, meanwhile"
    );
    let closing: Vec<_> = idle
        .into_iter()
        .map(|mut socket| {
            tokio::spawn(async move {
                // Whatever the server says first (HTTP/2's SETTINGS), then its close.
                let mut buf = [0u8; 256];
                loop {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
        })
        .collect();
    let all_closed = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        for socket in closing {
            socket.await.unwrap();
        }
    });
    all_closed
        .await
        .expect("every idle socket closed by the server");
    assert!(app.metric("keel_connections_refused_total").await >= 236.0);
    assert_eq!(
        served(ip(1)).await,
        [Some(200); 3],
        "the same address, after"
    );
}

/// An order that never settles (no worker runs) placed by `buyer` in `app`.
async fn an_unsettling_order(app: &TestApp, admin: &str, buyer: &str) -> String {
    use keel::proto::keel::orders::v1::order_service_client::OrderServiceClient;
    use keel::proto::keel::orders::v1::{LineItem, Order, PlaceOrderRequest};
    let lamp = app.product(admin, "Lamp", 100, 5).await.name;
    let request = PlaceOrderRequest {
        parent: "users/me".into(),
        order: Some(Order {
            line_items: vec![LineItem {
                product: lamp,
                quantity: 1,
                unit_price: None,
            }],
            ..Default::default()
        }),
        request_id: uuid::Uuid::new_v4().to_string(),
    };
    OrderServiceClient::new(app.channel().await)
        .place_order(authed(request, buyer))
        .await
        .unwrap()
        .into_inner()
        .name
}

/// One user opens 200 watches of an order that never settles, and a dozen users ten each: the
/// first user gets ten (RESOURCE_EXHAUSTED past them), and the open streams hold none of the
/// places unary calls need — another user's GetOrder is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_watches_are_bounded_per_caller_and_never_starve_other_calls() {
    use keel::proto::keel::orders::v1::order_service_client::OrderServiceClient;
    use keel::proto::keel::orders::v1::{GetOrderRequest, WatchOrderRequest};
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.workers.worker_concurrency = Some(0);
        s.edge.rate_limit = RateLimit(None);
        s.edge.auth_rate_limit = RateLimit(None);
    })
    .await;
    let people = app.people().await;
    let order = an_unsettling_order(&app, &people.admin, &people.ada).await;
    let orders = OrderServiceClient::new(app.channel().await);
    let watch = |token: String, name: String| {
        let mut orders = orders.clone();
        async move {
            let request = authed(WatchOrderRequest { name }, &token);
            let mut stream = orders.watch_order(request).await?.into_inner();
            stream.message().await?;
            Ok::<_, tonic::Status>(stream)
        }
    };
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..200 {
        match watch(people.ada.clone(), order.clone()).await {
            Ok(stream) => open.push(stream),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((open.len(), refused), (10, 190));

    for k in 0..12 {
        let token = app
            .register(&format!("watcher{k}@example.com"))
            .await
            .access_token;
        let theirs = an_unsettling_order(&app, &people.admin, &token).await;
        for _ in 0..10 {
            open.push(watch(token.clone(), theirs.clone()).await.unwrap());
        }
    }
    assert_eq!(
        open.len(),
        130,
        "more open streams than the unary limit's 100"
    );
    let bobs = an_unsettling_order(&app, &people.admin, &people.bob).await;
    let read = OrderServiceClient::new(app.channel().await)
        .get_order(authed(GetOrderRequest { name: bobs }, &people.bob))
        .await;
    assert!(read.is_ok(), "{read:?}");
}

/// Over REST, one client address holds at most sixteen open event streams (429 past them),
/// whoever's tokens it uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_so_many_open_event_streams() {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.workers.worker_concurrency = Some(0);
        s.orders.order_watches_per_caller = 100;
    })
    .await;
    let people = app.people().await;
    let order = an_unsettling_order(&app, &people.admin, &people.ada).await;
    let sse = format!("http://{}/v1/{order}:watch", app.http_addr);
    let client = reqwest::Client::new();
    let open = || {
        let request = client.get(&sse).header("accept", "text/event-stream");
        async { request.bearer_auth(&people.admin).send().await.unwrap() }
    };
    let mut streams = Vec::new();
    for _ in 0..16 {
        let stream = open().await;
        assert_eq!(stream.status().as_u16(), 200);
        streams.push(stream);
    }
    assert_eq!(open().await.status().as_u16(), 429);
}

/// A watch ends, OK, once its lifetime is up, for the client to watch again from where the
/// order is: none is held for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_cleanly_when_its_lifetime_is_up() {
    use keel::proto::keel::orders::v1::WatchOrderRequest;
    use keel::proto::keel::orders::v1::order_service_client::OrderServiceClient;
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.workers.worker_concurrency = Some(0);
        s.orders.order_watch_lifetime = std::time::Duration::from_millis(300);
    })
    .await;
    let people = app.people().await;
    let order = an_unsettling_order(&app, &people.admin, &people.ada).await;
    let mut orders = OrderServiceClient::new(app.channel().await);
    let request = || {
        authed(
            WatchOrderRequest {
                name: order.clone(),
            },
            &people.ada,
        )
    };
    let mut stream = orders.watch_order(request()).await.unwrap().into_inner();
    assert!(
        stream.message().await.unwrap().is_some(),
        "the order as it is"
    );
    assert!(
        stream.message().await.unwrap().is_none(),
        "then a clean end"
    );
    let mut again = orders.watch_order(request()).await.unwrap().into_inner();
    assert!(again.message().await.unwrap().is_some(), "watched again");
}

/// Writes over gRPC spend the caller's budget as REST requests do: one user's burst of
/// CreateTodo is refused past the quota (RESOURCE_EXHAUSTED with RetryInfo), while reads go on
/// and another user's writes are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_grpc_writes_is_limited_per_caller() {
    use keel::proto::keel::todos::v1::{CreateTodoRequest, ListTodosRequest, Todo};
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.edge.rate_limit = limit("20/60s");
    })
    .await;
    let (ada, bob) = (
        app.register("ada@example.com").await.access_token,
        app.register("bob@example.com").await.access_token,
    );
    let mut todos = app.todos().await;
    let create = |token: &str| {
        authed(
            CreateTodoRequest {
                parent: "users/me".into(),
                todo: Some(Todo {
                    title: "again".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            },
            token,
        )
    };
    let mut refused = 0;
    for _ in 0..50 {
        match todos.create_todo(create(&ada)).await {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.get_details_retry_info().is_some());
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 30, "twenty written, thirty refused");
    let listing = ListTodosRequest {
        parent: "users/me".into(),
        ..Default::default()
    };
    todos
        .list_todos(authed(listing, &ada))
        .await
        .expect("reads go on");
    todos
        .create_todo(create(&bob))
        .await
        .expect("bob's budget is his own");
}

/// The caller's account as identity has it.
async fn me(app: &TestApp, token: &str) -> keel::proto::keel::identity::v1::User {
    let me = GetUserRequest {
        name: "users/me".into(),
    };
    app.identity()
        .await
        .get_user(authed(me, token))
        .await
        .unwrap()
        .into_inner()
}

async fn confirm_email(
    app: &TestApp,
    name: &str,
    code: &str,
    token: &str,
) -> Result<tonic::Response<keel::proto::keel::identity::v1::User>, tonic::Status> {
    use keel::proto::keel::identity::v1::ConfirmEmailRequest;
    let request = ConfirmEmailRequest {
        name: name.into(),
        code: code.into(),
    };
    app.identity()
        .await
        .confirm_email(authed(request, token))
        .await
}

/// Whether `token` may list every user (an admin's right), or how it was refused.
async fn lists_users_or(app: &TestApp, token: &str) -> Result<bool, Code> {
    use keel::proto::keel::identity::v1::ListUsersRequest;
    let listed = app
        .identity()
        .await
        .list_users(authed(ListUsersRequest::default(), token))
        .await;
    match listed {
        Ok(_) => Ok(true),
        Err(status) if status.code() == Code::PermissionDenied => Ok(false),
        Err(status) => Err(status.code()),
    }
}

/// Whether `token` may list every user (an admin's right).
async fn lists_users(app: &TestApp, token: &str) -> bool {
    lists_users_or(app, token)
        .await
        .unwrap_or_else(|code| panic!("ListUsers: {code:?}"))
}

/// A fresh production deploy is not taken by whoever registers first, and an address listed in
/// KEEL_ADMIN_EMAILS (typed in any case) is an admin only once its owner proves the mailbox
/// with the mailed code: a wrong code, someone else's code or someone else's account is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_production_an_admin_is_a_confirmed_listed_address_never_the_first_to_register() {
    use keel::proto::keel::identity::v1::user::Role;
    let app = TestApp::production(|s| {
        s.identity.admin_emails = vec!["boss@example.com".into()];
    })
    .await;
    let first = app.register("first@example.com").await.access_token;
    let boss = app.register("Boss@Example.com").await.access_token;
    for token in [&first, &boss] {
        assert_eq!(me(&app, token).await.role(), Role::User);
        assert!(!lists_users(&app, token).await, "no admin yet");
    }
    let code = app.mailed_code("boss@example.com", "Welcome to keel").await;
    let boss_name = me(&app, &boss).await.name;
    for (name, code, token, refused) in [
        ("users/me", "kec_not-the-code", &boss, Code::InvalidArgument),
        ("users/me", code.as_str(), &first, Code::InvalidArgument),
        (
            boss_name.as_str(),
            code.as_str(),
            &first,
            Code::PermissionDenied,
        ),
    ] {
        expect_code(confirm_email(&app, name, code, token).await, refused);
    }
    assert_eq!(
        me(&app, &boss).await.role(),
        Role::User,
        "refusals changed nothing"
    );

    let (status, confirmed) = support::rest(
        &app,
        Method::POST,
        "/v1/users/me:confirmEmail",
        Some(&boss),
        Some(json!({"code": code})),
    )
    .await;
    assert_eq!((status, &confirmed["role"]), (200, &json!("ADMIN")));
    // Her USER token was revoked with the change; the next sign-in carries the role.
    let refused = lists_users_or(&app, &boss).await;
    assert_eq!(refused, Err(Code::Unauthenticated));
    let (admin, _) = app.login("boss@example.com").await;
    expect_code(
        confirm_email(&app, "users/me", &code, &admin).await,
        Code::InvalidArgument,
    );
    assert!(
        lists_users(&app, &admin).await,
        "the confirmed address is an admin"
    );
    assert!(!lists_users(&app, &first).await);
}

/// An address change is a claim until the mailed code comes back: asking for a taken address
/// answers exactly as asking for a free one (nobody learns who is registered), neither changes
/// the account, and only the code sent to the new mailbox applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_change_reveals_nothing_and_waits_for_the_mailed_code() {
    use keel::proto::keel::identity::v1::UpdateUserRequest;
    let app = TestApp::spawn(Stores::Embedded).await;
    let people = app.people().await;
    let before = me(&app, &people.ada).await;
    let mut answers = Vec::new();
    for email in ["bob@example.com", "ada.new@example.com"] {
        let request = UpdateUserRequest {
            user: Some(keel::proto::keel::identity::v1::User {
                name: "users/me".into(),
                email: email.into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["email".into()],
            }),
        };
        let answer = app
            .identity()
            .await
            .update_user(authed(request, &people.ada))
            .await
            .unwrap()
            .into_inner();
        answers.push(answer);
    }
    let shown = |u: &keel::proto::keel::identity::v1::User| {
        (
            u.name.clone(),
            u.email.clone(),
            u.display_name.clone(),
            u.role,
        )
    };
    assert_eq!(
        answers.iter().map(shown).collect::<Vec<_>>(),
        [shown(&before), shown(&before)],
        "the same answer, nothing changed"
    );
    assert_eq!(shown(&me(&app, &people.ada).await), shown(&before));

    let subject = "Confirm your new keel e-mail address";
    let to_bob = app.mailed_code("bob@example.com", subject).await;
    expect_code(
        confirm_email(&app, "users/me", &to_bob, &people.ada).await,
        Code::InvalidArgument,
    );
    let code = app.mailed_code("ada.new@example.com", subject).await;
    let changed = confirm_email(&app, "users/me", &code, &people.ada)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.email, "ada.new@example.com");
    app.login("ada.new@example.com").await;
}

/// The operator names an admin with `keel users grant-admin` (a real process on the same data
/// dir), of a confirmed address only: the user's next sign-in carries the role; an unconfirmed
/// or unknown address is an error, not a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_grants_admin_from_the_command_line() {
    let app = TestApp::spawn(Stores::Embedded).await;
    let people = app.people().await;
    assert!(!lists_users(&app, &people.ada).await);
    let grant = |email: &'static str| {
        keel_command(app.data_dir.path())
            .args(["users", "grant-admin", email])
            .output()
    };
    // Anyone can register any address: an address never confirmed is refused...
    let refused = grant("ADA@example.com").await.unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("never confirmed"),
        "{stderr}"
    );
    assert!(!lists_users(&app, &people.ada).await);
    // ...until its owner spends the code the welcome e-mail carried.
    let code = app.mailed_code("ada@example.com", "Welcome to keel").await;
    confirm_email(&app, "users/me", &code, &people.ada)
        .await
        .unwrap();
    let granted = grant("ADA@example.com").await.unwrap();
    assert!(granted.status.success(), "{granted:?}");
    let (ada, _) = app.login("ada@example.com").await;
    assert!(lists_users(&app, &ada).await, "ada is an admin now");

    let unknown = grant("nobody@example.com").await.unwrap();
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("no user registered with nobody@example.com"),
        "{stderr}"
    );
}

/// `keel users grant-admin` run where Redis cannot be reached (the operator's shell, say) does
/// not leave the servers serving the user's earlier tokens for the cache's TTL (5 minutes): it
/// says so, and queues the invalidation, which a server's worker carries out on the Redis it
/// reaches — her earlier token is refused there soon after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_whose_cache_invalidation_redis_refuses_is_carried_out_by_a_worker() {
    let app = TestApp::spawn(Stores::PostgresRedis).await;
    let people = app.people().await;
    let code = app.mailed_code("ada@example.com", "Welcome to keel").await;
    confirm_email(&app, "users/me", &code, &people.ada)
        .await
        .unwrap();
    // Her token verified once: its generation is cached, here and in Redis.
    token_works(&app, &people.ada).await.expect("her token");
    let database = app.settings.stores.database_url.clone().unwrap();
    let granted = keel_command(app.data_dir.path())
        .env("KEEL_DATABASE_URL", database)
        // Nothing listens there.
        .env("KEEL_REDIS_URL", "redis://127.0.0.1:1")
        .args(["users", "grant-admin", "ada@example.com"])
        .output()
        .await
        .unwrap();
    assert!(granted.status.success(), "{granted:?}");
    let said = String::from_utf8_lossy(&granted.stdout);
    assert!(
        said.contains("is an admin") && said.contains("the cache did not answer"),
        "{said}"
    );
    keel_testkit::eventually(
        std::time::Duration::from_secs(20),
        "her earlier token refused",
        || async {
            (token_works(&app, &people.ada).await
                == Err("Unauthenticated: access token revoked".to_owned()))
            .then_some(())
        },
    )
    .await;
    let (ada, _) = app.login("ada@example.com").await;
    assert!(lists_users(&app, &ada).await, "ada is an admin now");
}

/// What `token` gets from a call that needs nothing but a valid token (the caller's todos).
async fn token_works(app: &TestApp, token: &str) -> Result<(), String> {
    use keel::proto::keel::todos::v1::ListTodosRequest;
    let request = ListTodosRequest {
        parent: "users/me".into(),
        ..Default::default()
    };
    match app.todos().await.list_todos(authed(request, token)).await {
        Ok(_) => Ok(()),
        Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// Revocation: a token stops working on its next call once its user's role changes, they sign
/// out or they are deleted — in the process that made the change, and (once Redis has pushed
/// the invalidation, within milliseconds) in another process over the same stores, which had
/// the token verified and remembered. Tokens signed afterwards work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_signed_out_or_deleted_users_token_is_refused_on_its_next_call() {
    use keel::proto::keel::identity::v1::{DeleteUserRequest, LogoutRequest, UpdateUserRequest};
    use keel::proto::keel::identity::v1::{User, user::Role};
    let here = TestApp::spawn(Stores::PostgresRedis).await;
    let stores = here.settings.stores.clone();
    let there = TestApp::spawn_with(Stores::Embedded, move |s| s.stores = stores).await;
    let people = here.people().await;
    let revoked = || Err("Unauthenticated: access token revoked".to_owned());
    let ada = here.user_name(&people.ada).await;
    {
        let promote = UpdateUserRequest {
            user: Some(User {
                name: ada.clone(),
                role: Role::Admin as i32,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["role".into()],
            }),
        };
        let identity = &mut here.identity().await;
        identity
            .update_user(authed(promote.clone(), &people.admin))
            .await
            .unwrap();
        assert_eq!(
            token_works(&here, &people.ada).await,
            revoked(),
            "her USER token"
        );
        let (token, _) = here.login("ada@example.com").await;
        for app in [&here, &there] {
            token_works(app, &token).await.expect("her new token");
        }
        // Demoted by another admin: her admin token dies here at once, and there.
        let mut demote = promote;
        demote.user.as_mut().unwrap().role = Role::User as i32;
        identity
            .update_user(authed(demote, &people.admin))
            .await
            .unwrap();
        assert_eq!(token_works(&here, &token).await, revoked());
        keel_testkit::eventually(
            std::time::Duration::from_secs(5),
            "the other process",
            || async { (token_works(&there, &token).await == revoked()).then_some(()) },
        )
        .await;
    }

    // Signing out ends her access tokens too; a new sign-in works.
    let (token, refresh_token) = here.login("ada@example.com").await;
    token_works(&there, &token).await.expect("signed in");
    here.identity()
        .await
        .logout(LogoutRequest { refresh_token })
        .await
        .unwrap();
    assert_eq!(token_works(&here, &token).await, revoked());
    let (token, _) = here.login("ada@example.com").await;
    token_works(&here, &token).await.expect("a fresh sign-in");

    // Deleted: refused, not served as a stranger.
    token_works(&there, &people.bob).await.expect("bob's token");
    let delete = DeleteUserRequest {
        name: "users/me".into(),
    };
    here.identity()
        .await
        .delete_user(authed(delete, &people.bob))
        .await
        .unwrap();
    assert_eq!(token_works(&here, &people.bob).await, revoked());
    keel_testkit::eventually(
        std::time::Duration::from_secs(5),
        "the other process",
        || async { (token_works(&there, &people.bob).await == revoked()).then_some(()) },
    )
    .await;
}

/// Refresh tokens as weapons: an old (spent) refresh token found somewhere cannot sign its
/// owner out of anything, again and again; and a refresh token presented a second time (a thief
/// and the owner both refreshed) ends the family and every access token of the user, the one
/// the thief got included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_refresh_token_signs_no_one_out_and_a_replayed_one_ends_the_thiefs_tokens() {
    use keel::proto::keel::identity::v1::{LogoutRequest, RefreshTokenRequest};
    let app = TestApp::spawn(Stores::Embedded).await;
    app.register("ada@example.com").await;
    let refresh = |refresh_token: String| {
        let app = &app;
        async move {
            let request = RefreshTokenRequest { refresh_token };
            let refreshed = app.identity().await.refresh_token(request).await?;
            let refreshed = refreshed.into_inner();
            Ok::<_, tonic::Status>((refreshed.access_token, refreshed.refresh_token))
        }
    };
    let (_, old) = app.login("ada@example.com").await;
    let (token, _) = refresh(old.clone()).await.unwrap();
    // `old` is spent; her session lives on. Logging out with it ends nothing of hers.
    let (session, _) = app.login("ada@example.com").await;
    for _ in 0..3 {
        let logout = LogoutRequest {
            refresh_token: old.clone(),
        };
        app.identity().await.logout(logout).await.unwrap();
    }
    token_works(&app, &session)
        .await
        .expect("a stale token signed her out");

    // A thief refreshed with her live token first; her own refresh replays it.
    let (_, live) = app.login("ada@example.com").await;
    let (thiefs, _) = refresh(live.clone()).await.unwrap();
    token_works(&app, &thiefs)
        .await
        .expect("the thief's token, for now");
    let replayed = refresh(live).await.unwrap_err();
    assert_eq!(replayed.code(), Code::Unauthenticated);
    let revoked = Err("Unauthenticated: access token revoked".to_owned());
    assert_eq!(token_works(&app, &thiefs).await, revoked);
    assert_eq!(token_works(&app, &token).await, revoked);
}
