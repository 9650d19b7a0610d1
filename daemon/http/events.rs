//! `GET /v1/events`: the live change feed (`tail::feed`) as Server-Sent Events, with a status
//! every second. Each stream ends when its client goes or the daemon stops.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use tokio::sync::{OwnedSemaphorePermit, broadcast, mpsc};

use super::Http;
use crate::api::FeedEvent;

/// The body of `GET /v1/events`: fed by a task that ends when the client goes or the daemon
/// stops. It holds the stream's place among `max_event_streams` until hyper drops it.
pub struct EventBody {
    rx: mpsc::Receiver<Bytes>,
    _place: OwnedSemaphorePermit,
}

impl hyper::body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

/// Starts a subscriber's stream: a status at once and every second, each change as applied.
pub fn subscribe(http: &Http, place: OwnedSemaphorePermit) -> EventBody {
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut changes = http.feed.subscribe();
    let http = http.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut stopping = http.stopping.clone();
        // Browsers' EventSource reconnects after this many milliseconds when the daemon goes.
        if tx
            .send(Bytes::from_static(b"retry: 1000\n\n"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let received = tokio::select! {
                _ = tick.tick() => None,
                received = changes.recv() => Some(received),
                _ = stopping.wait_for(|&s| s) => break,
            };
            let event = match received {
                None => {
                    let status = crate::ops::status::live(&http.sources).await;
                    to_text(&FeedEvent::Status(Box::new(status)))
                }
                Some(Ok(event)) => event.to_string(),
                Some(Err(broadcast::error::RecvError::Lagged(n))) => {
                    to_text(&FeedEvent::Skipped { count: n })
                }
                Some(Err(broadcast::error::RecvError::Closed)) => break,
            };
            let frame = Bytes::from(format!("data: {event}\n\n"));
            if tx.send(frame).await.is_err() {
                break; // the client went away
            }
        }
    });
    EventBody { rx, _place: place }
}

fn to_text(event: &FeedEvent) -> String {
    serde_json::to_string(event).unwrap_or_default()
}
