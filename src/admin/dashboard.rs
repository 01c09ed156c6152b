//! `GET /`: the dashboard, one self-contained page compiled into the binary
//! (its CSS and script inline; nothing is fetched from elsewhere). It shows
//! the records grouped by role and version, with host, port, age and owner,
//! kept live from `/v1/events`, and a supervisor's services from
//! `/v1/services`, polled every two seconds. It reads on a phone too.

use super::{AdminBody, full};
use hyper::{Response, StatusCode};

/// The page.
const PAGE: &str = include_str!("assets/dashboard.html");

/// `GET /`.
pub fn page() -> Response<AdminBody> {
    full(StatusCode::OK, "text/html; charset=utf-8", PAGE)
}
