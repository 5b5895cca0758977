//! Test support shared by the end-to-end tests (tests/) and the benchmarks (bench/):
//!
//! - [`packet`]: a small packet builder and parser (Ethernet, IPv4/IPv6 with extension
//!   headers and fragments, TCP/UDP/SCTP/ICMP/ICMPv6) that computes and verifies every
//!   checksum, including SCTP's CRC32c.
//! - [`prog`]: [`prog::ProgHarness`], the real eBPF object loaded with fresh maps under a
//!   throwaway pin directory, to run a program on a crafted packet through
//!   BPF_PROG_TEST_RUN and read back bytes, verdict and maps.
//!
//! - [`apiserver`]: [`apiserver::FakeApiServer`], a local HTTP server speaking the
//!   Kubernetes list/watch protocol with scripted faults (broken watches, 410 Gone,
//!   outages), for the kube source tests.
//! - [`shared`]: [`shared::SharedFake`], a `FakeDatapath` behind a mutex, so a test can
//!   inspect what a running agent loop programmed.
//!
//! Namespace, link and process guards live in [`crate::netns`].

pub mod apiserver;
pub mod packet;
pub mod prog;
pub mod shared;
