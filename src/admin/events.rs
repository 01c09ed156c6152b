//! `GET /v1/events`: the hub's records, then every change of them, as
//! server-sent events (`text/event-stream`).
//!
//! The stream opens with a `register` event for each record already there,
//! then one `synced` event, then a `register` or `free` event for each change
//! as the hub's clients see it. Of the changes to one record that wait for a
//! slow reader, only the latest is sent, in the place of the first: a
//! record's events keep their order, but those of different records may
//! come in another order than the hub made the changes, so a reader keeps
//! the records by id (as the dashboard does). Every event has an `id` (its
//! number in this stream) and one line of JSON:
//!
//! ```text
//! id: 1
//! event: register
//! data: {"id":"web-1","record":{"role":"web",...},"owner":"connection","age_ms":5120}
//!
//! id: 2
//! event: synced
//! data: {"records":1}
//!
//! id: 3
//! event: free
//! data: {"id":"web-1"}
//! ```
//!
//! `age_ms` is how long ago the record's current version was stored. An idle
//! stream gets a comment line now and then.
//!
//! The body is taken as the socket takes it; the changes that wait for a
//! slow reader, at most one per record, count against its budget (each its
//! record's row and a fixed overhead: see [`crate::hub::Change::weight`]). Records come from the hub
//! undecoded, a part of the listing or a change at a time, and are decoded
//! here, as the stream is read, never under the hub's lock. One that falls further behind loses
//! its place (the hub drops what waited for it, and queues nothing more: see
//! [`crate::hub::HubView::subscribe`]); when it reads again it is sent a
//! `reset` event, then the records as they are then and `synced`, as at the
//! start, and changes again from there. A reader keeps its own copy by
//! clearing it at `reset`.

use super::api::Pause;
use super::{AdminBody, AdminConfig, Sources, text};
use crate::hub::HubView;
use crate::hub::{Change, Listing, Received, Subscription};
use crate::registry::StoredRow;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use hyper::{Response, StatusCode};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;
use tokio::time::{Interval, MissedTickBehavior};

/// About the most bytes put in one frame of the body.
const FRAME_BYTES: usize = 16 * 1024;

/// `GET /v1/events`, for the client at `peer`.
pub fn stream(sources: &Sources, config: &AdminConfig, peer: SocketAddr) -> Response<AdminBody> {
    let Some(hub) = &sources.hub else {
        return text(
            StatusCode::NOT_FOUND,
            "no events here: this process runs no hub\n",
        );
    };
    let (listing, subscription) = hub.subscribe(config.event_budget);
    let start = tokio::time::Instant::now() + config.keep_alive;
    let mut keep_alive = tokio::time::interval_at(start, config.keep_alive);
    keep_alive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let body = EventStream {
        hub: hub.clone(),
        peer,
        listing: Some(listing),
        listed: 0,
        subscription,
        last_id: 0,
        keep_alive,
        ended: false,
        pause: Pause::default(),
    };
    super::streamed("text/event-stream", body.boxed())
}

/// The body of an event stream.
struct EventStream {
    hub: HubView,
    /// Who reads it, for the log.
    peer: SocketAddr,
    /// The listing of the records there were when it began (or was reset),
    /// until it is sent, then `synced`.
    listing: Option<Listing>,
    /// Records of the listing sent so far.
    listed: usize,
    subscription: Subscription,
    last_id: u64,
    keep_alive: Interval,
    ended: bool,
    /// Given up after a frame of the listing (see [`Pause`]).
    pause: Pause,
}

impl EventStream {
    /// Appends one event to `out`.
    fn push(&mut self, out: &mut Vec<u8>, event: &str, data: &Value) {
        self.last_id += 1;
        out.extend_from_slice(format!("id: {}\nevent: {event}\ndata: ", self.last_id).as_bytes());
        // JSON without newlines: one `data` line.
        if serde_json::to_writer(&mut *out, data).is_err() {
            out.extend_from_slice(b"null");
        }
        out.extend_from_slice(b"\n\n");
    }

    fn push_change(&mut self, out: &mut Vec<u8>, change: &Change) {
        match change {
            Change::Registered(listed) => self.push(out, "register", &registered(listed)),
            Change::Freed { id } => self.push(out, "free", &json!({ "id": &**id })),
        }
    }
}

/// A `register` event's data, the record decoded from its row.
fn registered(stored: &StoredRow) -> Value {
    let age = SystemTime::now()
        .duration_since(stored.stored_at())
        .unwrap_or_default();
    let record = stored.record();
    json!({
        "id": record.id(),
        "record": record.meta(),
        "owner": record.holder().map(ToString::to_string),
        "age_ms": u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
    })
}

impl Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        std::task::ready!(this.pause.poll(cx));
        let listing = this.listing.is_some();
        let mut out = Vec::new();
        // The listing, a part at a time, as the socket takes it.
        while out.len() < FRAME_BYTES
            && let Some(listing) = &mut this.listing
        {
            if listing.is_done() {
                let records = this.listed;
                this.push(&mut out, "synced", &json!({ "records": records }));
                this.listing = None;
                break;
            }
            for stored in this.hub.list_subscribed(&this.subscription, listing) {
                this.listed += 1;
                this.push(&mut out, "register", &registered(&stored));
            }
        }
        while out.len() < FRAME_BYTES && this.listing.is_none() {
            match this.subscription.poll_next(cx) {
                Poll::Ready(Received::Change(change)) => this.push_change(&mut out, &change),
                Poll::Ready(Received::Lost { budget }) => {
                    tracing::warn!(
                        "admin: the event stream to {} fell more than {budget} bytes behind \
                         the hub's changes; it starts again from the records as they are",
                        this.peer
                    );
                    this.push(&mut out, "reset", &json!({}));
                    this.listing = Some(this.hub.resync(&this.subscription));
                    this.listed = 0;
                    break;
                }
                Poll::Ready(Received::Closed) => {
                    this.ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if !out.is_empty() {
            if listing {
                this.pause.arm();
            }
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        if this.keep_alive.poll_tick(cx).is_ready() {
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                b": keep-alive\n\n",
            )))));
        }
        Poll::Pending
    }
}
