//! `weir-bench`: weir against kube-proxy's iptables and nftables dataplanes and the bare
//! path, measured side by side in `weir lab` namespaces. Benchmarks are measurements,
//! never tests: nothing here asserts on a figure. `bench/run.sh` is the one command.
//!
//! # Layout
//! - [`cluster`]: the benchmark cluster as Kubernetes YAML (the input of every dataplane).
//! - [`kubeproxy`]: kube-proxy's iptables and nftables rules for that YAML.
//! - [`load`]: the load generator (`weir-bench load`), run inside lab namespaces.
//! - [`progcost`]: per-packet program cost through BPF_PROG_TEST_RUN.
//! - [`control`]: the agent's sync path into real maps and the fake (`cp-weir`,
//!   `cp-policy`).
//! - [`policygen`]: the generated NetworkPolicy cluster (10k pods, 1k policies).
//! - [`suite`]: the whole run (labs, baselines, measurements) into results.json.
//! - [`report`]: results.json into RESULTS.md and SVG plots.

mod cluster;
mod control;
mod kubeproxy;
mod load;
mod policygen;
mod progcost;
mod report;
mod suite;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "weir-bench",
    about = "weir's benchmarks (measurements, never tests)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the suite and writes results.json, RESULTS.md and the plots.
    Suite {
        #[arg(long)]
        quick: bool,
        /// Results directory (bench/results/<date>).
        #[arg(long)]
        out: PathBuf,
        /// Where RESULTS.md goes.
        #[arg(long)]
        results_md: PathBuf,
        /// The `weir` binary the labs run.
        #[arg(long)]
        weir: PathBuf,
        /// Give up on a kube-proxy rule load (iptables-legacy-restore, nft -f) after this
        /// long; that dataplane is then not measured at that scale.
        #[arg(long, default_value_t = 600)]
        loader_timeout_s: u64,
        /// Numbers of Services (default: quick 1,1000; full 1,1000,10000,50000).
        #[arg(long, value_delimiter = ',')]
        scales: Vec<usize>,
        /// Run only these parts (progcost, control, iptables, nftables, bare, weir,
        /// weir-nosocklb).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Regenerates RESULTS.md and the plots from a results.json.
    Report {
        results: PathBuf,
        #[arg(long)]
        results_md: PathBuf,
    },
    /// Writes the benchmark YAML (pods.yaml, services-N.yaml) into a directory.
    Gen {
        dir: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "1,1000")]
        scales: Vec<usize>,
    },
    /// Prints kube-proxy's rules for a services YAML file.
    Rules {
        #[arg(long)]
        mode: String,
        file: PathBuf,
    },
    /// The load generator (run by the suite inside a lab namespace).
    Load {
        #[arg(long)]
        targets: String,
        #[arg(long, default_value = "crr")]
        mode: String,
        #[arg(long, default_value_t = 2000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 1_000_000)]
        max_ops: u64,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// weir's sync path programming N Services from nothing (own process: peak memory).
    CpWeir {
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        #[arg(long, default_value_t = 1000)]
        changes: usize,
        #[arg(long, default_value = "real")]
        datapath: String,
    },
    /// The sync path programming 10k pods / 1k NetworkPolicies for one node (own
    /// process: peak memory), then remote pod label changes.
    CpPolicy {
        #[arg(long, default_value_t = 500)]
        changes: usize,
        #[arg(long, default_value = "real")]
        datapath: String,
    },
    /// Per-packet cost through BPF_PROG_TEST_RUN at N Services (`--policy`: the
    /// NetworkPolicy rows at 0, 1 and 1k policies instead).
    Progcost {
        #[arg(long)]
        policy: bool,
        #[arg(long, default_value_t = 1)]
        services: usize,
        #[arg(long, default_value_t = 20_000)]
        runs: u32,
    },
}

fn write_report(
    v: &serde_json::Value,
    results: &std::path::Path,
    md: &std::path::Path,
) -> Result<()> {
    let md_dir = md.parent().unwrap_or(std::path::Path::new("."));
    let abs_md = std::fs::canonicalize(md_dir)?;
    let abs_res = std::fs::canonicalize(results)?;
    let rel = abs_res
        .strip_prefix(&abs_md)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| abs_res.display().to_string());
    let text = report::render(v, results, &rel)?;
    std::fs::write(md, text).with_context(|| format!("writing {}", md.display()))
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Suite {
            quick,
            out,
            results_md,
            weir,
            loader_timeout_s,
            scales,
            only,
        } => {
            let scales = if scales.is_empty() {
                if quick {
                    vec![1, 1000]
                } else {
                    vec![1, 1000, 10_000, 50_000]
                }
            } else {
                scales
            };
            let o = suite::Opts {
                quick,
                out: out.clone(),
                weir,
                loader_timeout: Duration::from_secs(loader_timeout_s),
                scales,
                only,
                command: std::env::var("WEIR_BENCH_COMMAND")
                    .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" ")),
            };
            let v = suite::run(&o)?;
            std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&v)?)?;
            write_report(&v, &out, &results_md)?;
            eprintln!(
                "weir-bench: wrote {}/results.json and {}",
                out.display(),
                results_md.display()
            );
            if v["complete"] != serde_json::json!(true) {
                anyhow::bail!(
                    "the run did not complete (see the notes in {})",
                    results_md.display()
                );
            }
        }
        Cmd::Report {
            results,
            results_md,
        } => {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&results)?)?;
            let dir = results
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .to_path_buf();
            write_report(&v, &dir, &results_md)?;
        }
        Cmd::Gen { dir, scales } => cluster::write_all(&dir, &scales)?,
        Cmd::Rules { mode, file } => {
            let text = std::fs::read_to_string(&file)?;
            let (objs, _) = weir::source::yaml::parse_documents(&text, "rules");
            let (c, _) = weir::source::dir::to_cluster(&objs);
            let st = kubeproxy::Settings {
                cluster_cidr: cluster::POD_CIDR.into(),
                service_cidr: cluster::SERVICE_CIDR.into(),
                node_ip: cluster::NODE_IP.into(),
            };
            let (r, _) = match mode.as_str() {
                "iptables" => kubeproxy::iptables_rules(&c, &st),
                _ => kubeproxy::nft_rules(&c, &st),
            };
            print!("{r}");
        }
        Cmd::Load {
            targets,
            mode,
            duration_ms,
            max_ops,
            threads,
        } => {
            let r = load::run(&load::LoadArgs {
                targets: load::parse_targets(&targets)?,
                mode,
                duration: Duration::from_millis(duration_ms.min(120_000)),
                max_ops,
                threads: threads.min(16),
            })?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Cmd::CpWeir {
            services,
            changes,
            datapath,
        } => {
            let r = control::weir_sync(services, changes, &datapath)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Cmd::CpPolicy { changes, datapath } => {
            let r = control::policy_sync(changes, &datapath)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Cmd::Progcost {
            policy,
            services,
            runs,
        } => {
            let r = if policy {
                progcost::measure_policy(runs)?
            } else {
                progcost::measure(services, runs)?
            };
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
    }
    Ok(())
}
