//! The registry of keel's services. `keel dev`, `keel serve <service>`, `keel migrate`, the
//! `--<service>-endpoints` flags, the mesh channels and the gateway all read [`DOMAINS`], so a new
//! service is a folder that defines its [`Domain`] and one line here.

use crate::domain::Domain;
use crate::{catalog, identity, jobs, orders, payments, todos};

/// Every service this build can run, in start-up order.
pub static DOMAINS: &[&Domain] = &[
    &identity::DOMAIN,
    &todos::DOMAIN,
    &catalog::DOMAIN,
    &payments::DOMAIN,
    &orders::DOMAIN,
    &jobs::DOMAIN,
];

/// The registered service called `name`.
pub fn named(name: &str) -> Option<&'static Domain> {
    DOMAINS.iter().copied().find(|d| d.name == name)
}
