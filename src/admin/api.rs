//! The JSON API: `GET /v1/records[?q=ROLE@RANGE]`, the hub's records as
//! `seaport show` prints them, and `GET /v1/services`, the supervisor's
//! instances as `seaport ps --json` prints them.

use super::{AdminBody, Sources, full, text};
use crate::hub::{HubView, Listing};
use crate::registry::pattern::Pattern;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use hyper::{Response, StatusCode};
use serde_json::Value;
use std::convert::Infallible;
use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

/// `GET /v1/records`: every record, or those matching `q`, in arrival
/// order; with `owners=true`, each with its owner as `seaport show --owners`
/// adds it.
///
/// The answer is sent as the socket takes it, a part of the hub's records at
/// a time: the hub's lock is held only to copy a part's rows, which are
/// decoded and encoded here, and a reader that stops reading holds about one
/// part. Records that arrive after the request are not listed; one that
/// changes meanwhile is listed as it is when its part is taken.
pub fn records(sources: &Sources, query: &str) -> Response<AdminBody> {
    let Some(hub) = &sources.hub else {
        return text(
            StatusCode::NOT_FOUND,
            "no records here: this process runs no hub\n",
        );
    };
    let mut pattern = Pattern::all();
    let mut owners = false;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "q" => match Pattern::parse(&value) {
                Ok(parsed) => pattern = parsed,
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("bad pattern {value:?} in q: {e}\n"),
                    );
                }
            },
            "owners" => owners = value == "true" || value == "1",
            _ => {}
        }
    }
    let body = RecordsBody {
        listing: hub.listing(),
        hub: hub.clone(),
        pattern,
        owners,
        count: 0,
        ended: false,
        pause: Pause::default(),
    };
    super::streamed("application/json", body.boxed())
}

/// The body of `GET /v1/records`: a JSON array pretty-printed exactly as
/// `serde_json::to_string_pretty` prints it whole (as `seaport show` does),
/// then a newline, written a part of the listing at a time.
struct RecordsBody {
    hub: HubView,
    listing: Listing,
    pattern: Pattern,
    owners: bool,
    /// Records written so far.
    count: usize,
    ended: bool,
    pause: Pause,
}

impl RecordsBody {
    /// Appends the records of the next part of the listing to `out`, and the
    /// array's end once the listing is done.
    fn write_part(&mut self, out: &mut Vec<u8>) {
        for stored in self.hub.list_matching(&mut self.listing, &self.pattern) {
            let record = stored.record();
            if !self.pattern.matches_meta(&record) {
                continue;
            }
            let owner = record.holder().map(ToString::to_string);
            let mut meta = record.into_meta();
            if self.owners {
                meta.insert("owner".into(), owner.map_or(Value::Null, Value::String));
            }
            let opening: &[u8] = if self.count == 0 { b"[\n  " } else { b",\n  " };
            out.extend_from_slice(opening);
            // Nested one level inside the array. A map of JSON values always
            // encodes, and a Vec takes every byte.
            let formatter = serde_json::ser::PrettyFormatter::with_indent(b"  ");
            let mut ser = serde_json::Serializer::with_formatter(Indented(out), formatter);
            if serde::Serialize::serialize(&meta, &mut ser).is_err() {
                out.extend_from_slice(b"null");
            }
            self.count += 1;
        }
        if self.listing.is_done() {
            let closing: &[u8] = if self.count == 0 { b"[]\n" } else { b"\n]\n" };
            out.extend_from_slice(closing);
            self.ended = true;
        }
    }
}

impl Body for RecordsBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            std::task::ready!(this.pause.poll(cx));
            if this.ended {
                return Poll::Ready(None);
            }
            let mut out = Vec::new();
            this.write_part(&mut out);
            // A turn for the others after every part, also one that held no
            // match (a filter that matches few of many records).
            this.pause.arm();
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// A turn given up to the runtime's other tasks (the hub's among them) after
/// a body's frame that took work to make: the connection would otherwise
/// poll the body again at once, frame after frame, while the socket takes
/// them.
#[derive(Default)]
pub(super) struct Pause(Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>);

impl Pause {
    /// Makes the next [`Pause::poll`] give up a turn.
    pub(super) fn arm(&mut self) {
        self.0 = Some(Box::pin(tokio::task::yield_now()));
    }

    /// Ready unless a turn is to be given up, and then once it was.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(turn) = &mut self.0 {
            std::task::ready!(turn.as_mut().poll(cx));
            self.0 = None;
        }
        Poll::Ready(())
    }
}

/// Writes to a `Vec`, indenting every line after the first by two spaces.
struct Indented<'a>(&'a mut Vec<u8>);

impl Write for Indented<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut rest = buf;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            self.0.extend_from_slice(&rest[..=i]);
            self.0.extend_from_slice(b"  ");
            rest = &rest[i + 1..];
        }
        self.0.extend_from_slice(rest);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `GET /v1/services`: the supervisor's instances, then its rejected files,
/// as `seaport ps --json` lists them.
pub async fn services(sources: &Sources) -> Response<AdminBody> {
    let Some(services) = &sources.services else {
        return text(
            StatusCode::NOT_FOUND,
            "no services here: this process is a hub, not a supervisor\n",
        );
    };
    match services.rows().await {
        Some(rows) => json(&rows),
        None => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the supervisor has stopped\n",
        ),
    }
}

/// A JSON answer, pretty-printed as the CLI prints it.
fn json(value: &impl serde::Serialize) -> Response<AdminBody> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            full(StatusCode::OK, "application/json", body)
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}\n"),
        ),
    }
}
