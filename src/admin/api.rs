//! The JSON API: `GET /v1/records[?q=ROLE@RANGE]`, the hub's records as
//! `seaport show` prints them, and `GET /v1/services`, the supervisor's
//! instances as `seaport ps --json` prints them.

use super::{AdminBody, Sources, full, text};
use crate::registry::pattern::Pattern;
use hyper::{Response, StatusCode};
use serde_json::Value;

/// `GET /v1/records`: every record, or those matching `q`, in arrival
/// order; with `owners=true`, each with its owner as `seaport show --owners`
/// adds it.
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
    let shown: Vec<Value> = hub
        .records(&pattern)
        .into_iter()
        .map(|listed| {
            let owner = listed.record.holder().map(ToString::to_string);
            let mut meta = listed.record.into_meta();
            if owners {
                meta.insert("owner".into(), owner.map_or(Value::Null, Value::String));
            }
            Value::Object(meta)
        })
        .collect();
    json(&shown)
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
