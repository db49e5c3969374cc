//! The TodoService gRPC API: the owner reaches their todos (an admin may read them); reads go
//! through the cache, writes invalidate it after commit.

use keel_auth::Caller;
use keel_cache::CacheAside;
use keel_pagetoken::PageRequest;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::entity::todo;
use super::error::TodoError;
use super::store::{NewTodo, TodoChanges, TodoStore};
use crate::input::{self, FieldError, MaskPath};
use crate::principal::{self, Reach};
use crate::proto::keel::todos::v1::todo_service_server::TodoService as TodoApi;
use crate::proto::keel::todos::v1::{
    CreateTodoRequest, DeleteTodoRequest, GetTodoRequest, ListTodosRequest, ListTodosResponse,
    Todo, UpdateTodoRequest,
};

/// Longest title, in characters.
const MAX_TITLE_CHARS: usize = 500;
/// What UpdateTodo may change.
#[derive(Debug, Clone, Copy)]
enum Updatable {
    Title,
    Completed,
}

impl MaskPath for Updatable {
    const PATHS: &'static [(&'static str, Self)] =
        &[("title", Self::Title), ("completed", Self::Completed)];
}
/// Every `filter` ListTodos accepts, canonical: the first pages cached per user.
const FILTERS: [&str; 3] = ["", "completed=true", "completed=false"];

/// The todos service.
#[derive(Debug, Clone)]
pub struct TodoService {
    store: TodoStore,
    todos: CacheAside,
    first_pages: CacheAside,
}

impl TodoService {
    /// The service over `store`, caching single todos in `todos` and each user's first page per
    /// filter in `first_pages`.
    pub fn new(store: TodoStore, todos: CacheAside, first_pages: CacheAside) -> Self {
        Self {
            store,
            todos,
            first_pages,
        }
    }

    async fn create(&self, caller: &Caller, r: CreateTodoRequest) -> Result<Todo, TodoError> {
        let owner = principal::reachable_user(&r.parent, caller, "parent", Reach::OwnerOnly)?;
        let todo = r.todo.ok_or_else(|| FieldError::new("todo", "required"))?;
        let title = input::text(&todo.title, "todo.title", 1, MAX_TITLE_CHARS, false)?;
        let request = match input::request_id(&r.request_id)? {
            Some(id) => {
                // The body as the service understands it: `users/me` and the caller's own
                // name are the same parent.
                let canonical = CreateTodoRequest {
                    parent: principal::user_name(owner),
                    todo: Some(Todo {
                        title: title.clone(),
                        completed: todo.completed,
                        ..Default::default()
                    }),
                    request_id: id.clone(),
                };
                Some((id, input::fingerprint(&canonical)))
            }
            None => None,
        };
        let created = self
            .store
            .create(NewTodo {
                user_id: owner,
                title,
                completed: todo.completed,
                request,
            })
            .await?;
        self.forget_pages(owner).await;
        Ok(to_proto(&created))
    }

    async fn get(&self, caller: &Caller, r: GetTodoRequest) -> Result<Todo, TodoError> {
        let (owner, id) = todo_name(&r.name, "name", caller, Reach::OwnerOrAdmin)?;
        let store = self.store.clone();
        // Keyed by owner and id: the access check ran on the owner in the name, so a cached
        // todo must only ever answer for that owner. What fills the cache is read from the
        // primary: a replica's older row would be served to every later read.
        self.todos
            .get_or_load(&todo_key(owner, id), || {
                keel_replicas::latest(async move {
                    Ok::<_, TodoError>(store.find(owner, id).await?.as_ref().map(to_proto))
                })
            })
            .await?
            .ok_or(TodoError::NotFound)
    }

    async fn list(
        &self,
        caller: &Caller,
        r: ListTodosRequest,
    ) -> Result<ListTodosResponse, TodoError> {
        let owner = principal::reachable_user(&r.parent, caller, "parent", Reach::OwnerOrAdmin)?;
        let (filter, completed) = parse_filter(&r.filter)?;
        let page: PageRequest<Uuid> =
            PageRequest::new(r.page_size, &r.page_token, format!("{owner}|{filter}"))?;
        let first_default_page =
            page.after().is_none() && page.size() == keel_pagetoken::DEFAULT_PAGE_SIZE;
        let store = self.store.clone();
        let load = || async move {
            let rows = store
                .list(owner, completed, page.after(), page.fetch())
                .await?;
            let (rows, next_page_token) = page.finish(rows, |last| last.id);
            Ok::<_, TodoError>(Some(ListTodosResponse {
                todos: rows.iter().map(to_proto).collect(),
                next_page_token,
            }))
        };
        let page = if first_default_page {
            self.first_pages
                .get_or_load(&format!("{owner}:{filter}"), || {
                    keel_replicas::latest(load())
                })
                .await?
        } else {
            load().await?
        };
        Ok(page.unwrap_or_default())
    }

