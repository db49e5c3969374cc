//! What a failure below gRPC proves: that the server never saw the call (so sending it again is
//! safe for any method, gRPC's transparent retry), that the endpoint is gone, or that the
//! caller's time ran out.

use std::error::Error;

/// The errors of `error`'s source chain, itself first.
fn chain<'a>(error: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(error), |e: &&'a (dyn Error + 'static)| (*e).source())
}

/// Whether the server provably never processed the request:
/// - hyper gave it back unsent (`Canceled`: the connection closed or was not ready);
/// - the server refused the stream (`REFUSED_STREAM`), or its GOAWAY named a last stream below
///   this one or came before the stream opened (RFC 9113 §6.8: such streams "were not
///   processed" and may be retried);
/// - no connection could be made at all.
///
/// A connection that breaks while the call is in flight proves nothing: the server may have
/// acted on it.
pub fn never_processed(error: &(dyn Error + 'static)) -> bool {
    chain(error).any(|e| {
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            return hyper.is_canceled();
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

/// Whether an error says the endpoint is not there: refused, reset or unreachable. Such an
/// endpoint answers instantly, which PeakEWMA would read as "idle": it must leave at once.
pub fn connection_lost(error: &(dyn Error + 'static)) -> bool {
    chain(error).any(|e| {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{
                ConnectionAborted, ConnectionRefused, ConnectionReset, NotConnected,
            };
            if matches!(
                io.kind(),
                ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected
            ) {
                return true;
            }
        }
        e.to_string().contains("connect error")
    })
}

/// The error and its causes, as one line: "transport error: connection refused".
pub fn describe(error: &(dyn Error + 'static)) -> String {
    let mut line = String::new();
    for e in chain(error) {
        let text = e.to_string();
        if !text.is_empty() && !line.ends_with(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// Whether the error is tonic's client-side `TimeoutExpired`.
pub fn timed_out(error: &(dyn Error + 'static)) -> bool {
    chain(error).any(|e| e.is::<tonic::TimeoutExpired>())
}

#[cfg(test)]
mod tests {
    //! A stream above a GOAWAY's last stream id has no deterministic case here (a server that
    //! closes right after its GOAWAY resets the connection under the client's HEADERS); the
    //! mesh client's rolling-restart test meets it in every drain.
    use super::*;
    use tower::{Service as _, ServiceExt as _};

    /// What a raw HTTP/2 server does with the connection of a call.
    #[derive(Clone, Copy)]
    enum Server {
        /// RST_STREAM(REFUSED_STREAM) on every stream.
        RefusesStreams,
        /// Reads the request, then drops the connection.
        DropsAcceptedCalls,
    }

    /// One call over a tonic channel to a server behaving as `server`; the transport error.
    async fn failure_against(server: Server) -> tonic::transport::Error {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut connection = h2::server::handshake(socket).await.unwrap();
            while let Some(Ok((_, mut respond))) = connection.accept().await {
                match server {
                    Server::RefusesStreams => respond.send_reset(h2::Reason::REFUSED_STREAM),
                    Server::DropsAcceptedCalls => return,
                }
            }
        });
        let mut channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let request = http::Request::post(format!("http://{addr}/test.Echo/Write"))
            .header("content-type", "application/grpc")
            .body(tonic::body::Body::empty())
            .unwrap();
        channel.ready().await.unwrap();
        channel.call(request).await.expect_err("the call fails")
    }

    #[tokio::test]
    async fn a_refused_stream_was_never_processed() {
        let error = failure_against(Server::RefusesStreams).await;
        assert!(never_processed(&error), "{error:?}");
    }

    #[tokio::test]
    async fn a_connection_that_breaks_in_flight_proves_nothing() {
        let error = failure_against(Server::DropsAcceptedCalls).await;
        assert!(!never_processed(&error), "{error:?}");
    }

    #[test]
    fn a_refused_connection_was_never_processed_and_a_reset_one_proves_nothing() {
        let io = std::io::Error::from;
        assert!(never_processed(&io(std::io::ErrorKind::ConnectionRefused)));
        assert!(!never_processed(&io(std::io::ErrorKind::ConnectionReset)));
        assert!(!never_processed(&io(std::io::ErrorKind::BrokenPipe)));
    }
}
