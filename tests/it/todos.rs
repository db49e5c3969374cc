//! The todos service on both store pairs: CRUD, pagination, the completed filter, owner-only
//! access, validation that writes nothing, idempotent creates, and cached reads that never lag a
//! write.

use crate::support;

use keel::proto::keel::todos::v1::{
    CreateTodoRequest, DeleteTodoRequest, GetTodoRequest, ListTodosRequest, Todo, UpdateTodoRequest,
};
use support::{Stores, TestApp, at_once, authed, clients, expect_code, violated_field};
use tonic::Code;

fn new_todo(title: &str) -> CreateTodoRequest {
    CreateTodoRequest {
        parent: "users/me".into(),
        todo: Some(Todo {
            title: title.into(),
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

fn list(parent: &str, page_size: i32, page_token: &str, filter: &str) -> ListTodosRequest {
    ListTodosRequest {
        parent: parent.into(),
        page_size,
        page_token: page_token.into(),
        filter: filter.into(),
    }
}

async fn create_get_update_list_delete(app: TestApp) {
    let people = app.people().await;
    let mut todos = app.todos().await;
    let created = todos
        .create_todo(authed(new_todo("  buy milk "), &people.ada))
        .await
        .unwrap()
        .into_inner();
    assert!(created.name.contains("/todos/"));
    assert_eq!(created.title, "buy milk");
    assert!(!created.completed);

    let fetched = todos
        .get_todo(authed(
            GetTodoRequest {
                name: created.name.clone(),
            },
            &people.ada,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched, created);

    let change = Todo {
        name: created.name.clone(),
        title: "buy oat milk".into(),
        completed: true,
        ..Default::default()
    };
    let updated = todos
        .update_todo(authed(
            UpdateTodoRequest {
                todo: Some(change),
                update_mask: mask(&["completed"]),
            },
            &people.ada,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(updated.completed);
    assert_eq!(updated.title, "buy milk", "only masked fields change");

    let page = todos
        .list_todos(authed(list("users/me", 0, "", ""), &people.ada))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.todos, vec![updated.clone()]);
    assert!(page.next_page_token.is_empty());

    todos
        .delete_todo(authed(
            DeleteTodoRequest {
                name: created.name.clone(),
            },
            &people.ada,
        ))
        .await
        .unwrap();
    expect_code(
        todos
            .get_todo(authed(
                GetTodoRequest {
                    name: created.name.clone(),
                },
                &people.ada,
            ))
            .await,
        Code::NotFound,
    );
    expect_code(
        todos
            .delete_todo(authed(
                DeleteTodoRequest { name: created.name },
                &people.ada,
            ))
            .await,
        Code::NotFound,
    );
    let page = todos
        .list_todos(authed(list("users/me", 0, "", ""), &people.ada))
        .await
        .unwrap()
        .into_inner();
    assert!(
        page.todos.is_empty(),
        "the cached first page was invalidated"
    );
}

async fn pages_are_newest_first_and_cover_everything_once(app: TestApp) {
    let people = app.people().await;
    let mut todos = app.todos().await;
    for i in 0..5 {
        let mut request = new_todo(&format!("todo {i}"));
        request.todo.as_mut().unwrap().completed = i % 2 == 0;
        todos
            .create_todo(authed(request, &people.ada))
            .await
            .unwrap();
    }
    let mut titles = Vec::new();
    let mut token = String::new();
    let mut sizes = Vec::new();
    loop {
        let page = todos
            .list_todos(authed(list("users/me", 2, &token, ""), &people.ada))
            .await
            .unwrap()
            .into_inner();
        sizes.push(page.todos.len());
        titles.extend(page.todos.into_iter().map(|t| t.title));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        sizes,
        vec![2, 2, 1],
        "the last page is short and has no token"
    );
    assert_eq!(
        titles,
        vec!["todo 4", "todo 3", "todo 2", "todo 1", "todo 0"]
    );

    let done = todos
        .list_todos(authed(
            list("users/me", 0, "", "completed=true"),
            &people.ada,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        done.todos
            .iter()
            .map(|t| t.title.as_str())
            .collect::<Vec<_>>(),
        vec!["todo 4", "todo 2", "todo 0"]
    );
    let open = todos
        .list_todos(authed(
            list("users/me", 0, "", "completed = false"),
            &people.ada,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(open.todos.len(), 2);

    let empty = todos
        .list_todos(authed(list("users/me", 0, "", ""), &people.bob))
        .await
        .unwrap()
        .into_inner();
    assert!(
        empty.todos.is_empty() && empty.next_page_token.is_empty(),
        "an empty list is an empty page"
    );
}

async fn tampered_or_foreign_page_tokens_are_invalid(app: TestApp) {
    let people = app.people().await;
    let mut todos = app.todos().await;
    for i in 0..3 {
        todos
            .create_todo(authed(new_todo(&format!("t{i}")), &people.ada))
            .await
            .unwrap();
    }
    let page = todos
        .list_todos(authed(list("users/me", 1, "", ""), &people.ada))
        .await
        .unwrap()
        .into_inner();
    let mut tampered = page.next_page_token.clone().into_bytes();
    tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let status = expect_code(
        todos
            .list_todos(authed(list("users/me", 1, &tampered, ""), &people.ada))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&status).as_deref(), Some("page_token"));
    // A token is bound to its query: another filter cannot continue it.
    expect_code(
        todos
            .list_todos(authed(
                list("users/me", 1, &page.next_page_token, "completed=true"),
                &people.ada,
            ))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        todos
            .list_todos(authed(
                list("users/me", 0, "", "priority=high"),
                &people.ada,
            ))
            .await,
        Code::InvalidArgument,
    );
}

async fn only_the_owner_writes_and_only_owner_or_admin_reads(app: TestApp) {
    let people = app.people().await;
    let mut todos = app.todos().await;
    let todo = todos
        .create_todo(authed(new_todo("mine"), &people.ada))
        .await
        .unwrap()
        .into_inner();
    let ada_parent = todo.name.split("/todos/").next().unwrap().to_owned();

    expect_code(
        todos
            .get_todo(authed(
                GetTodoRequest {
                    name: todo.name.clone(),
                },
                &people.bob,
            ))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        todos
            .list_todos(authed(list(&ada_parent, 0, "", ""), &people.bob))
            .await,
        Code::PermissionDenied,
    );
    let mut hijack = new_todo("theirs");
    hijack.parent = ada_parent.clone();
    expect_code(
        todos.create_todo(authed(hijack.clone(), &people.bob)).await,
        Code::PermissionDenied,
    );
    let change = Todo {
        name: todo.name.clone(),
        title: "pwned".into(),
        ..Default::default()
    };
    expect_code(
        todos
            .update_todo(authed(
                UpdateTodoRequest {
                    todo: Some(change.clone()),
                    update_mask: mask(&["title"]),
                },
                &people.bob,
            ))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        todos
            .delete_todo(authed(
                DeleteTodoRequest {
                    name: todo.name.clone(),
                },
                &people.bob,
            ))
            .await,
        Code::PermissionDenied,
    );

    // Bob naming Ada's todo under his own name finds nothing, even with it cached.
    let bob_me = app.user_name(&people.bob).await;
    let smuggled = todo.name.replace(&ada_parent, &bob_me);
    expect_code(
        todos
            .get_todo(authed(GetTodoRequest { name: smuggled }, &people.bob))
            .await,
        Code::NotFound,
    );

    // An admin reads, but does not write.
    todos
        .get_todo(authed(
            GetTodoRequest {
                name: todo.name.clone(),
            },
            &people.admin,
        ))
        .await
        .unwrap();
    assert_eq!(
        todos
            .list_todos(authed(list(&ada_parent, 0, "", ""), &people.admin))
            .await
            .unwrap()
            .into_inner()
            .todos
            .len(),
        1
    );
    expect_code(
        todos.create_todo(authed(hijack, &people.admin)).await,
        Code::PermissionDenied,
    );
    expect_code(
        todos
            .update_todo(authed(
                UpdateTodoRequest {
                    todo: Some(change),
                    update_mask: mask(&["title"]),
                },
                &people.admin,
            ))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        todos
            .get_todo(GetTodoRequest {
                name: todo.name.clone(),
            })
            .await,
        Code::Unauthenticated,
    );

    let unchanged = todos
        .get_todo(authed(GetTodoRequest { name: todo.name }, &people.ada))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged.title, "mine");
    assert_eq!(app.count("todos_todos").await, 1);
}

async fn bad_input_is_invalid_and_writes_nothing(app: TestApp) {
    let people = app.people().await;
    let mut todos = app.todos().await;
    for title in ["", "   ", "a\u{7}b"] {
        let status = expect_code(
            todos
                .create_todo(authed(new_todo(title), &people.ada))
                .await,
            Code::InvalidArgument,
        );
        assert_eq!(
            violated_field(&status).as_deref(),
            Some("todo.title"),
            "{title:?}"
        );
    }
    let long = "x".repeat(501);
    expect_code(
        todos
            .create_todo(authed(new_todo(&long), &people.ada))
            .await,
        Code::InvalidArgument,
    );
    let mut missing = new_todo("x");
    missing.todo = None;
    expect_code(
        todos.create_todo(authed(missing, &people.ada)).await,
        Code::InvalidArgument,
    );
    let mut bad_parent = new_todo("x");
    bad_parent.parent = "users/nobody".into();
    expect_code(
        todos.create_todo(authed(bad_parent, &people.ada)).await,
        Code::InvalidArgument,
    );
    let mut bad_request_id = new_todo("x");
    bad_request_id.request_id = "not-a-uuid".into();
    expect_code(
        todos.create_todo(authed(bad_request_id, &people.ada)).await,
        Code::InvalidArgument,
    );
    assert_eq!(app.count("todos_todos").await, 0);

    let todo = todos
        .create_todo(authed(new_todo("keep"), &people.ada))
        .await
        .unwrap()
        .into_inner();
    let change = Todo {
        name: todo.name.clone(),
        title: String::new(),
        completed: true,
        ..Default::default()
    };
    let status = expect_code(
        todos
            .update_todo(authed(
                UpdateTodoRequest {
                    todo: Some(change.clone()),
                    update_mask: mask(&["completed", "owner"]),
                },
                &people.ada,
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&status).as_deref(), Some("update_mask"));
    expect_code(
        todos
            .update_todo(authed(
                UpdateTodoRequest {
                    todo: Some(change.clone()),
                    update_mask: mask(&["title"]),
                },
                &people.ada,
            ))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        todos
            .update_todo(authed(
                UpdateTodoRequest {
                    todo: Some(change),
                    update_mask: None,
                },
                &people.ada,
            ))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        todos
            .get_todo(authed(
                GetTodoRequest {
                    name: "users/me/todos/x".into(),
                },
                &people.ada,
            ))
            .await,
        Code::InvalidArgument,
    );
    let after = todos
        .get_todo(authed(GetTodoRequest { name: todo.name }, &people.ada))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((after.title.as_str(), after.completed), ("keep", false));
}

async fn a_repeated_request_id_returns_the_first_todo(app: TestApp) {
    let people = app.people().await;
    let mut todos = app.todos().await;
    let request_id = uuid::Uuid::new_v4().to_string();
    let mut request = new_todo("once");
    request.request_id = request_id.clone();
    let first = todos
        .create_todo(authed(request.clone(), &people.ada))
        .await
        .unwrap()
        .into_inner();
    let again = todos
        .create_todo(authed(request.clone(), &people.ada))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, again);

    let mut other = request.clone();
    other.todo.as_mut().unwrap().title = "twice".into();
    let status = expect_code(
        todos.create_todo(authed(other, &people.ada)).await,
        Code::AlreadyExists,
    );
    assert!(status.message().contains(&request_id), "{status:?}");

    // The same key is Bob's own to use.
    todos
        .create_todo(authed(request, &people.bob))
        .await
        .unwrap();
    assert_eq!(app.count("todos_todos").await, 2);
}

on_every_store!(
    create_get_update_list_delete,
    pages_are_newest_first_and_cover_everything_once,
    tampered_or_foreign_page_tokens_are_invalid,
    only_the_owner_writes_and_only_owner_or_admin_reads,
    bad_input_is_invalid_and_writes_nothing,
    a_repeated_request_id_returns_the_first_todo
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_with_one_request_id_make_one_todo() {
    let app = TestApp::spawn(Stores::PostgresRedis).await;
    let people = app.people().await;
    let mut request = new_todo("once");
    request.request_id = uuid::Uuid::new_v4().to_string();
    let clients = clients(20, || app.todos()).await;
    let names: std::collections::HashSet<String> = at_once(clients, |_, mut todos| {
        let request = authed(request.clone(), &people.ada);
        async move { todos.create_todo(request).await.unwrap().into_inner().name }
    })
    .await
    .into_iter()
    .collect();
    let peak = app.peak_in_flight("keel.todos.v1.TodoService").await;
    assert!(peak > 1.0, "the creates overlapped");
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(app.count("todos_todos").await, 1);
}
