//! A gRPC client for tests, generated (by `build.rs`) from the same
//! `proto/clastor/v1/lock.proto` the server serves: unary calls and a
//! `Session` stream driven request by request.

use std::net::SocketAddr;
use std::time::Duration;

use clastor::server::grpc_proto as pb;
use pb::locks_client::LocksClient;
use pb::session_event::Event as Out;
use pb::session_request::Op;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

pub(crate) type Client = LocksClient<Channel>;

/// A client on `addr` (HTTP/2 without TLS).
pub(crate) async fn connect(addr: SocketAddr) -> Client {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    LocksClient::new(channel)
}

/// An acquire request.
pub(crate) fn acquire(kind: &str, id: &str, wait_ms: u32) -> pb::AcquireRequest {
    pb::AcquireRequest {
        kind: kind.into(),
        id: id.into(),
        wait_ms,
        ..Default::default()
    }
}

/// One `Session` stream: requests in, events out.
pub(crate) struct Stream {
    tx: mpsc::Sender<pb::SessionRequest>,
    events: tonic::Streaming<pb::SessionEvent>,
    /// The session id from `SessionOpened`.
    pub(crate) session_id: u64,
    pub(crate) confirm_ms: u32,
}

impl Stream {
    /// Opens a stream and reads its `SessionOpened`.
    pub(crate) async fn open(client: &mut Client) -> Stream {
        let (tx, rx) = mpsc::channel(64);
        let mut events = client.session(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let first = events.message().await.unwrap().unwrap();
        let Some(Out::Opened(o)) = first.event else {
            panic!("first event is not SessionOpened: {first:?}")
        };
        Stream {
            tx,
            events,
            session_id: o.session_id,
            confirm_ms: o.confirm_ms,
        }
    }

    /// Sends a request.
    pub(crate) async fn send(&self, request_id: u64, op: Op) {
        self.tx
            .send(pb::SessionRequest {
                request_id,
                op: Some(op),
            })
            .await
            .unwrap();
    }

    /// The next event (request id, event); `None` when the stream ended.
    pub(crate) async fn next(&mut self) -> Option<(u64, Out)> {
        let ev = tokio::time::timeout(Duration::from_secs(10), self.events.message())
            .await
            .expect("no event within 10 s")
            .ok()??;
        Some((ev.request_id, ev.event?))
    }

    /// Sends a request and returns its answer, skipping nothing: the next
    /// event must be it.
    pub(crate) async fn call(&mut self, request_id: u64, op: Op) -> Out {
        self.send(request_id, op).await;
        let (id, out) = self.next().await.expect("stream ended");
        assert_eq!(id, request_id, "answer to another request: {out:?}");
        out
    }

    /// Closes the client's side (the session ends).
    pub(crate) fn close(self) -> tonic::Streaming<pb::SessionEvent> {
        drop(self.tx);
        self.events
    }
}
