//! The benchmark's own load generator (`weir-bench load`), run by the suite inside a lab
//! namespace (and the node's cgroup, so socket-level LB applies as to any pod process).
//! It talks to `weir serve`, which answers one line on every new connection and one per
//! request line. Bounded in count and time; it only connects to the targets it is given.
//!
//! - `crr`: connect, send a request line, read the greeting and the reply, close (a
//!   request on a new connection); rate = connections per second.
//! - `rr`: one kept-alive connection per thread, request line / reply line.
//!
//! Latencies are per operation (connect to close for `crr`, one round trip for `rr`).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct LoadResult {
    pub mode: String,
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed_s: f64,
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

pub struct LoadArgs {
    pub targets: Vec<SocketAddr>,
    pub mode: String,
    pub duration: Duration,
    pub max_ops: u64,
    pub threads: usize,
}

/// Reads until `lines` newlines arrived.
fn read_lines(s: &mut TcpStream, lines: usize, buf: &mut [u8]) -> std::io::Result<()> {
    let mut seen = 0;
    while seen < lines {
        let n = s.read(buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before the reply",
            ));
        }
        seen += buf[..n].iter().filter(|b| **b == b'\n').count();
    }
    Ok(())
}

fn connect(t: &SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(t, Duration::from_secs(1))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    Ok(s)
}

struct ThreadOut {
    lat_ns: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

fn worker(a: &LoadArgs, idx: usize, per_thread: u64, deadline: Instant) -> ThreadOut {
    let mut out = ThreadOut {
        lat_ns: Vec::with_capacity(per_thread.min(1 << 22) as usize),
        errors: 0,
        first_error: None,
    };
    let mut buf = [0u8; 4096];
    let fail = |out: &mut ThreadOut, e: String| {
        out.errors += 1;
        if out.first_error.is_none() {
            out.first_error = Some(e);
        }
    };
    let mut i = idx;
    match a.mode.as_str() {
        "crr" => {
            while (out.lat_ns.len() as u64) < per_thread && Instant::now() < deadline {
                let t = &a.targets[i % a.targets.len()];
                i += 1;
                let start = Instant::now();
                let r = (|| -> std::io::Result<()> {
                    let mut s = connect(t)?;
                    s.write_all(b"req\n")?;
                    read_lines(&mut s, 2, &mut buf)?;
                    Ok(())
                })();
                match r {
                    Ok(()) => out
                        .lat_ns
                        .push(start.elapsed().as_nanos().min(u32::MAX as u128) as u32),
                    Err(e) => {
                        fail(&mut out, format!("{t}: {e}"));
                        if out.errors > 1000 {
                            break;
                        }
                    }
                }
            }
        }
        _ => {
            let t = &a.targets[idx % a.targets.len()];
            let mut s = match connect(t).and_then(|mut s| {
                read_lines(&mut s, 1, &mut buf)?;
                Ok(s)
            }) {
                Ok(s) => s,
                Err(e) => {
                    fail(&mut out, format!("{t}: {e}"));
                    return out;
                }
            };
            while (out.lat_ns.len() as u64) < per_thread && Instant::now() < deadline {
                let start = Instant::now();
                let r = s
                    .write_all(b"req\n")
                    .and_then(|_| read_lines(&mut s, 1, &mut buf));
                match r {
                    Ok(()) => out
                        .lat_ns
                        .push(start.elapsed().as_nanos().min(u32::MAX as u128) as u32),
                    Err(e) => {
                        fail(&mut out, format!("{t}: {e}"));
                        break;
                    }
                }
            }
        }
    }
    out
}

pub fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64
}

pub fn run(a: &LoadArgs) -> Result<LoadResult> {
    if a.targets.is_empty() {
        bail!("no targets");
    }
    if !matches!(a.mode.as_str(), "crr" | "rr") {
        bail!("mode must be crr or rr");
    }
    let threads = a.threads.max(1);
    let per_thread = a.max_ops / threads as u64;
    let start = Instant::now();
    let deadline = start + a.duration;
    let outs: Vec<ThreadOut> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|i| sc.spawn(move || worker(a, i, per_thread, deadline)))
            .collect();
        hs.into_iter().map(|h| h.join().expect("worker")).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat: Vec<u32> = outs.iter().flat_map(|o| o.lat_ns.iter().copied()).collect();
    lat.sort_unstable();
    let ops = lat.len() as u64;
    let mean = if lat.is_empty() {
        0.0
    } else {
        lat.iter().map(|x| *x as f64).sum::<f64>() / lat.len() as f64
    };
    Ok(LoadResult {
        mode: a.mode.clone(),
        ops,
        errors: outs.iter().map(|o| o.errors).sum(),
        first_error: outs.iter().find_map(|o| o.first_error.clone()),
        elapsed_s: elapsed,
        rate: ops as f64 / elapsed,
        p50_us: percentile(&lat, 0.50) / 1e3,
        p99_us: percentile(&lat, 0.99) / 1e3,
        mean_us: mean / 1e3,
    })
}

/// Parses `ip:port,ip:port`.
pub fn parse_targets(s: &str) -> Result<Vec<SocketAddr>> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().with_context(|| format!("bad target {x:?}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crr_and_rr_against_a_local_weir_serve() {
        // A real `weir serve` on loopback (no namespace needed: loopback only).
        let rt = tokio::runtime::Runtime::new().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        rt.spawn(weir::serve::serve(
            "t".into(),
            vec!["127.0.0.1".parse().unwrap()],
            vec![port],
            vec![],
        ));
        let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(target).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for mode in ["crr", "rr"] {
            let r = run(&LoadArgs {
                targets: vec![target],
                mode: mode.into(),
                duration: Duration::from_secs(5),
                max_ops: 200,
                threads: 2,
            })
            .unwrap();
            assert_eq!(r.ops, 200, "{r:?}");
            assert_eq!(r.errors, 0, "{r:?}");
            assert!(r.p50_us > 0.0 && r.p99_us >= r.p50_us, "{r:?}");
        }
    }

    #[test]
    fn percentiles_pick_ranks() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
