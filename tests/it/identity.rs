//! The identity service, end to end over gRPC, on both store pairs: what it does for good
//! input, and that bad input gets its exact code and writes nothing.

use crate::support;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keel::proto::keel::identity::v1::{
    DeleteUserRequest, GetJwksRequest, GetUserRequest, ListUsersRequest, LoginRequest,
    LogoutRequest, RefreshTokenRequest, RegisterRequest, UpdateUserRequest, User, user::Role,
};
use keel_auth::AccessClaims;
use support::{PASSWORD, Stores, TestApp, at_once, authed, clients, expect_code, violated_field};
use tonic::Code;

fn register_request(email: &str, password: &str) -> RegisterRequest {
    RegisterRequest {
        email: email.into(),
        password: password.into(),
        display_name: String::new(),
    }
}

fn me() -> GetUserRequest {
    GetUserRequest {
        name: "users/me".into(),
    }
}

/// A token signed by this app's real key with `claims`, or by a stranger's key.
fn sign(app: &TestApp, claims: &AccessClaims) -> String {
    let keys = keel::identity::SigningKeys::development(app.data_dir.path()).unwrap();
    keys.sign(claims).unwrap()
}

fn claims_for(subject: &str, exp: i64) -> AccessClaims {
    AccessClaims {
        sub: subject.into(),
        role: "admin".into(),
        iss: "keel".into(),
        aud: "keel".into(),
        iat: chrono::Utc::now().timestamp(),
        exp,
        jti: uuid::Uuid::now_v7().to_string(),
        generation: 0,
    }
}

fn subject_of(user: &User) -> String {
    user.name.trim_start_matches("users/").to_owned()
}

async fn register_then_login_then_read_me(app: TestApp) {
    let registered = app.register("ada@example.com").await;
    let user = registered.user.clone().unwrap();
    assert!(user.name.starts_with("users/"));
    assert_eq!(user.email, "ada@example.com");
    assert_eq!(
        user.display_name, "ada",
        "defaults to the e-mail's local part"
    );
    assert_eq!(registered.token_type, "Bearer");
    assert_eq!(registered.expires_in, 15 * 60);

    let (access, refresh) = app.login("ADA@example.com").await;
    assert!(!refresh.is_empty());
    let mut identity = app.identity().await;
    let fetched = identity
        .get_user(authed(me(), &access))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched, user);
    let by_name = identity
        .get_user(authed(
            GetUserRequest {
                name: user.name.clone(),
            },
            &access,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_name, user);
}

