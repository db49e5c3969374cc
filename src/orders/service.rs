//! The OrderService gRPC API: PlaceOrder validates, prices the lines from catalog, writes the
//! order PENDING with its saga's job and answers at once (the same request id, the same order);
//! GetOrder and ListOrders for the buyer (and admins); CancelOrder starts the refund of a
//! confirmed order; WatchOrder streams every change, wherever the saga runs.

use std::collections::HashSet;
use std::sync::Arc;

use keel_auth::Caller;
use keel_mesh::client::MeshChannel;
use keel_pagetoken::PageRequest;
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

use super::changes::Changes;
use super::error::OrderError;
use super::lifecycle::{Action, OrderState, Outcome, Stage, Step};
use super::store::{Change, NewLine, NewOrder, OrderStore, Placed};
use super::watch::{WatchStream, Watches};
use crate::input::{self, FieldError};
use crate::names;
use crate::principal::{self, Reach};
use crate::proto::keel::catalog::v1::BatchGetProductsRequest;
use crate::proto::keel::catalog::v1::catalog_service_client::CatalogServiceClient;
use crate::proto::keel::identity::v1::GetUserRequest;
use crate::proto::keel::identity::v1::identity_service_client::IdentityServiceClient;
use crate::proto::keel::orders::v1::order_service_server::OrderService as OrderApi;
use crate::proto::keel::orders::v1::{
    CancelOrderRequest, GetOrderRequest, LineItem, ListOrdersRequest, ListOrdersResponse, Order,
    PlaceOrderRequest, SagaStep, WatchOrderRequest, order, saga_step,
};
use crate::proto::keel::r#type::v1::Money;

/// Most lines in one order.
const MAX_LINES: usize = 100;
/// Most units of one product in one order.
const MAX_QUANTITY: i64 = 1_000_000;

/// The orders service.
#[derive(Clone)]
pub struct OrderService {
    store: OrderStore,
    catalog: CatalogServiceClient<MeshChannel>,
    identity: IdentityServiceClient<MeshChannel>,
    changes: Changes,
    queue: keel_queue::Queue,
    watches: Arc<Watches>,
}

impl std::fmt::Debug for OrderService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderService").finish_non_exhaustive()
    }
}

impl OrderService {
    /// Orders in `store`, priced by catalog, the buyer's e-mail from identity.
    pub fn new(
        store: OrderStore,
        catalog: MeshChannel,
        identity: MeshChannel,
        queue: keel_queue::Queue,
        watches: Arc<Watches>,
    ) -> Self {
        Self {
            changes: Changes::new(store.db()),
            store,
            catalog: CatalogServiceClient::new(catalog),
            identity: IdentityServiceClient::new(identity),
            queue,
            watches,
        }
    }

    async fn place(
        &self,
        caller: &Caller,
        authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
        r: PlaceOrderRequest,
    ) -> Result<Order, OrderError> {
        let owner = principal::reachable_user(&r.parent, caller, "parent", Reach::OwnerOnly)?;
        let order = r
            .order
            .ok_or_else(|| FieldError::new("order", "required"))?;
        let lines = lines(&order.line_items)?;
        let request_id = input::request_id(&r.request_id)?
            .ok_or_else(|| FieldError::new("request_id", "required"))?;
        let canonical = PlaceOrderRequest {
            parent: principal::user_name(owner),
            order: Some(Order {
                line_items: lines
                    .iter()
                    .map(|(product, quantity)| LineItem {
                        product: product_name(*product),
                        quantity: *quantity,
                        unit_price: None,
                    })
                    .collect(),
                ..Default::default()
            }),
            request_id: request_id.clone(),
        };
        let hash = input::fingerprint(&canonical);
        if let Some(placed) = self.store.by_request(owner, &request_id, &hash).await? {
            return Ok(to_proto(&placed));
        }
        let (currency_code, priced) = self.price(&lines).await?;
        let buyer_email = self.buyer_email(authorization).await?;
        let placed = self
            .store
            .place(NewOrder {
                user_id: owner,
                buyer_email,
                currency_code,
                lines: priced,
                request: (request_id, hash),
            })
            .await?;
        self.queue.wake();
        Ok(to_proto(&placed))
    }

