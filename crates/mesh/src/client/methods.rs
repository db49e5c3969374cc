//! What the proto says about each method, as far as sending a call again is concerned: which
//! methods are safe to retry, which carry an idempotency key, which send a single request
//! message (and so can be buffered and resent).

use std::collections::{HashMap, HashSet};

use prost::Message as _;
use prost_types::method_options::IdempotencyLevel;

/// The `/package.Service/Method` paths the mesh may send again, by reason.
#[derive(Debug, Clone, Default)]
pub struct Methods {
    /// Marked `idempotency_level` NO_SIDE_EFFECTS or IDEMPOTENT: retried on UNAVAILABLE or a
    /// broken connection.
    pub idempotent: HashSet<String>,
    /// Marked NO_SIDE_EFFECTS: reads, which may also be hedged (sent twice at once).
    pub no_side_effects: HashSet<String>,
    /// Their request has a top-level string idempotency key (AIP-155 `request_id`), with its
    /// field number: retried like idempotent ones when the call sets it, since the server
    /// deduplicates on it.
    pub keyed: HashMap<String, u32>,
    /// Their request is one message (not client streaming): the mesh buffers it, so that a call
    /// the server never saw (a refused stream, a connection that closed before sending it) goes
    /// to another endpoint whatever the method. Calls of other paths are sent exactly once.
    pub single_request: HashSet<String>,
    /// Their response is one message (not server streaming): a call that may be sent again
    /// has its answer read whole before it is handed on, so that one cut off mid-way (its
    /// replica killed between the headers and the trailers) is sent again, not failed.
    pub single_response: HashSet<String>,
}

impl Methods {
    /// Reads every method of the encoded descriptor sets; `key_field` names the idempotency key.
    pub fn from_descriptors(descriptor_sets: &[&[u8]], key_field: &str) -> Self {
        let files: Vec<prost_types::FileDescriptorProto> = descriptor_sets
            .iter()
            .filter_map(|bytes| prost_types::FileDescriptorSet::decode(*bytes).ok())
            .flat_map(|set| set.file)
            .collect();
        let key_fields: HashMap<String, u32> = files
            .iter()
            .flat_map(|file| {
                file.message_type.iter().filter_map(move |message| {
                    let key = message.field.iter().find(|f| {
                        f.name() == key_field
                            && f.r#type() == prost_types::field_descriptor_proto::Type::String
                    })?;
                    let number = u32::try_from(key.number()).ok().filter(|n| *n > 0)?;
                    Some((format!(".{}.{}", file.package(), message.name()), number))
                })
            })
            .collect();
        let mut methods = Self::default();
        for file in &files {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    let level = method.options.as_ref().map(|o| o.idempotency_level());
                    if matches!(
                        level,
                        Some(IdempotencyLevel::NoSideEffects | IdempotencyLevel::Idempotent)
                    ) {
                        methods.idempotent.insert(path.clone());
                    }
                    if level == Some(IdempotencyLevel::NoSideEffects) {
                        methods.no_side_effects.insert(path.clone());
                    }
                    if let Some(&number) = key_fields.get(method.input_type()) {
                        methods.keyed.insert(path.clone(), number);
                    }
                    if !method.server_streaming() {
                        methods.single_response.insert(path.clone());
                    }
                    if !method.client_streaming() {
                        methods.single_request.insert(path);
                    }
                }
            }
        }
        methods
    }

    /// Whether calls of `path` are buffered so that they can be sent again.
    pub(super) fn resendable(&self, path: &str) -> bool {
        self.single_request.contains(path)
            || self.idempotent.contains(path)
            || self.keyed.contains_key(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_declares_no_idempotency_and_takes_single_requests() {
        let methods = Methods::from_descriptors(&[tonic_health::pb::FILE_DESCRIPTOR_SET], "id");
        assert!(methods.idempotent.is_empty());
        assert!(methods.keyed.is_empty());
        assert!(methods.resendable("/grpc.health.v1.Health/Check"));
        // Server streaming still sends one request message.
        assert!(methods.resendable("/grpc.health.v1.Health/Watch"));
        assert!(!methods.resendable("/grpc.health.v1.Health/Unknown"));
        assert!(
            methods
                .single_response
                .contains("/grpc.health.v1.Health/Check")
        );
        assert!(
            !methods
                .single_response
                .contains("/grpc.health.v1.Health/Watch")
        );
    }

    #[test]
    fn client_streaming_requests_are_never_buffered() {
        let methods = Methods::from_descriptors(
            &[tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET],
            "request_id",
        );
        assert!(
            !methods.resendable("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            "a bidirectional stream is sent as it comes"
        );
    }
}