/// In development: the first user is an admin, and so is a listed address (matched whatever
/// its case); anyone else is a user.
async fn the_first_user_and_listed_emails_are_admins_others_are_not(stores: Stores) {
    let app = TestApp::spawn_with(stores, |s| {
        s.identity.admin_emails = vec!["boss@example.com".into()]
    })
    .await;
    let first = app.register("first@example.com").await.user.unwrap();
    let boss = app.register("BOSS@example.com").await.user.unwrap();
    let other = app.register("other@example.com").await.user.unwrap();
    let roles = [first.role, boss.role, other.role];
    assert_eq!(
        roles,
        [Role::Admin, Role::Admin, Role::User].map(|r| r as i32)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_user_and_listed_emails_are_admins_others_are_not_embedded() {
    the_first_user_and_listed_emails_are_admins_others_are_not(Stores::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_user_and_listed_emails_are_admins_others_are_not_postgres_redis() {
    the_first_user_and_listed_emails_are_admins_others_are_not(Stores::PostgresRedis).await;
}

async fn malformed_email_is_invalid_and_writes_nothing(app: TestApp) {
    let mut identity = app.identity().await;
    for email in ["", "ada", "ada@example", "ada @example.com"] {
        let status = expect_code(
            identity.register(register_request(email, PASSWORD)).await,
            Code::InvalidArgument,
        );
        assert_eq!(
            violated_field(&status).as_deref(),
            Some("email"),
            "{email:?}"
        );
    }
    assert_eq!(app.count("identity_users").await, 0);
    assert_eq!(app.count("identity_refresh_tokens").await, 0);
}

async fn short_password_is_invalid_and_writes_nothing(app: TestApp) {
    let status = expect_code(
        app.identity()
            .await
            .register(register_request("ada@example.com", "1234567"))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&status).as_deref(), Some("password"));
    assert_eq!(app.count("identity_users").await, 0);
}

async fn duplicate_email_already_exists_and_writes_nothing(app: TestApp) {
    app.register("ada@example.com").await;
    expect_code(
        app.identity()
            .await
            .register(register_request("Ada@Example.com", PASSWORD))
            .await,
        Code::AlreadyExists,
    );
    assert_eq!(app.count("identity_users").await, 1);
    assert_eq!(app.count("identity_refresh_tokens").await, 1);
}

async fn wrong_password_and_unknown_email_are_indistinguishable(app: TestApp) {
    app.register("ada@example.com").await;
    let mut identity = app.identity().await;
    let wrong = expect_code(
        identity
            .login(LoginRequest {
                email: "ada@example.com".into(),
                password: "wrong password".into(),
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
    );
    let unknown = expect_code(
        identity
            .login(LoginRequest {
                email: "nobody@example.com".into(),
                password: PASSWORD.into(),
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
    );
    let malformed = expect_code(
        identity
            .login(LoginRequest {
                email: "nobody".into(),
                password: PASSWORD.into(),
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
    );
    assert_eq!(wrong.message(), unknown.message());
    assert_eq!(wrong.message(), malformed.message());
    assert_eq!(
        app.count("identity_refresh_tokens").await,
        1,
        "no session was started"
    );
}

async fn expired_forged_alg_none_and_unknown_kid_tokens_are_unauthenticated(app: TestApp) {
    let registered = app.register("ada@example.com").await;
    let subject = subject_of(registered.user.as_ref().unwrap());
    let now = chrono::Utc::now().timestamp();
    let mut identity = app.identity().await;

    let expired = sign(&app, &claims_for(&subject, now - 3600));
    let status = expect_code(
        identity.get_user(authed(me(), &expired)).await,
        Code::Unauthenticated,
    );
    assert!(status.message().contains("expired"), "{status:?}");

    // The real kid, another key's signature.
    let real_header = registered
        .access_token
        .split('.')
        .next()
        .unwrap()
        .to_owned();
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = keel::identity::SigningKeys::development(stranger_dir.path()).unwrap();
    let stranger_token = stranger.sign(&claims_for(&subject, now + 600)).unwrap();
    let mut parts = stranger_token.split('.');
    let (_, body, signature) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
    let forged = format!("{real_header}.{body}.{signature}");
    expect_code(
        identity.get_user(authed(me(), &forged)).await,
        Code::Unauthenticated,
    );

    // A tampered payload under the real signature.
    let mut parts = registered.access_token.split('.');
    let (header, _, real_signature) = (parts.next().unwrap(), parts.next(), parts.next().unwrap());
    let escalated =
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims_for(&subject, now + 600)).unwrap());
    let tampered = format!("{header}.{escalated}.{real_signature}");
    expect_code(
        identity.get_user(authed(me(), &tampered)).await,
        Code::Unauthenticated,
    );

    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let alg_none = format!("{none_header}.{escalated}.");
    expect_code(
        identity.get_user(authed(me(), &alg_none)).await,
        Code::Unauthenticated,
    );

    // The stranger's own kid: unknown to the key set even after a refetch.
    let status = expect_code(
        identity.get_user(authed(me(), &stranger_token)).await,
        Code::Unauthenticated,
    );
    assert!(status.message().contains("unknown key"), "{status:?}");

    expect_code(
        identity.get_user(authed(me(), "not-a-jwt")).await,
        Code::Unauthenticated,
    );
    expect_code(identity.get_user(me()).await, Code::Unauthenticated);
}

async fn refresh_rotates_and_a_reused_token_revokes_the_family(app: TestApp) {
    app.register("ada@example.com").await;
    let (_, first) = app.login("ada@example.com").await;
    let mut identity = app.identity().await;
    let second = identity
        .refresh_token(RefreshTokenRequest {
            refresh_token: first.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(second.refresh_token, first);
    identity
        .get_user(authed(me(), &second.access_token))
        .await
        .unwrap();

    // The spent token again: refused, and the family is revoked...
    expect_code(
        identity
            .refresh_token(RefreshTokenRequest {
                refresh_token: first,
            })
            .await,
        Code::Unauthenticated,
    );
    // ...so the legitimately rotated token is refused too.
    expect_code(
        identity
            .refresh_token(RefreshTokenRequest {
                refresh_token: second.refresh_token,
            })
            .await,
        Code::Unauthenticated,
    );
    expect_code(
        identity
            .refresh_token(RefreshTokenRequest {
                refresh_token: "krt_unknown".into(),
            })
            .await,
        Code::Unauthenticated,
    );
    expect_code(
        identity
            .refresh_token(RefreshTokenRequest {
                refresh_token: String::new(),
            })
            .await,
        Code::InvalidArgument,
    );
}

async fn logout_revokes_the_family_but_not_other_sessions(app: TestApp) {
    app.register("ada@example.com").await;
    let (_, phone) = app.login("ada@example.com").await;
    let (_, laptop) = app.login("ada@example.com").await;
    let mut identity = app.identity().await;
    identity
        .logout(LogoutRequest {
            refresh_token: phone.clone(),
        })
        .await
        .unwrap();
    expect_code(
        identity
            .refresh_token(RefreshTokenRequest {
                refresh_token: phone,
            })
            .await,
        Code::Unauthenticated,
    );
    identity
        .refresh_token(RefreshTokenRequest {
            refresh_token: laptop,
        })
        .await
        .unwrap();
}

async fn only_admins_list_users_and_pages_cover_everyone_once(app: TestApp) {
    let admin = app.register("admin@example.com").await.access_token;
    let user = app.register("user0@example.com").await.access_token;
    for i in 1..5 {
        app.register(&format!("user{i}@example.com")).await;
    }
    let mut identity = app.identity().await;
    expect_code(
        identity
            .list_users(authed(ListUsersRequest::default(), &user))
            .await,
        Code::PermissionDenied,
    );

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = identity
            .list_users(authed(
                ListUsersRequest {
                    page_size: 2,
                    page_token: token.clone(),
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.users.len() <= 2);
        seen.extend(page.users.into_iter().map(|u| u.email));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let everyone: Vec<String> = std::iter::once("admin@example.com".to_owned())
        .chain((0..5).map(|i| format!("user{i}@example.com")))
        .collect();
    assert_eq!(seen, everyone, "everyone once, in registration order");
}

async fn a_tampered_page_token_is_invalid(app: TestApp) {
    let admin = app.register("admin@example.com").await.access_token;
    app.register("user@example.com").await;
    let mut identity = app.identity().await;
    let page = identity
        .list_users(authed(
            ListUsersRequest {
                page_size: 1,
                page_token: String::new(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut tampered = page.next_page_token.clone().into_bytes();
    tampered[2] = if tampered[2] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for token in [tampered.as_str(), "garbage", "%%%"] {
        let status = expect_code(
            identity
                .list_users(authed(
                    ListUsersRequest {
                        page_size: 1,
                        page_token: token.into(),
                    },
                    &admin,
                ))
                .await,
            Code::InvalidArgument,
        );
        assert_eq!(violated_field(&status).as_deref(), Some("page_token"));
    }
    expect_code(
        identity
            .list_users(authed(
                ListUsersRequest {
                    page_size: -1,
                    page_token: String::new(),
                },
                &admin,
            ))
            .await,
        Code::InvalidArgument,
    );
}

async fn users_see_themselves_not_others(app: TestApp) {
    let admin = app.register("admin@example.com").await;
    let ada = app.register("ada@example.com").await;
    let bob = app.register("bob@example.com").await;
    let bob_name = bob.user.unwrap().name;
    let mut identity = app.identity().await;
    expect_code(
        identity
            .get_user(authed(
                GetUserRequest {
                    name: bob_name.clone(),
                },
                &ada.access_token,
            ))
            .await,
        Code::PermissionDenied,
    );
    identity
        .get_user(authed(
            GetUserRequest { name: bob_name },
            &admin.access_token,
        ))
        .await
        .unwrap();
    expect_code(
        identity
            .get_user(authed(
                GetUserRequest {
                    name: "users/not-a-uuid".into(),
                },
                &admin.access_token,
            ))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        identity
            .get_user(authed(
                GetUserRequest {
                    name: format!("users/{}", uuid::Uuid::now_v7()),
                },
                &admin.access_token,
            ))
            .await,
        Code::NotFound,
    );
}

async fn update_user_follows_the_mask_and_only_admins_change_roles(app: TestApp) {
    app.register("admin@example.com").await;
    let ada = app.register("ada@example.com").await;
    let mut identity = app.identity().await;
    let mask = |paths: &[&str]| {
        Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        })
    };
    let user = |name: &str, role: Role| User {
        name: "users/me".into(),
        display_name: name.into(),
        email: "ignored@example.com".into(),
        role: role as i32,
        ..Default::default()
    };

    let updated = identity
        .update_user(authed(
            UpdateUserRequest {
                user: Some(user("Ada L.", Role::Admin)),
                update_mask: mask(&["display_name"]),
            },
            &ada.access_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.display_name, "Ada L.");
    assert_eq!(
        updated.email, "ada@example.com",
        "fields outside the mask stay"
    );
    assert_eq!(updated.role, Role::User as i32);

    expect_code(
        identity
            .update_user(authed(
                UpdateUserRequest {
                    user: Some(user("x", Role::Admin)),
                    update_mask: mask(&["role"]),
                },
                &ada.access_token,
            ))
            .await,
        Code::PermissionDenied,
    );
    let status = expect_code(
        identity
            .update_user(authed(
                UpdateUserRequest {
                    user: Some(user("x", Role::User)),
                    update_mask: mask(&["password_hash"]),
                },
                &ada.access_token,
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&status).as_deref(), Some("update_mask"));
    expect_code(
        identity
            .update_user(authed(
                UpdateUserRequest {
                    user: Some(user("x", Role::User)),
                    update_mask: None,
                },
                &ada.access_token,
            ))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        identity
            .update_user(authed(
                UpdateUserRequest {
                    user: Some(user("", Role::User)),
                    update_mask: mask(&["display_name"]),
                },
                &ada.access_token,
            ))
            .await,
        Code::InvalidArgument,
    );
    // A taken address is answered as a free one would be: a code goes to it, nothing changes.
    let mut taken = user("x", Role::User);
    taken.email = "admin@example.com".into();
    identity
        .update_user(authed(
            UpdateUserRequest {
                user: Some(taken),
                update_mask: mask(&["email"]),
            },
            &ada.access_token,
        ))
        .await
        .unwrap();
    let after = identity
        .get_user(authed(me(), &ada.access_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after.display_name, "Ada L.",
        "refused updates changed nothing"
    );
    assert_eq!(after.email, "ada@example.com");
}

async fn delete_user_removes_the_user_and_their_sessions(app: TestApp) {
    app.register("admin@example.com").await;
    let ada = app.register("ada@example.com").await;
    let mut identity = app.identity().await;
    identity
        .delete_user(authed(
            DeleteUserRequest {
                name: "users/me".into(),
            },
            &ada.access_token,
        ))
        .await
        .unwrap();
    // Her token went with her: refused as revoked, not answered as a stranger's.
    expect_code(
        identity.get_user(authed(me(), &ada.access_token)).await,
        Code::Unauthenticated,
    );
    expect_code(
        identity
            .refresh_token(RefreshTokenRequest {
                refresh_token: ada.refresh_token,
            })
            .await,
        Code::Unauthenticated,
    );
    expect_code(
        identity
            .delete_user(authed(
                DeleteUserRequest {
                    name: "users/me".into(),
                },
                &ada.access_token,
            ))
            .await,
        Code::Unauthenticated,
    );
    assert_eq!(app.count("identity_users").await, 1);
}

async fn jwks_publishes_the_key_that_signs_tokens(app: TestApp) {
    let token = app.register("ada@example.com").await.access_token;
    let header: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "EdDSA");
    let jwks = app
        .identity()
        .await
        .get_jwks(GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwks.keys.len(), 1);
    let key = &jwks.keys[0];
    assert_eq!(
        (
            key.kty.as_str(),
            key.crv.as_str(),
            key.alg.as_str(),
            key.r#use.as_str()
        ),
        ("OKP", "Ed25519", "EdDSA", "sig")
    );
    assert_eq!(header["kid"], key.kid.as_str());
    assert_eq!(URL_SAFE_NO_PAD.decode(&key.x).unwrap().len(), 32);
}

async fn a_repeated_get_user_is_a_cache_hit_and_writes_invalidate(app: TestApp) {
    let ada = app.register("ada@example.com").await;
    let mut identity = app.identity().await;
    let hits = r#"keel_cache_requests_total{cache="identity.users",result="hit"}"#;
    let misses = r#"keel_cache_requests_total{cache="identity.users",result="miss"}"#;

    identity
        .get_user(authed(me(), &ada.access_token))
        .await
        .unwrap();
    assert_eq!(
        (app.metric(hits).await, app.metric(misses).await),
        (0.0, 1.0)
    );
    identity
        .get_user(authed(me(), &ada.access_token))
        .await
        .unwrap();
    assert_eq!(
        (app.metric(hits).await, app.metric(misses).await),
        (1.0, 1.0)
    );

    let renamed = User {
        name: "users/me".into(),
        display_name: "Ada L.".into(),
        ..Default::default()
    };
    identity
        .update_user(authed(
            UpdateUserRequest {
                user: Some(renamed),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["display_name".into()],
                }),
            },
            &ada.access_token,
        ))
        .await
        .unwrap();
    let after = identity
        .get_user(authed(me(), &ada.access_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after.display_name, "Ada L.",
        "the update invalidated the cached user"
    );
    assert_eq!(app.metric(misses).await, 2.0);

    identity
        .delete_user(authed(
            DeleteUserRequest {
                name: "users/me".into(),
            },
            &ada.access_token,
        ))
        .await
        .unwrap();
    expect_code(
        identity.get_user(authed(me(), &ada.access_token)).await,
        Code::Unauthenticated,
    );
}

async fn a_message_over_the_size_limit_is_resource_exhausted(app: TestApp) {
    let huge = "x".repeat(5 * 1024 * 1024);
    let status = expect_code(
        app.identity()
            .await
            .register(RegisterRequest {
                email: "ada@example.com".into(),
                password: PASSWORD.into(),
                display_name: huge,
            })
            .await,
        Code::ResourceExhausted,
    );
    assert_eq!(
        status.message(),
        "request message larger than the server accepts",
        "grpc-go's code with a message a client can read"
    );
    assert_eq!(app.count("identity_users").await, 0);
}

on_every_store!(
    register_then_login_then_read_me,
    malformed_email_is_invalid_and_writes_nothing,
    short_password_is_invalid_and_writes_nothing,
    duplicate_email_already_exists_and_writes_nothing,
    wrong_password_and_unknown_email_are_indistinguishable,
    expired_forged_alg_none_and_unknown_kid_tokens_are_unauthenticated,
    refresh_rotates_and_a_reused_token_revokes_the_family,
    logout_revokes_the_family_but_not_other_sessions,
    only_admins_list_users_and_pages_cover_everyone_once,
    a_tampered_page_token_is_invalid,
    users_see_themselves_not_others,
    update_user_follows_the_mask_and_only_admins_change_roles,
    delete_user_removes_the_user_and_their_sessions,
    jwks_publishes_the_key_that_signs_tokens,
    a_repeated_get_user_is_a_cache_hit_and_writes_invalidate,
    a_message_over_the_size_limit_is_resource_exhausted
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_user_answers_from_the_database_when_redis_dies() {
    let redis = keel_testkit::Redis::dedicated().await;
    let url = redis.url.clone();
    // The Redis tier alone: a near tier answers from memory until it notices Redis is gone.
    let app = TestApp::spawn_with(Stores::PostgresRedis, move |s| {
        s.stores.redis_url = Some(url);
        s.stores.near_cache_ttl = std::time::Duration::ZERO;
    })
    .await;
    let ada = app.register("ada@example.com").await;
    let mut identity = app.identity().await;
    identity
        .get_user(authed(me(), &ada.access_token))
        .await
        .unwrap();
    identity
        .get_user(authed(me(), &ada.access_token))
        .await
        .unwrap();
    let hits = r#"keel_cache_requests_total{cache="identity.users",result="hit"}"#;
    assert_eq!(app.metric(hits).await, 1.0, "warm before the crash");

    redis.kill();

    let user = identity
        .get_user(authed(me(), &ada.access_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(user.email, "ada@example.com");
    // Writes still succeed; their invalidation fails, is counted, and does not fail the call.
    let renamed = User {
        name: "users/me".into(),
        display_name: "Ada L.".into(),
        ..Default::default()
    };
    identity
        .update_user(authed(
            UpdateUserRequest {
                user: Some(renamed),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["display_name".into()],
                }),
            },
            &ada.access_token,
        ))
        .await
        .unwrap();
    let user = identity
        .get_user(authed(me(), &ada.access_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(user.display_name, "Ada L.");
    let errors = r#"keel_cache_requests_total{cache="identity.users",result="error"}"#;
    assert!(app.metric(errors).await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_registrations_make_exactly_one_admin() {
    let app = TestApp::spawn(Stores::PostgresRedis).await;
    let clients = clients(8, || app.identity()).await;
    let users = at_once(clients, |i, mut identity| async move {
        let request = register_request(&format!("u{i}@example.com"), PASSWORD);
        identity
            .register(request)
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap()
    })
    .await;
    let peak = app.peak_in_flight("keel.identity.v1.IdentityService").await;
    assert!(peak > 1.0, "the registrations overlapped");
    let admins = users
        .iter()
        .filter(|u| u.role == Role::Admin as i32)
        .count();
    assert_eq!(admins, 1);
}
