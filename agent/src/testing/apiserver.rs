//! A local HTTP server (127.0.0.1, an ephemeral port) that speaks the Kubernetes list and
//! watch protocol well enough for kube-rs watchers, with scripted faults. Tests feed it
//! recorded API objects (`tests/fixtures/kube/`) and drive changes, broken watches,
//! expired history (410 Gone) and outages.
//!
//! Protocol, as the API server implements it (k8s.io/apiserver, API concepts "Efficient
//! detection of changes"):
//! - `GET <collection>[?limit=N]`: a list with `metadata.resourceVersion` (items without
//!   `kind`/`apiVersion`, like the real server's typed lists).
//! - `GET <collection>?watch=true&resourceVersion=RV[&allowWatchBookmarks=true]`: a
//!   chunked stream of `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`
//!   lines: every change after RV, then changes as they happen. An RV older than the
//!   server's history gets one `ERROR` event with a `Status` of code 410 (Expired), after
//!   which a client must list again.
//!
//! Faults: [`FakeApiServer::break_watches`] cuts every open watch mid-stream (no final
//! chunk), [`FakeApiServer::expire_history`] forgets the change log (the next watch from
//! an old RV gets 410), [`FakeApiServer::set_down`] makes the server close every
//! connection without answering until it comes back.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::broadcast,
    task::JoinHandle,
};

/// A collection the server serves, e.g. `/api/v1/services`.
#[derive(Default)]
struct Collection {
    /// `ns/name` -> object (with kind and apiVersion).
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, watch event line) of every change still in history.
    log: Vec<(u64, String)>,
    kind: String,
    api_version: String,
}

#[derive(Default)]
struct State {
    collections: BTreeMap<String, Collection>,
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest: u64,
    down: bool,
    requests: Vec<String>,
}

#[derive(Clone, Debug)]
enum Signal {
    /// A watch event line for a collection, with its resourceVersion.
    Event(String, u64, String),
    /// Cut every open watch.
    Break,
}

pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    signals: broadcast::Sender<Signal>,
    task: JoinHandle<()>,
}

fn key_of(obj: &Value) -> String {
    let m = &obj["metadata"];
    format!(
        "{}/{}",
        m["namespace"].as_str().unwrap_or(""),
        m["name"].as_str().unwrap_or("")
    )
}

fn status_410(rv: u64) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("too old resource version: {rv}"),
        "reason": "Expired",
        "code": 410
    })
}

impl FakeApiServer {
    /// Starts the server with the given lists (each a recorded `*List` response: its
    /// `kind` names the item kind, its items are the initial objects).
    pub async fn start(lists: &[(&str, Value)]) -> std::io::Result<FakeApiServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut st = State {
            rv: 100,
            oldest: 0,
            ..Default::default()
        };
        for (path, list) in lists {
            let kind = list["kind"]
                .as_str()
                .unwrap_or("")
                .trim_end_matches("List")
                .to_string();
            let api_version = list["apiVersion"].as_str().unwrap_or("v1").to_string();
            let mut c = Collection {
                kind: kind.clone(),
                api_version: api_version.clone(),
                ..Default::default()
            };
            for item in list["items"].as_array().into_iter().flatten() {
                st.rv += 1;
                let mut obj = item.clone();
                obj["kind"] = kind.clone().into();
                obj["apiVersion"] = api_version.clone().into();
                obj["metadata"]["resourceVersion"] = st.rv.to_string().into();
                c.objects.insert(key_of(&obj), obj);
            }
            st.collections.insert(path.to_string(), c);
        }
        let state = Arc::new(Mutex::new(st));
        let (signals, _) = broadcast::channel(1024);
        let (s2, sig2) = (state.clone(), signals.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (s, sig) = (s2.clone(), sig2.clone());
                tokio::spawn(async move {
                    let _ = serve_conn(sock, s, sig).await;
                });
            }
        });
        Ok(FakeApiServer {
            addr,
            state,
            signals,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds or replaces an object (`ADDED` or `MODIFIED` for watchers).
    pub fn apply(&self, path: &str, obj: Value) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let c = st
            .collections
            .get_mut(path)
            .unwrap_or_else(|| panic!("no collection {path}"));
        let mut obj = obj;
        obj["kind"] = c.kind.clone().into();
        obj["apiVersion"] = c.api_version.clone().into();
        obj["metadata"]["resourceVersion"] = rv.to_string().into();
        let key = key_of(&obj);
        let ty = if c.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let line = json!({"type": ty, "object": obj}).to_string();
        c.objects.insert(key, obj);
        c.log.push((rv, line.clone()));
        let _ = self.signals.send(Signal::Event(path.to_string(), rv, line));
    }

    /// Deletes an object (`DELETED` for watchers). `key` is `namespace/name` (`/name`
    /// for cluster-scoped objects).
    pub fn delete(&self, path: &str, key: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let c = st.collections.get_mut(path).expect("collection");
        let Some(mut obj) = c.objects.remove(key) else {
            panic!("no object {key} in {path}");
        };
        obj["metadata"]["resourceVersion"] = rv.to_string().into();
        let line = json!({"type": "DELETED", "object": obj}).to_string();
        c.log.push((rv, line.clone()));
        let _ = self.signals.send(Signal::Event(path.to_string(), rv, line));
    }

    /// Removes an object without telling anyone: no watch event, no history entry (a
    /// deletion a broken watch missed and the server has compacted away). Only a new
    /// list shows it.
    pub fn forget(&self, path: &str, key: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let c = st.collections.get_mut(path).expect("collection");
        assert!(c.objects.remove(key).is_some(), "no object {key} in {path}");
    }

    /// Sends a BOOKMARK with the current resourceVersion to the collection's watchers.
    pub fn bookmark(&self, path: &str) {
        let st = self.state.lock().unwrap();
        let c = &st.collections[path];
        let line = json!({
            "type": "BOOKMARK",
            "object": {"kind": c.kind, "apiVersion": c.api_version,
                       "metadata": {"resourceVersion": st.rv.to_string()}}
        })
        .to_string();
        // Bookmarks are not changes: an RV of u64::MAX so no watch skips it.
        let _ = self
            .signals
            .send(Signal::Event(path.to_string(), u64::MAX, line));
    }

    /// Cuts every open watch stream mid-stream.
    pub fn break_watches(&self) {
        let _ = self.signals.send(Signal::Break);
    }

    /// Forgets the change history: a watch from any resourceVersion seen so far gets 410.
    pub fn expire_history(&self) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        st.oldest = st.rv;
        for c in st.collections.values_mut() {
            c.log.clear();
        }
    }

    /// While down, every connection is closed without an answer (and open watches are
    /// cut).
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
        if down {
            self.break_watches();
        }
    }

    /// Requests served so far, as "list PATH" / "watch PATH from RV".
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.signals.send(Signal::Break);
    }
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

