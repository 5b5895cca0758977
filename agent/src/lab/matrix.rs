//! `weir lab matrix`: every pod to every pod (or to a Service of every pod) on one port,
//! all at once: one worker process per source pod (in its namespace and cgroup), each
//! probing all its targets concurrently. The result is a JSON matrix and the readable
//! table the upstream NetworkPolicy e2e suite prints (rows are sources, columns are
//! destinations).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{
    probe::{self, Attempt, Job, Outcome, Proto, Source},
    spec::{self, Family},
    topology::Lab,
};

#[derive(Debug, Clone)]
pub struct MatrixOptions {
    pub port: u16,
    pub protocol: Proto,
    pub to_service: bool,
    pub timeout_ms: u64,
    pub family: Option<Family>,
}

/// One cell: `from` probing `to`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cell {
    pub from: String,
    pub to: String,
    /// connected, refused, timeout, unreachable, error, or noService (with
    /// --to-service, when no Service selects the destination on this port).
    pub result: String,
    /// The address and port probed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// With --to-service: the Service probed (`namespace/name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MatrixReport {
    pub port: u16,
    pub protocol: Proto,
    pub to_service: bool,
    /// Pods in row/column order (`namespace/name`).
    pub pods: Vec<String>,
    /// from -> to -> result.
    pub matrix: BTreeMap<String, BTreeMap<String, String>>,
    pub cells: Vec<Cell>,
    /// Cells per result.
    pub summary: BTreeMap<String, usize>,
    /// The matrix as text: `.` connected, `R` refused, `T` timeout, `U` unreachable,
    /// `E` error, `-` no Service.
    pub table: String,
    pub elapsed_ms: u64,
}

/// The letter a result shows as in the table.
pub fn symbol(result: &str) -> &'static str {
    match result {
        "connected" => ".",
        "refused" => "R",
        "timeout" => "T",
        "unreachable" => "U",
        "error" => "E",
        _ => "-",
    }
}

pub fn render_table(
    header: &str,
    pods: &[String],
    m: &BTreeMap<String, BTreeMap<String, String>>,
) -> String {
    let w = pods
        .iter()
        .map(|p| p.len())
        .max()
        .unwrap_or(1)
        .max(header.len());
    let cw = pods.iter().map(|p| p.len()).max().unwrap_or(1) + 1;
    let mut s = format!("{header:<w$}");
    for p in pods {
        s.push_str(&format!("{p:>cw$}"));
    }
    s.push('\n');
    for from in pods {
        s.push_str(&format!("{from:<w$}"));
        for to in pods {
            let r = m
                .get(from)
                .and_then(|r| r.get(to))
                .map(String::as_str)
                .unwrap_or("");
            s.push_str(&format!("{:>cw$}", symbol(r)));
        }
        s.push('\n');
    }
    s
}

/// The Service to probe for destination pod `key` on `port` (the container port): a
/// Service in the pod's namespace selecting it with a port of `protocol` whose
/// targetPort resolves to `port` on that pod; those selecting fewest pods first (the
/// upstream model's per-pod Services select exactly one). Returns (service key, its IP,
/// the Service port).
fn service_for(
    r: &spec::Resolved,
    key: &str,
    port: u16,
    protocol: Proto,
    family: Option<Family>,
) -> Option<(String, IpAddr, u16)> {
    let pod = r.pods.get(key)?;
    let ns = spec::ns_of(&pod.metadata);
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let mut best: Option<(usize, String, IpAddr, u16)> = None;
    for (sk, s) in &r.services {
        if spec::ns_of(&s.metadata) != ns {
            continue;
        }
        let Some(sp) = s.spec.as_ref() else { continue };
        let Some(sel) = sp.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        if !spec::selector_matches(sel, &labels) {
            continue;
        }
        let Some(svc_port) = sp.ports.iter().flatten().find(|p| {
            p.protocol.as_deref() == Some(protocol.as_str())
                && spec::find_port(pod, p) == Some(port as i32)
        }) else {
            continue;
        };
        let ips = spec::service_ips(s);
        let Some(ip) = (match family {
            None => ips.first().copied(),
            Some(f) => ips.iter().copied().find(|i| Family::of(i) == f),
        }) else {
            continue;
        };
        let selected = r
            .pods
            .iter()
            .filter(|(k, p)| {
                k.starts_with(&format!("{ns}/"))
                    && spec::selector_matches(sel, &p.metadata.labels.clone().unwrap_or_default())
            })
            .count();
        let cand = (selected, sk.clone(), ip, svc_port.port as u16);
        if best
            .as_ref()
            .is_none_or(|b| (cand.0, &cand.1) < (b.0, &b.1))
        {
            best = Some(cand);
        }
    }
    best.map(|(_, k, ip, p)| (k, ip, p))
}

