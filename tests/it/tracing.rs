//! Traces leave keel over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and a caller's W3C
//! `traceparent` makes keel's server span part of the caller's trace.

use crate::support;

use std::time::Duration;

use keel::proto::keel::identity::v1::GetJwksRequest;
use keel::proto::keel::identity::v1::identity_service_client::IdentityServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use support::process::KeelProcess;
use tokio::sync::mpsc;

/// An OTLP trace collector that hands every span it receives to the test.
struct Collector(mpsc::UnboundedSender<Span>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send(span);
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_spans_join_the_callers_trace_and_are_exported_over_otlp() {
    let (tx, mut spans) = mpsc::unbounded_channel();
    let listener = keel_testkit::loopback_listener().await;
    let collector = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let keel = KeelProcess::start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    )
    .await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(GetJwksRequest {});
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01").parse().unwrap(),
    );
    IdentityServiceClient::new(keel.channel().await)
        .get_jwks(request)
        .await
        .unwrap();

    let span = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let span = spans.recv().await.expect("collector running");
            if span.name == "keel.identity.v1.IdentityService/GetJwks" {
                return span;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no GetJwks span was exported; logs:\n{}", keel.logs()));
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(hex(&span.trace_id), trace_id, "the caller's trace");
    assert_eq!(
        hex(&span.parent_span_id),
        parent_id,
        "the caller's span is the parent"
    );
}