async fn write_chunk(sock: &mut TcpStream, data: &str) -> std::io::Result<()> {
    let line = format!("{data}\n");
    sock.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
        .await
}

async fn serve_conn(
    mut sock: TcpStream,
    state: Arc<Mutex<State>>,
    signals: broadcast::Sender<Signal>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        // Read one request head (kube sends GETs without bodies).
        let head = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end + 4);
                break head;
            }
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        if state.lock().unwrap().down {
            return Ok(()); // close without answering
        }
        let target = head
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("/")
            .to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let watch = query_param(query, "watch") == Some("true");
        if !watch {
            let body = {
                let mut st = state.lock().unwrap();
                st.requests.push(format!("list {path}"));
                let rv = st.rv;
                match st.collections.get(path) {
                    Some(c) => {
                        let items: Vec<Value> = c
                            .objects
                            .values()
                            .map(|o| {
                                let mut o = o.clone();
                                // Typed list items carry no kind/apiVersion.
                                if let Some(m) = o.as_object_mut() {
                                    m.remove("kind");
                                    m.remove("apiVersion");
                                }
                                o
                            })
                            .collect();
                        Some(json!({
                            "kind": format!("{}List", c.kind),
                            "apiVersion": c.api_version,
                            "metadata": {"resourceVersion": rv.to_string()},
                            "items": items,
                        }))
                    }
                    None => None,
                }
            };
            let (status, body) = match body {
                Some(b) => ("200 OK", b.to_string()),
                None => (
                    "404 Not Found",
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404})
                    .to_string(),
                ),
            };
            sock.write_all(
                format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await?;
            continue;
        }

        // A watch: replay history after RV (or 410), then follow live changes.
        let from: u64 = query_param(query, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut rx = signals.subscribe();
        let sent_upto: u64;
        let backlog: Result<Vec<String>, u64> = {
            let mut st = state.lock().unwrap();
            // Changes up to here come from the log; later ones from the signals.
            sent_upto = st.rv;
            st.requests.push(format!("watch {path} from {from}"));
            if from < st.oldest {
                Err(from)
            } else {
                Ok(st
                    .collections
                    .get(path)
                    .map(|c| {
                        c.log
                            .iter()
                            .filter(|(rv, _)| *rv > from)
                            .map(|(_, l)| l.clone())
                            .collect()
                    })
                    .unwrap_or_default())
            }
        };
        sock.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await?;
        match backlog {
            Err(rv) => {
                let line = json!({"type": "ERROR", "object": status_410(rv)}).to_string();
                write_chunk(&mut sock, &line).await?;
                // The real server ends the stream after the error.
                sock.write_all(b"0\r\n\r\n").await?;
                continue;
            }
            Ok(lines) => {
                for l in lines {
                    write_chunk(&mut sock, &l).await?;
                }
            }
        }
        loop {
            match rx.recv().await {
                Ok(Signal::Event(p, rv, line)) if p == path && rv > sent_upto => {
                    write_chunk(&mut sock, &line).await?
                }
                Ok(Signal::Event(..)) => {}
                // Cut mid-stream: no final chunk, connection closed.
                Ok(Signal::Break) | Err(_) => return Ok(()),
            }
        }
    }
}
