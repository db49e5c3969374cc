//! A response body that hands its trailers to a hook when the stream ends, so a layer can read
//! or rewrite the final gRPC status without buffering the body.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;

pin_project_lite::pin_project! {
    /// Wraps `inner`; calls `hook` once with the trailers (`Some`) or, when the stream ends
    /// without trailers or with an error, with `None`. If the body is dropped first, the hook is
    /// dropped uncalled.
    pub struct OnTrailers<F> {
        #[pin]
        inner: Body,
        hook: Option<F>,
    }
}

impl<F> OnTrailers<F>
where
    F: FnOnce(Option<&mut HeaderMap>) + Send + 'static,
{
    /// `inner` with `hook` on its end.
    pub fn wrap(inner: Body, hook: F) -> Body {
        Body::new(Self {
            inner,
            hook: Some(hook),
        })
    }
}

impl<F> HttpBody for OnTrailers<F>
where
    F: FnOnce(Option<&mut HeaderMap>),
{
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let frame = match frame {
            Some(Ok(frame)) => match frame.into_trailers() {
                Ok(mut trailers) => {
                    if let Some(hook) = this.hook.take() {
                        hook(Some(&mut trailers));
                    }
                    Some(Ok(Frame::trailers(trailers)))
                }
                Err(data) => Some(Ok(data)),
            },
            end => {
                if let Some(hook) = this.hook.take() {
                    hook(None);
                }
                end
            }
        };
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
