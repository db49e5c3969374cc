//! CatalogService (anyone reads, admins write; reads cached with single flight) and the internal
//! InventoryService (stock reservations).

use keel_auth::Caller;
use keel_cache::CacheAside;
use keel_pagetoken::PageRequest;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::entity::{product, reservation_line};
use super::error::CatalogError;
use super::inventory::{COMMITTED, Held, Inventory, Line, RELEASED, RESERVED};
use super::products::{Cursor, NewProduct, ProductChanges, ProductStore};
use super::query::{ProductFilter, ProductOrder};
use crate::input::{self, FieldError, MaskPath, Sign};
use crate::principal;
use crate::proto::keel::catalog::v1::catalog_service_server::CatalogService as CatalogApi;
use crate::proto::keel::catalog::v1::inventory_service_server::InventoryService as InventoryApi;
use crate::proto::keel::catalog::v1::{
    BatchGetProductsRequest, BatchGetProductsResponse, CommitReservationRequest,
    CommitReservationResponse, CreateProductRequest, DeleteProductRequest, GetProductRequest,
    ListProductsRequest, ListProductsResponse, Product, ReleaseStockRequest, ReleaseStockResponse,
    Reservation, ReserveStockRequest, ReserveStockResponse, StockLine, UpdateProductRequest,
    reservation,
};
use crate::proto::keel::r#type::v1::Money;

const MAX_TITLE_CHARS: usize = 200;
const MAX_DESCRIPTION_CHARS: usize = 5000;
const MAX_BATCH: usize = 1000;
const MAX_LINES: usize = 100;
const MAX_RESERVATION_ID_CHARS: usize = 200;
/// Who may change the catalog, as refusals say it.
const ADMINS_ONLY: &str = "only admins change the catalog";

/// What UpdateProduct may change.
#[derive(Debug, Clone, Copy)]
enum Updatable {
    Title,
    Description,
    Price,
    Stock,
    /// Not a change: the precondition (AIP-154), named when a REST body's keys are the mask.
    Etag,
}

impl MaskPath for Updatable {
    const PATHS: &'static [(&'static str, Self)] = &[
        ("title", Self::Title),
        ("description", Self::Description),
        ("price", Self::Price),
        ("stock", Self::Stock),
        ("etag", Self::Etag),
    ];
}

/// The catalog: products (public reads, admin writes) and their stock.
#[derive(Debug, Clone)]
pub struct CatalogService {
    products: ProductStore,
    inventory: Inventory,
    cache: CacheAside,
}

impl CatalogService {
    /// The service over `products` and `inventory`, caching products in `cache`.
    pub fn new(products: ProductStore, inventory: Inventory, cache: CacheAside) -> Self {
        Self {
            products,
            inventory,
            cache,
        }
    }

    async fn create(
        &self,
        caller: &Caller,
        r: CreateProductRequest,
    ) -> Result<Product, CatalogError> {
        principal::require_admin(caller, ADMINS_ONLY)?;
        let p = r
            .product
            .ok_or_else(|| FieldError::new("product", "required"))?;
        let title = input::text(&p.title, "product.title", 1, MAX_TITLE_CHARS, false)?;
        let description = input::text(
            &p.description,
            "product.description",
            0,
            MAX_DESCRIPTION_CHARS,
            true,
        )?;
        let price = input::money(p.price.as_ref(), "product.price", Sign::NonNegative)?;
        let stock = stock(p.stock)?;
        let request = input::request_id(&r.request_id)?.map(|id| {
            let canonical = CreateProductRequest {
                product: Some(Product {
                    title: title.clone(),
                    description: description.clone(),
                    price: p.price.clone(),
                    stock,
                    ..Default::default()
                }),
                request_id: id.clone(),
            };
            (id, input::fingerprint(&canonical))
        });
        let created = self
            .products
            .create(NewProduct {
                title,
                description,
                price,
                stock,
                request,
            })
            .await?;
        Ok(to_proto(&created))
    }

