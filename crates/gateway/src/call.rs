//! Calling a gRPC method with already-encoded bytes: the gateway needs no generated code.

use bytes::{Buf as _, BufMut as _, Bytes};
use http::uri::PathAndQuery;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Request, Response, Status, Streaming};

use crate::Backend;

/// Passes message bytes through untouched.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

fn path(grpc_path: &str) -> Result<PathAndQuery, Status> {
    PathAndQuery::try_from(grpc_path).map_err(|e| Status::internal(format!("bad gRPC path: {e}")))
}

/// A unary call of `grpc_path` on `backend`.
pub async fn unary(
    backend: Backend,
    grpc_path: &str,
    request: Request<Bytes>,
) -> Result<Response<Bytes>, Status> {
    let mut grpc = tonic::client::Grpc::new(backend);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("no backend: {e}")))?;
    grpc.unary(request, path(grpc_path)?, RawCodec).await
}

/// A server-streaming call of `grpc_path` on `backend`.
pub async fn server_streaming(
    backend: Backend,
    grpc_path: &str,
    request: Request<Bytes>,
) -> Result<Response<Streaming<Bytes>>, Status> {
    let mut grpc = tonic::client::Grpc::new(backend);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("no backend: {e}")))?;
    grpc.server_streaming(request, path(grpc_path)?, RawCodec)
        .await
}
