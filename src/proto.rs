//! The generated code of every keel API and the descriptor set that reflection and the
//! gateway read.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// keel's own packages.
pub mod keel {
    /// Shared types.
    pub mod r#type {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("keel.r#type.v1");
        }
    }
    /// Users, sign-in, tokens.
    pub mod identity {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("keel.identity.v1");
        }
    }
    /// Todo lists.
    pub mod todos {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("keel.todos.v1");
        }
    }
    /// Products and stock.
    pub mod catalog {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("keel.catalog.v1");
        }
    }
    /// Wallets and the ledger.
    pub mod payments {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("keel.payments.v1");
        }
    }
    /// Orders and their saga.
    pub mod orders {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("keel.orders.v1");
        }
    }
    /// Background jobs.
    pub mod jobs {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("keel.jobs.v1");
        }
    }
}

/// Google's HTTP annotations and error model.
pub mod google {
    /// google.api.
    pub mod api {
        tonic::include_proto!("google.api");
    }
    /// google.rpc.
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// The encoded `FileDescriptorSet` of every file in `proto/` and its imports, with the
/// `google.api.http` options intact.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/keel_descriptor.bin"));

/// A `google.protobuf.Timestamp` for `t`.
pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}
