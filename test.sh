#!/usr/bin/env bash
# Runs every weir test: lints, unit and property tests, golden tests, BPF_PROG_TEST_RUN
# datapath tests and the privileged end-to-end tests (network namespaces, real packets).
# Installs what it needs first (scripts/bootstrap.sh). Needs root.
set -euo pipefail
cd "$(dirname "$0")"

t0=$(date +%s)
step() { printf '\n\033[1m==> %s\033[0m (%ss)\n' "$*" "$(( $(date +%s) - t0 ))" >&2; }
fail() { printf '\n\033[31mtest.sh: %s\033[0m\n' "$*" >&2; exit 1; }

step "bootstrap (toolchain pieces, packages, bpffs)"
eval "$(scripts/bootstrap.sh)" || fail "bootstrap failed (see the message above)"

step "cargo fmt --check"
cargo fmt --all -- --check || fail "code is not formatted: run cargo fmt --all"

step "cargo clippy -D warnings (userspace crates; builds the eBPF object too)"
cargo clippy --all-targets --locked -- -D warnings || fail "clippy found problems"

step "tests (unit, property, golden, BPF_PROG_TEST_RUN, end-to-end)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --profile ci "$@" || fail "tests failed"
else
  cargo test --locked "$@" || fail "tests failed"
fi

step "all tests passed"