    /// Each line's price and title now, from catalog; one currency for the order. A line the
    /// catalog's answer does not price refuses the order (UNAVAILABLE): it is never placed
    /// short of a line or at a price of nothing.
    async fn price(&self, lines: &[(Uuid, i64)]) -> Result<(String, Vec<NewLine>), OrderError> {
        let names: Vec<String> = lines.iter().map(|(p, _)| product_name(*p)).collect();
        let products = self
            .catalog
            .clone()
            .batch_get_products(BatchGetProductsRequest {
                names: names.clone(),
            })
            .await
            .map_err(|s| match s.code() {
                Code::NotFound => OrderError::MissingProduct(s.message().to_owned()),
                Code::InvalidArgument => {
                    FieldError::new("order.line_items.product", s.message()).into()
                }
                _ => {
                    tracing::warn!(status = ?s, "catalog did not price an order");
                    OrderError::Unavailable("catalog")
                }
            })?
            .into_inner()
            .products;
        priced(lines, &names, &products)
    }

    /// The buyer's e-mail, read from identity with the buyer's own token.
    async fn buyer_email(
        &self,
        authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    ) -> Result<String, OrderError> {
        let mut request = Request::new(GetUserRequest {
            name: "users/me".into(),
        });
        if let Some(value) = authorization {
            request.metadata_mut().insert("authorization", value);
        }
        let user = self.identity.clone().get_user(request).await.map_err(|s| {
            tracing::warn!(status = ?s, "identity did not answer for a buyer");
            OrderError::Unavailable("identity")
        })?;
        Ok(user.into_inner().email)
    }

    /// The order `name` names, if the caller may reach it.
    async fn reachable(
        &self,
        caller: &Caller,
        name: &str,
        reach: Reach,
    ) -> Result<Placed, OrderError> {
        let (owner, id) = order_name(name, caller, reach)?;
        self.store
            .find(id)
            .await?
            .filter(|p| p.order.user_id == owner)
            .ok_or_else(|| OrderError::NotFound(name.to_owned()))
    }

    async fn list(
        &self,
        caller: &Caller,
        r: ListOrdersRequest,
    ) -> Result<ListOrdersResponse, OrderError> {
        let owner = principal::reachable_user(&r.parent, caller, "parent", Reach::OwnerOrAdmin)?;
        let page: PageRequest<Uuid> =
            PageRequest::new(r.page_size, &r.page_token, owner.to_string())?;
        let rows = self.store.list(owner, page.after(), page.fetch()).await?;
        let (rows, next_page_token) = page.finish(rows, |last| last.order.id);
        Ok(ListOrdersResponse {
            orders: rows.iter().map(to_proto).collect(),
            next_page_token,
        })
    }

    async fn cancel(&self, caller: &Caller, r: CancelOrderRequest) -> Result<Order, OrderError> {
        let placed = self.reachable(caller, &r.name, Reach::OwnerOnly).await?;
        let order = &placed.order;
        match (placed.state, placed.stage) {
            (OrderState::Confirmed, Stage::Done) => {
                let change = Change {
                    steps: vec![Step::done(Action::Cancel)],
                    saga: Some(Stage::Cancel.phase()),
                    ..Change::default()
                };
                self.store
                    .advance(
                        (order.id, order.user_id),
                        (Stage::Done, Stage::Cancel),
                        change,
                        None,
                    )
                    .await?;
                self.queue.wake();
            }
            // Cancelling already, or cancelled: the same answer again.
            (OrderState::Confirmed | OrderState::Cancelled, _) => {}
            (OrderState::Pending, _) => {
                return Err(OrderError::FailedPrecondition(
                    "the order is still being placed; cancel it once it is CONFIRMED".into(),
                ));
            }
            (OrderState::Rejected, _) => {
                return Err(OrderError::FailedPrecondition(
                    "a rejected order has nothing to cancel".into(),
                ));
            }
        }
        let now = self
            .store
            .find(order.id)
            .await?
            .ok_or_else(|| OrderError::NotFound(r.name.clone()))?;
        Ok(to_proto(&now))
    }
}