    async fn update(&self, caller: &Caller, r: UpdateTodoRequest) -> Result<Todo, TodoError> {
        let todo = r.todo.ok_or_else(|| FieldError::new("todo", "required"))?;
        let (owner, id) = todo_name(&todo.name, "todo.name", caller, Reach::OwnerOnly)?;
        let mut changes = TodoChanges::default();
        for field in input::update_mask(r.update_mask.as_ref())? {
            match field {
                Updatable::Title => {
                    changes.title = Some(input::text(
                        &todo.title,
                        "todo.title",
                        1,
                        MAX_TITLE_CHARS,
                        false,
                    )?);
                }
                Updatable::Completed => changes.completed = Some(todo.completed),
            }
        }
        let updated = self.store.update(owner, id, changes).await?;
        self.todos.invalidate(&todo_key(owner, id)).await;
        self.forget_pages(owner).await;
        Ok(to_proto(&updated))
    }

    async fn delete(&self, caller: &Caller, r: DeleteTodoRequest) -> Result<(), TodoError> {
        let (owner, id) = todo_name(&r.name, "name", caller, Reach::OwnerOnly)?;
        self.store.delete(owner, id).await?;
        self.todos.invalidate(&todo_key(owner, id)).await;
        self.forget_pages(owner).await;
        Ok(())
    }

    async fn forget_pages(&self, owner: Uuid) {
        for filter in FILTERS {
            self.first_pages
                .invalidate(&format!("{owner}:{filter}"))
                .await;
        }
    }
}

fn todo_key(owner: Uuid, id: Uuid) -> String {
    format!("{owner}/{id}")
}

/// The owner and id in `users/{user}/todos/{todo}`, if the caller may reach it.
fn todo_name(
    name: &str,
    field: &'static str,
    caller: &Caller,
    reach: Reach,
) -> Result<(Uuid, Uuid), TodoError> {
    Ok(
        principal::reachable_child(name, "todos", caller, field, reach)
            .map_err(crate::refusal::Refusal::from)?,
    )
}

/// The canonical filter and what it selects: empty, `completed=true` or `completed=false`.
fn parse_filter(raw: &str) -> Result<(&'static str, Option<bool>), FieldError> {
    let compact: String = raw.chars().filter(|c| !c.is_whitespace()).collect();
    match compact.as_str() {
        "" => Ok((FILTERS[0], None)),
        "completed=true" => Ok((FILTERS[1], Some(true))),
        "completed=false" => Ok((FILTERS[2], Some(false))),
        _ => Err(FieldError::new(
            "filter",
            "supported filters: completed=true, completed=false",
        )),
    }
}

fn to_proto(m: &todo::Model) -> Todo {
    Todo {
        name: format!("{}/todos/{}", principal::user_name(m.user_id), m.id),
        title: m.title.clone(),
        completed: m.completed,
        create_time: Some(crate::proto::timestamp(m.created_at)),
        update_time: Some(crate::proto::timestamp(m.updated_at)),
    }
}

#[tonic::async_trait]
impl TodoApi for TodoService {
    async fn create_todo(
        &self,
        request: Request<CreateTodoRequest>,
    ) -> Result<Response<Todo>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            self.create(&caller, request.into_inner()).await?,
        ))
    }

    async fn get_todo(&self, request: Request<GetTodoRequest>) -> Result<Response<Todo>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            self.get(&caller, request.into_inner()).await?,
        ))
    }

    async fn list_todos(
        &self,
        request: Request<ListTodosRequest>,
    ) -> Result<Response<ListTodosResponse>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            self.list(&caller, request.into_inner()).await?,
        ))
    }

    async fn update_todo(
        &self,
        request: Request<UpdateTodoRequest>,
    ) -> Result<Response<Todo>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            self.update(&caller, request.into_inner()).await?,
        ))
    }

    async fn delete_todo(
        &self,
        request: Request<DeleteTodoRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = principal::caller(&request)?;
        self.delete(&caller, request.into_inner()).await?;
        Ok(Response::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_canonicalised() {
        assert_eq!(parse_filter("").unwrap(), ("", None));
        assert_eq!(
            parse_filter(" completed = true ").unwrap(),
            ("completed=true", Some(true))
        );
        assert_eq!(
            parse_filter("completed=false").unwrap(),
            ("completed=false", Some(false))
        );
        assert!(parse_filter("completed=maybe").is_err());
        assert!(parse_filter("title=x").is_err());
    }
}