    async fn get(&self, name: &str, field: &'static str) -> Result<Product, CatalogError> {
        let id = product_id(name, field)?;
        let products = self.products.clone();
        // What fills the cache is read from the primary: a replica's older row would be
        // served to every later read.
        self.cache
            .get_or_load(&id.to_string(), || {
                keel_replicas::latest(async move {
                    Ok::<_, CatalogError>(products.find(id).await?.as_ref().map(to_proto))
                })
            })
            .await?
            .ok_or_else(|| CatalogError::ProductNotFound(super::product_name(id)))
    }

    async fn list(&self, r: ListProductsRequest) -> Result<ListProductsResponse, CatalogError> {
        let filter = ProductFilter::parse(&r.filter)?;
        let order = ProductOrder::parse(&r.order_by)?;
        let query = format!("{}|{order:?}", filter.canonical());
        let page = PageRequest::new(r.page_size, &r.page_token, query)?;
        let rows = self
            .products
            .list(&filter, order, page.after(), page.fetch())
            .await?;
        let (rows, next_page_token) = page.finish(rows, |last| Cursor {
            price: matches!(order, ProductOrder::PriceAsc | ProductOrder::PriceDesc)
                .then_some(last.price_units),
            id: last.id,
        });
        Ok(ListProductsResponse {
            products: rows.iter().map(to_proto).collect(),
            next_page_token,
        })
    }

