//! Server-streaming RPCs over HTTP: Server-Sent Events when the client accepts
//! `text/event-stream`, NDJSON otherwise; an error mid-stream is a final event, not a silent
//! close; a quiet event stream sends a comment every 15 s; a client address holds only so many
//! open at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt as _;
use prost_reflect::DescriptorPool;
use tonic::Streaming;

use crate::routes::Route;

/// How long an event stream goes without a byte before it sends a comment.
const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// One message as a frame of the chosen format.
pub fn frame(json: &[u8], sse: bool, event: Option<&str>) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 16);
    if sse {
        if let Some(event) = event {
            out.extend_from_slice(format!("event: {event}\n").as_bytes());
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(json);
        out.extend_from_slice(b"\n\n");
    } else {
        out.extend_from_slice(json);
        out.push(b'\n');
    }
    out.into()
}

/// The open streams of a gateway, by client address.
#[derive(Debug)]
pub struct Open {
    by_address: Mutex<HashMap<IpAddr, usize>>,
    per_address: usize,
}

impl Open {
    /// At most `per_address` open streams per client address.
    pub fn new(per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            by_address: Mutex::default(),
            per_address,
        })
    }

    /// A place for one more stream of `client`'s, if it has room.
    pub fn open(self: &Arc<Self>, client: IpAddr) -> Option<Slot> {
        let mut open = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        let held = open.entry(client).or_default();
        if *held >= self.per_address {
            return None;
        }
        *held += 1;
        Some(Slot {
            open: self.clone(),
            client,
        })
    }
}

/// One open stream's place, given back when its body ends or is dropped.
#[derive(Debug)]
pub struct Slot {
    open: Arc<Open>,
    client: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .open
            .by_address
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(held) = open.get_mut(&self.client) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// The HTTP response for a stream of response messages, holding `slot` while it streams.
pub fn respond(
    route: Route,
    pool: DescriptorPool,
    response: tonic::Response<Streaming<Bytes>>,
    sse: bool,
    request_id: &HeaderValue,
    slot: Slot,
) -> Response {
    let messages = response.into_inner();
    let id = String::from_utf8_lossy(request_id.as_bytes()).into_owned();
    let body = futures::stream::unfold((messages, false), move |(mut messages, done)| {
        let _held = &slot;
        let (route, pool, request_id) = (route.clone(), pool.clone(), id.clone());
        async move {
            if done {
                return None;
            }
            let next = if sse {
                // A comment now and then keeps a quiet watch from looking idle to every hop
                // (and to keel's own idle timeout).
                tokio::select! {
                    next = messages.next() => next,
                    () = tokio::time::sleep(KEEP_ALIVE) => {
                        return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), (messages, false)));
                    }
                }
            } else {
                messages.next().await
            };
            match next {
                Some(Ok(bytes)) => match crate::transcode::response(&route, &bytes) {
                    Ok(json) => Some((
                        Ok::<_, std::convert::Infallible>(frame(&json, sse, None)),
                        (messages, false),
                    )),
                    Err(e) => {
                        let error = crate::errors::local(tonic::Code::Internal, &e, None);
                        Some((Ok(error_frame(&error.body, sse)), (messages, true)))
                    }
                },
                Some(Err(status)) => {
                    let error = crate::errors::from_status(&status, &pool, &request_id);
                    Some((Ok(error_frame(&error.body, sse)), (messages, true)))
                }
                None => None,
            }
        }
    });
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, content_type)],
        // Fused: the compression layer may poll a body once more after its end.
        Body::from_stream(futures::StreamExt::fuse(body)),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
        .headers_mut()
        .insert("x-request-id", request_id.clone());
    response
}

fn error_frame(status_json: &[u8], sse: bool) -> Bytes {
    if sse {
        frame(status_json, true, Some("error"))
    } else {
        let wrapped = [b"{\"error\":".as_slice(), status_json, b"}"].concat();
        frame(&wrapped, false, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_and_ndjson_frames() {
        assert_eq!(
            frame(br#"{"a":1}"#, true, None),
            Bytes::from_static(b"data: {\"a\":1}\n\n")
        );
        assert_eq!(
            frame(br#"{"a":1}"#, true, Some("error")),
            Bytes::from_static(b"event: error\ndata: {\"a\":1}\n\n")
        );
        assert_eq!(
            frame(br#"{"a":1}"#, false, None),
            Bytes::from_static(b"{\"a\":1}\n")
        );
        assert_eq!(
            error_frame(br#"{"code":14}"#, false),
            Bytes::from_static(b"{\"error\":{\"code\":14}}\n")
        );
    }
}
