//! A small HTTP layer over hyper for the agent's servers (metrics, readiness, flows,
//! kube-proxy's node health, the per-Service health check ports), and a minimal
//! HTTP/1.0 client for the CLI and the tests.
//!
//! Servers take a [`Handler`] and a listener (TCP or a unix socket) and run until their
//! task is aborted; every connection gets its own task. A listener that cannot be bound
//! is the caller's business (the agent logs it and retries: a metrics port taken by
//! another process must not stop the datapath from being programmed).

use std::{
    convert::Infallible,
    io::{Read as _, Write as _},
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Frame, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

pub type Body = BoxBody<Bytes, Infallible>;
pub type Handler =
    Arc<dyn Fn(Request<Incoming>) -> BoxFuture<'static, Response<Body>> + Send + Sync>;

/// A complete response.
pub fn response(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

/// A streamed response: every item of `rx` is one chunk, until the sender goes away.
pub fn stream(content_type: &str, rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response<Body> {
    let s = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(s).boxed());
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

async fn serve_conn<S>(io: S, handler: Handler)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let h = handler.clone();
        async move { Ok::<_, Infallible>(h(req).await) }
    });
    if let Err(e) = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc)
        .await
    {
        debug!("http connection: {e}");
    }
}

/// Serves `handler` on a bound TCP listener until the task is aborted.
pub async fn serve_tcp(listener: tokio::net::TcpListener, handler: Handler) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(serve_conn(s, handler.clone()));
            }
            Err(e) => {
                debug!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves `handler` on a bound unix socket listener until the task is aborted.
pub async fn serve_unix(listener: tokio::net::UnixListener, handler: Handler) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(serve_conn(s, handler.clone()));
            }
            Err(e) => {
                debug!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Binds a TCP listener with SO_REUSEADDR (a restarted agent rebinds at once).
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(128)
}

/// Binds a unix socket at `path`, replacing a stale socket file (one nobody accepts on,
/// left by an agent that was killed).
pub fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by a running process", path.display());
        }
        let _ = std::fs::remove_file(path);
    }
    tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

/// Where a client connects.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

/// A response read by [`get`].
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Opens a connection and sends an HTTP/1.0 GET (the server then ends the body by
/// closing the connection: no chunked decoding needed). Returns the stream positioned
/// at the start of the body, with the status line and headers parsed.
pub fn open(
    ep: &Endpoint,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Option<Duration>,
) -> Result<RawReply> {
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: weir\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let stream: Box<dyn ReadWrite> = match ep {
        Endpoint::Tcp(a) => {
            let s = match timeout {
                Some(t) => std::net::TcpStream::connect_timeout(a, t),
                None => std::net::TcpStream::connect(a),
            }
            .with_context(|| format!("connecting to {a}"))?;
            s.set_read_timeout(timeout)?;
            Box::new(s)
        }
        Endpoint::Unix(p) => {
            let s = std::os::unix::net::UnixStream::connect(p)
                .with_context(|| format!("connecting to {}", p.display()))?;
            s.set_read_timeout(timeout)?;
            Box::new(s)
        }
    };
    let mut stream = stream;
    stream.write_all(req.as_bytes())?;
    let mut r = std::io::BufReader::new(stream);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut r, &mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let mut hdrs = Vec::new();
    loop {
        line.clear();
        if std::io::BufRead::read_line(&mut r, &mut line)? == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            hdrs.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok((status, hdrs, Box::new(r)))
}

/// GET `path` and read the whole body.
pub fn get(ep: &Endpoint, path: &str, headers: &[(&str, &str)]) -> Result<Reply> {
    let (status, headers, mut r) = open(ep, path, headers, Some(Duration::from_secs(10)))?;
    let mut body = String::new();
    r.read_to_string(&mut body)?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

trait ReadWrite: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> ReadWrite for T {}

/// The query string of a request as (key, value) pairs (no percent-decoding: the agent's
/// parameters are plain tokens and addresses).
pub fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect()
}

/// A raw reply: status code, headers, and the body as a reader.
pub type RawReply = (u16, Vec<(String, String)>, Box<dyn std::io::BufRead>);