pub fn matrix(lab: &Lab, o: &MatrixOptions) -> Result<MatrixReport> {
    let started = Instant::now();
    let r = lab
        .state
        .resolved
        .as_ref()
        .context("the lab has no objects yet")?;
    let pods: Vec<String> = lab.state.pods.keys().cloned().collect();
    // Targets, the same for every source: (to, address or None, service).
    let mut targets: Vec<(String, Option<SocketAddr>, Option<String>)> = Vec::new();
    for to in &pods {
        let w = &lab.state.pods[to];
        if o.to_service {
            match service_for(r, to, o.port, o.protocol, o.family) {
                Some((svc, ip, p)) => {
                    targets.push((to.clone(), Some(SocketAddr::new(ip, p)), Some(svc)))
                }
                None => targets.push((to.clone(), None, None)),
            }
        } else {
            let ip = match o.family {
                None => w.ips.first().copied(),
                Some(f) => w.ips.iter().copied().find(|i| Family::of(i) == f),
            };
            targets.push((to.clone(), ip.map(|ip| SocketAddr::new(ip, o.port)), None));
        }
    }
    let addrs: Vec<SocketAddr> = targets.iter().filter_map(|t| t.1).collect();
    let job = Job {
        protocol: o.protocol,
        timeout_ms: o.timeout_ms,
        count: 1,
        bind: None,
        source_port: None,
        targets: addrs,
    };
    let sources: Vec<Source> = pods
        .iter()
        .map(|p| probe::resolve_source(lab, &probe::SourceSpec::Pod(p.clone()), p))
        .collect::<Result<_>>()?;
    // All workers at once, each in its own thread (spawn + feed + collect).
    let results: Vec<Result<Vec<Vec<Attempt>>>> = std::thread::scope(|s| {
        let hs: Vec<_> = sources
            .iter()
            .map(|src| {
                let job = &job;
                s.spawn(move || probe::spawn_worker(src, job))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("worker thread panicked")))
            })
            .collect()
    });
    let mut m: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut cells = Vec::new();
    let mut summary: BTreeMap<String, usize> = BTreeMap::new();
    for (from, res) in pods.iter().zip(results) {
        let res = res.with_context(|| format!("probing from {from}"))?;
        let mut it = res.into_iter();
        for (to, addr, svc) in &targets {
            let cell = match addr {
                None => Cell {
                    from: from.clone(),
                    to: to.clone(),
                    result: "noService".into(),
                    target: None,
                    service: None,
                    server: None,
                    client: None,
                    error: Some(if o.to_service {
                        format!(
                            "no Service selects {to} on {} port {}",
                            o.protocol.as_str(),
                            o.port
                        )
                    } else {
                        "no address of the requested family".into()
                    }),
                },
                Some(a) => {
                    let at = it.next().and_then(|v| v.into_iter().next());
                    let at = at.context("missing worker result")?;
                    Cell {
                        from: from.clone(),
                        to: to.clone(),
                        result: at.result.as_str().into(),
                        target: Some(a.to_string()),
                        service: svc.clone(),
                        server: at.server,
                        client: at.client,
                        error: at.error,
                    }
                }
            };
            *summary.entry(cell.result.clone()).or_default() += 1;
            m.entry(from.clone())
                .or_default()
                .insert(to.clone(), cell.result.clone());
            cells.push(cell);
        }
    }
    let header = format!("{}/{}", o.protocol.as_str(), o.port);
    let table = render_table(&header, &pods, &m);
    Ok(MatrixReport {
        port: o.port,
        protocol: o.protocol,
        to_service: o.to_service,
        pods,
        matrix: m,
        cells,
        summary,
        table,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// Whether a result counts as "allowed" in the upstream NetworkPolicy tables.
pub fn allowed(result: &str) -> bool {
    result == Outcome::Connected.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shape() {
        let pods = vec!["x/a".to_string(), "x/b".to_string()];
        let mut m = BTreeMap::new();
        m.insert(
            "x/a".to_string(),
            BTreeMap::from([
                ("x/a".into(), "connected".into()),
                ("x/b".into(), "timeout".into()),
            ]),
        );
        m.insert(
            "x/b".to_string(),
            BTreeMap::from([
                ("x/a".into(), "refused".into()),
                ("x/b".into(), "noService".into()),
            ]),
        );
        assert_eq!(
            render_table("TCP/80", &pods, &m),
            "TCP/80 x/a x/b\nx/a      .   T\nx/b      R   -\n"
        );
    }
}
