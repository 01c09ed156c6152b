//! The HTTP backend the router scenario puts behind every router: this
//! benchmark binary run as `seaport-bench --http-backend PORT`. It answers
//! every request with `200 ok` on kept-alive HTTP/1.1 connections (hyper), so
//! that the routers, not the backends, are measured.
//!
//! It cannot outlive the benchmark: it exits when its parent changes and after
//! [`MAX_LIFETIME`] in any case.

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::time::{Duration, Instant};

/// A backend never lives longer than this, whatever happens to the benchmark.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// Runs the backend; never returns.
pub fn main(args: &[String]) -> ! {
    let parent = std::os::unix::process::parent_id();
    let Some(port) = args.first().and_then(|a| a.parse::<u16>().ok()) else {
        eprintln!("usage: seaport-bench --http-backend PORT");
        std::process::exit(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("http backend: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("http backend: cannot bind 127.0.0.1:{port}: {e}");
                std::process::exit(1);
            }
        };
        let born = Instant::now();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if std::os::unix::process::parent_id() != parent || born.elapsed() > MAX_LIFETIME {
                    std::process::exit(0);
                }
            }
        });
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_req: Request<hyper::body::Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"ok\n",
                    ))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