fn product_name(id: Uuid) -> String {
    format!("products/{id}")
}

/// `lines` (products `names`, in order) with the price and title catalog answered in
/// `products`, and the order's one currency. A line the answer does not price — missing, or a
/// price without a currency — is UNAVAILABLE: catalog answered short, and the order is never
/// placed short of a line or at a price of nothing.
fn priced(
    lines: &[(Uuid, i64)],
    names: &[String],
    products: &[crate::proto::keel::catalog::v1::Product],
) -> Result<(String, Vec<NewLine>), OrderError> {
    let unpriced = || {
        tracing::warn!(
            ?names,
            "catalog's answer did not price every line of an order"
        );
        OrderError::Unavailable("catalog")
    };
    let mut currency: Option<String> = None;
    let mut priced = Vec::with_capacity(lines.len());
    for ((product_id, quantity), name) in lines.iter().zip(names) {
        let product = products
            .iter()
            .find(|p| &p.name == name)
            .ok_or_else(unpriced)?;
        let price = product.price.clone().ok_or_else(unpriced)?;
        if price.currency_code.is_empty() {
            return Err(unpriced());
        }
        match &currency {
            None => currency = Some(price.currency_code.clone()),
            Some(c) if *c != price.currency_code => {
                return Err(FieldError::new(
                    "order.line_items",
                    "every product of an order must be priced in one currency",
                )
                .into());
            }
            Some(_) => {}
        }
        priced.push(NewLine {
            product_id: *product_id,
            title: product.title.clone(),
            quantity: *quantity,
            unit_price_units: price.units,
        });
    }
    Ok((currency.ok_or_else(unpriced)?, priced))
}

/// The validated lines: 1 to 100, each product once, 1 to a million units.
fn lines(items: &[LineItem]) -> Result<Vec<(Uuid, i64)>, FieldError> {
    if items.is_empty() || items.len() > MAX_LINES {
        return Err(FieldError::new(
            "order.line_items",
            format!("1 to {MAX_LINES} lines"),
        ));
    }
    let mut seen = HashSet::new();
    items
        .iter()
        .map(|item| {
            let product = item
                .product
                .strip_prefix("products/")
                .and_then(names::canonical_uuid)
                .ok_or_else(|| {
                    FieldError::new("order.line_items.product", "must be `products/{product}`")
                })?;
            if !(1..=MAX_QUANTITY).contains(&item.quantity) {
                return Err(FieldError::new(
                    "order.line_items.quantity",
                    format!("1 to {MAX_QUANTITY}"),
                ));
            }
            if !seen.insert(product) {
                return Err(FieldError::new(
                    "order.line_items.product",
                    format!("{} appears twice", item.product),
                ));
            }
            Ok((product, item.quantity))
        })
        .collect()
}

/// The owner and id in `users/{user}/orders/{order}`, if the caller may reach it.
fn order_name(name: &str, caller: &Caller, reach: Reach) -> Result<(Uuid, Uuid), OrderError> {
    Ok(
        principal::reachable_child(name, "orders", caller, "name", reach)
            .map_err(crate::refusal::Refusal::from)?,
    )
}