    async fn batch_get(
        &self,
        r: BatchGetProductsRequest,
    ) -> Result<BatchGetProductsResponse, CatalogError> {
        if r.names.len() > MAX_BATCH {
            return Err(FieldError::new("names", format!("at most {MAX_BATCH} names")).into());
        }
        let ids = r
            .names
            .iter()
            .map(|name| product_id(name, "names"))
            .collect::<Result<Vec<Uuid>, _>>()?;
        let keys: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let store = self.products.clone();
        // One cache read for all of them, one query of the primary for the misses.
        let found = self
            .cache
            .get_many_or_load(&keys, |missing| {
                keel_replicas::latest(async move {
                    let ids: Vec<Uuid> = missing.iter().filter_map(|k| k.parse().ok()).collect();
                    let rows = store.find_many(&ids).await?;
                    Ok::<_, CatalogError>(
                        rows.iter()
                            .map(|m| (m.id.to_string(), to_proto(m)))
                            .collect(),
                    )
                })
            })
            .await?;
        let products = ids
            .iter()
            .zip(found)
            .map(|(id, product)| {
                product.ok_or_else(|| CatalogError::ProductNotFound(super::product_name(*id)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(BatchGetProductsResponse { products })
    }

    async fn update(
        &self,
        caller: &Caller,
        r: UpdateProductRequest,
    ) -> Result<Product, CatalogError> {
        principal::require_admin(caller, ADMINS_ONLY)?;
        let p = r
            .product
            .ok_or_else(|| FieldError::new("product", "required"))?;
        let id = product_id(&p.name, "product.name")?;
        let mut changes = ProductChanges::default();
        for field in input::update_mask(r.update_mask.as_ref())? {
            match field {
                Updatable::Title => {
                    changes.title = Some(input::text(
                        &p.title,
                        "product.title",
                        1,
                        MAX_TITLE_CHARS,
                        false,
                    )?)
                }
                Updatable::Description => {
                    changes.description = Some(input::text(
                        &p.description,
                        "product.description",
                        0,
                        MAX_DESCRIPTION_CHARS,
                        true,
                    )?);
                }
                Updatable::Price => {
                    changes.price = Some(input::money(
                        p.price.as_ref(),
                        "product.price",
                        Sign::NonNegative,
                    )?)
                }
                Updatable::Stock => changes.stock = Some(stock(p.stock)?),
                Updatable::Etag => {}
            }
        }
        changes.version = etag(&p.etag)?;
        if changes.stock.is_some() && changes.version.is_none() {
            // An absolute stock level is only right against the stock it was decided on:
            // reservations made since would be erased.
            return Err(FieldError::new(
                "product.etag",
                "required to set stock: the etag of the product as read, so that reservations \
                 made since are not overwritten",
            )
            .into());
        }
        let updated = self.products.update(id, changes).await?;
        self.cache.invalidate(&id.to_string()).await;
        Ok(to_proto(&updated))
    }

    async fn delete(&self, caller: &Caller, r: DeleteProductRequest) -> Result<(), CatalogError> {
        principal::require_admin(caller, ADMINS_ONLY)?;
        let id = product_id(&r.name, "name")?;
        self.products.delete(id).await?;
        self.cache.invalidate(&id.to_string()).await;
        Ok(())
    }

    async fn reserve(
        &self,
        caller: &Caller,
        r: ReserveStockRequest,
    ) -> Result<Reservation, CatalogError> {
        principal::require_service(caller)?;
        let id = reservation_id(&r.reservation_id)?;
        if r.lines.is_empty() || r.lines.len() > MAX_LINES {
            return Err(FieldError::new("lines", format!("1 to {MAX_LINES} lines")).into());
        }
        let mut lines = Vec::with_capacity(r.lines.len());
        for line in &r.lines {
            let product_id = product_id(&line.product, "lines.product")?;
            if line.quantity < 1 {
                return Err(FieldError::new("lines.quantity", "must be at least 1").into());
            }
            if lines.iter().any(|l: &Line| l.product_id == product_id) {
                return Err(FieldError::new(
                    "lines.product",
                    format!("{} appears twice", line.product),
                )
                .into());
            }
            lines.push(Line {
                product_id,
                quantity: line.quantity,
            });
        }
        let hash = input::fingerprint(&ReserveStockRequest {
            reservation_id: id.clone(),
            lines: lines
                .iter()
                .map(|l| StockLine {
                    product: super::product_name(l.product_id),
                    quantity: l.quantity,
                })
                .collect(),
        });
        let held = self.inventory.reserve(&id, &lines, &hash).await?;
        self.forget(&held.lines).await;
        Ok(reservation_proto(&held))
    }

    async fn release(
        &self,
        caller: &Caller,
        r: ReleaseStockRequest,
    ) -> Result<Reservation, CatalogError> {
        principal::require_service(caller)?;
        let held = self
            .inventory
            .release(&reservation_id(&r.reservation_id)?)
            .await?;
        self.forget(&held.lines).await;
        Ok(reservation_proto(&held))
    }

    async fn commit(
        &self,
        caller: &Caller,
        r: CommitReservationRequest,
    ) -> Result<Reservation, CatalogError> {
        principal::require_service(caller)?;
        let held = self
            .inventory
            .commit(&reservation_id(&r.reservation_id)?)
            .await?;
        Ok(reservation_proto(&held))
    }

    /// Drops cached products whose stock a reservation changed.
    async fn forget(&self, lines: &[reservation_line::Model]) {
        for line in lines {
            self.cache.invalidate(&line.product_id.to_string()).await;
        }
    }
}

fn stock(stock: i64) -> Result<i64, FieldError> {
    if stock < 0 {
        Err(FieldError::new("product.stock", "must not be negative"))
    } else {
        Ok(stock)
    }
}

/// The version an etag names, if one was sent.
fn etag(raw: &str) -> Result<Option<i64>, FieldError> {
    if raw.is_empty() {
        return Ok(None);
    }
    raw.parse()
        .map(Some)
        .map_err(|_| FieldError::new("product.etag", "not an etag this service gave"))
}

fn product_id(name: &str, field: &'static str) -> Result<Uuid, FieldError> {
    name.strip_prefix("products/")
        .and_then(crate::names::canonical_uuid)
        .ok_or_else(|| FieldError::new(field, "must be `products/{product}`"))
}

fn reservation_id(raw: &str) -> Result<String, FieldError> {
    input::text(raw, "reservation_id", 1, MAX_RESERVATION_ID_CHARS, false)
}

fn to_proto(m: &product::Model) -> Product {
    Product {
        name: super::product_name(m.id),
        title: m.title.clone(),
        description: m.description.clone(),
        price: Some(Money {
            currency_code: m.currency_code.clone(),
            units: m.price_units,
        }),
        stock: m.stock,
        create_time: Some(crate::proto::timestamp(m.created_at)),
        update_time: Some(crate::proto::timestamp(m.updated_at)),
        etag: m.version.to_string(),
    }
}

fn reservation_proto(held: &Held) -> Reservation {
    let state = match held.reservation.state.as_str() {
        RESERVED => reservation::State::Reserved,
        RELEASED => reservation::State::Released,
        COMMITTED => reservation::State::Committed,
        _ => reservation::State::Unspecified,
    };
    Reservation {
        reservation_id: held.reservation.reservation_id.clone(),
        lines: held
            .lines
            .iter()
            .map(|l| StockLine {
                product: super::product_name(l.product_id),
                quantity: l.quantity,
            })
            .collect(),
        state: state as i32,
        unit_prices: held
            .lines
            .iter()
            .map(|l| Money {
                currency_code: l.currency_code.clone(),
                units: l.unit_price_units,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl CatalogApi for CatalogService {
    async fn create_product(
        &self,
        request: Request<CreateProductRequest>,
    ) -> Result<Response<Product>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            self.create(&caller, request.into_inner()).await?,
        ))
    }

    async fn get_product(
        &self,
        request: Request<GetProductRequest>,
    ) -> Result<Response<Product>, Status> {
        Ok(Response::new(
            self.get(&request.into_inner().name, "name").await?,
        ))
    }

    async fn list_products(
        &self,
        request: Request<ListProductsRequest>,
    ) -> Result<Response<ListProductsResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn batch_get_products(
        &self,
        request: Request<BatchGetProductsRequest>,
    ) -> Result<Response<BatchGetProductsResponse>, Status> {
        Ok(Response::new(self.batch_get(request.into_inner()).await?))
    }

    async fn update_product(
        &self,
        request: Request<UpdateProductRequest>,
    ) -> Result<Response<Product>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            self.update(&caller, request.into_inner()).await?,
        ))
    }

    async fn delete_product(
        &self,
        request: Request<DeleteProductRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = principal::caller(&request)?;
        self.delete(&caller, request.into_inner()).await?;
        Ok(Response::new(()))
    }
}

#[tonic::async_trait]
impl InventoryApi for CatalogService {
    async fn reserve_stock(
        &self,
        request: Request<ReserveStockRequest>,
    ) -> Result<Response<ReserveStockResponse>, Status> {
        let caller = principal::caller(&request)?;
        let reservation = self.reserve(&caller, request.into_inner()).await?;
        Ok(Response::new(ReserveStockResponse {
            reservation: Some(reservation),
        }))
    }

    async fn release_stock(
        &self,
        request: Request<ReleaseStockRequest>,
    ) -> Result<Response<ReleaseStockResponse>, Status> {
        let caller = principal::caller(&request)?;
        let reservation = self.release(&caller, request.into_inner()).await?;
        Ok(Response::new(ReleaseStockResponse {
            reservation: Some(reservation),
        }))
    }

    async fn commit_reservation(
        &self,
        request: Request<CommitReservationRequest>,
    ) -> Result<Response<CommitReservationResponse>, Status> {
        let caller = principal::caller(&request)?;
        let reservation = self.commit(&caller, request.into_inner()).await?;
        Ok(Response::new(CommitReservationResponse {
            reservation: Some(reservation),
        }))
    }
}
