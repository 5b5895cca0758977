//! Sources of cluster state: a directory of Kubernetes YAML ([`dir`]) and, for clusters,
//! the API server. Both produce [`weir_core::model::Cluster`] snapshots through
//! [`convert`], so the pipeline behind them is the same.

pub mod convert;
pub mod dir;
pub mod yaml;