/// An order as the API shows it.
pub(super) fn to_proto(placed: &Placed) -> Order {
    let o = &placed.order;
    let state = match placed.state {
        OrderState::Pending => order::State::Pending,
        OrderState::Confirmed => order::State::Confirmed,
        OrderState::Rejected => order::State::Rejected,
        OrderState::Cancelled => order::State::Cancelled,
    };
    let action = |a: Action| {
        saga_step::Action::from_str_name(a.as_str()).unwrap_or(saga_step::Action::Unspecified)
            as i32
    };
    let outcome = |o: Outcome| {
        saga_step::Outcome::from_str_name(o.as_str()).unwrap_or(saga_step::Outcome::Unspecified)
            as i32
    };
    Order {
        name: super::order_name(o.user_id, o.id),
        line_items: placed
            .lines
            .iter()
            .map(|l| LineItem {
                product: product_name(l.product_id),
                quantity: l.quantity,
                unit_price: Some(Money {
                    currency_code: l.currency_code.clone(),
                    units: l.unit_price_units,
                }),
            })
            .collect(),
        total: Some(Money {
            currency_code: o.currency_code.clone(),
            units: o.total_units,
        }),
        state: state as i32,
        // The reason is the decision's; the buyer reads it once the order is settled REJECTED.
        rejection_reason: if placed.state == OrderState::Rejected {
            o.rejection_reason.clone()
        } else {
            String::new()
        },
        create_time: Some(crate::proto::timestamp(o.created_at)),
        update_time: Some(crate::proto::timestamp(o.updated_at)),
        history: placed
            .history
            .iter()
            .map(|r| SagaStep {
                action: action(r.step.action),
                outcome: outcome(r.step.outcome),
                detail: r.step.detail.clone(),
                compensation: r.step.compensation,
                time: Some(crate::proto::timestamp(r.at)),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl OrderApi for OrderService {
    async fn place_order(
        &self,
        request: Request<PlaceOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let caller = principal::caller(&request)?;
        let authorization = request.metadata().get("authorization").cloned();
        Ok(Response::new(
            self.place(&caller, authorization, request.into_inner())
                .await?,
        ))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let caller = principal::caller(&request)?;
        let placed = self
            .reachable(&caller, &request.into_inner().name, Reach::OwnerOrAdmin)
            .await?;
        Ok(Response::new(to_proto(&placed)))
    }

    async fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            self.list(&caller, request.into_inner()).await?,
        ))
    }

    async fn cancel_order(
        &self,
        request: Request<CancelOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            self.cancel(&caller, request.into_inner()).await?,
        ))
    }

    type WatchOrderStream = WatchStream;

    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let caller = principal::caller(&request)?;
        let placed = self
            .reachable(&caller, &request.into_inner().name, Reach::OwnerOrAdmin)
            .await?;
        let watch = self
            .watches
            .open(principal::caller_id(&caller).map_err(OrderError::from)?)?;
        let (store, hub) = (self.store.clone(), self.changes.clone());
        Ok(Response::new(
            self.watches.stream(watch, &placed, store, hub),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::keel::catalog::v1::Product;

    fn product(id: Uuid, units: i64) -> Product {
        Product {
            name: product_name(id),
            title: "Lamp".into(),
            price: Some(Money {
                currency_code: "EUR".into(),
                units,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn every_line_is_priced_or_the_order_is_not_placed() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let lines = [(a, 2), (b, 1)];
        let names = [product_name(a), product_name(b)];
        // Out of order, as a cache may answer: matched by name, not by position.
        let (currency, lines_priced) =
            priced(&lines, &names, &[product(b, 700), product(a, 2500)]).unwrap();
        assert_eq!(currency, "EUR");
        let units: Vec<i64> = lines_priced.iter().map(|l| l.unit_price_units).collect();
        assert_eq!(units, [2500, 700]);
        assert_eq!(lines_priced[0].title, "Lamp");

        let short = priced(&lines, &names, &[product(a, 2500)]);
        assert!(
            matches!(short, Err(OrderError::Unavailable("catalog"))),
            "{short:?}"
        );
        let no_price = Product {
            price: None,
            ..product(b, 0)
        };
        let unpriced = priced(&lines, &names, &[product(a, 2500), no_price]);
        assert!(
            matches!(unpriced, Err(OrderError::Unavailable(_))),
            "{unpriced:?}"
        );
    }
}
