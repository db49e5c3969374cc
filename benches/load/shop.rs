//! A shop to load: products with stock for every order, users with money for every order, and
//! the PlaceOrder request of one of them.

use keel::proto::keel::catalog::v1::catalog_service_client::CatalogServiceClient;
use keel::proto::keel::catalog::v1::{CreateProductRequest, Product};
use keel::proto::keel::orders::v1::{LineItem, Order, PlaceOrderRequest};
use keel::proto::keel::payments::v1::TopUpWalletRequest;
use keel::proto::keel::payments::v1::payment_service_client::PaymentServiceClient;
use tonic::transport::Channel;

use super::{authed, eur, register};

pub const USERS: usize = 20;
pub const PRODUCTS: usize = 5;

/// Products with stock for every order, and users with money for every order.
pub async fn fixtures(channel: &Channel) -> (Vec<String>, Vec<String>) {
    let admin = register(channel.clone(), "admin@example.com").await;
    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(register(channel.clone(), &format!("u{i}@example.com")).await);
    }
    let mut catalog = CatalogServiceClient::new(channel.clone());
    let mut products = Vec::new();
    for i in 0..PRODUCTS {
        let product = Product {
            title: format!("Product {i}"),
            price: eur(10 + i as i64),
            stock: 100_000_000,
            ..Default::default()
        };
        let request = CreateProductRequest {
            product: Some(product),
            request_id: String::new(),
        };
        let created = catalog.create_product(authed(request, &admin)).await;
        products.push(created.unwrap().into_inner().name);
    }
    let mut payments = PaymentServiceClient::new(channel.clone());
    for token in &users {
        let request = TopUpWalletRequest {
            name: "users/me/wallet".into(),
            amount: eur(1_000_000_000),
            request_id: uuid::Uuid::new_v4().to_string(),
        };
        payments
            .top_up_wallet(authed(request, token))
            .await
            .unwrap();
    }
    (products, users)
}

/// A one-line order of `product`, under a request id of its own.
pub fn placing(product: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        parent: "users/me".into(),
        order: Some(Order {
            line_items: vec![LineItem {
                product: product.into(),
                quantity: 1,
                unit_price: None,
            }],
            ..Order::default()
        }),
        request_id: uuid::Uuid::new_v4().to_string(),
    }
}
