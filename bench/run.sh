#!/usr/bin/env bash
# Runs weir's benchmark suite: weir (socket LB on and off) against kube-proxy's iptables
# and nftables dataplanes and the bare path, in `weir lab` namespaces, plus per-packet
# program cost (BPF_PROG_TEST_RUN) and control-plane figures. Measurements, not tests.
#
#   bench/run.sh [--quick|--full] [extra weir-bench suite flags, e.g. --scales 1,1000]
#
# --quick (default): datapath at 1 and 1k Services, 2 s per run, one repetition; control
# plane and kube-proxy rule loads at 10k Services / 100k endpoints (a few minutes).
# --full: 1, 1k, 10k, 50k Services, 5 s per run, median of three.
# Writes bench/results/<UTC date>-<mode>/results.json, the plots beside it, and
# bench/RESULTS.md. Needs root (network namespaces, BPF). Everything it creates lives in
# lab namespaces named wl-bn*; it brings its labs down by name, also when interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=--quick
if [[ "${1:-}" == --quick || "${1:-}" == --full ]]; then
  mode=$1
  shift
fi
[[ $(id -u) == 0 ]] || { echo "bench/run.sh: needs root (network namespaces, BPF)" >&2; exit 1; }

eval "$(scripts/bootstrap.sh)" || { echo "bench/run.sh: bootstrap failed" >&2; exit 1; }
for tool in iperf3 nft iptables-legacy-restore; do
  command -v "$tool" >/dev/null || { echo "bench/run.sh: $tool is missing (scripts/bootstrap.sh installs it)" >&2; exit 1; }
done

echo "==> building (release)" >&2
cargo build --release --locked -p weir -p weir-bench >&2

out="bench/results/$(date -u +%Y-%m-%d)-${mode#--}"
mkdir -p "$out"
marker="$out/.lab"
cleanup() {
  # A lab the suite was running when it was interrupted (its Drop guards did not run).
  if [[ -f "$marker" ]]; then
    target/release/weir lab down --name "$(cat "$marker")" >/dev/null 2>&1 || true
    rm -f "$marker"
  fi
}
trap cleanup EXIT INT TERM

echo "==> weir-bench suite $mode -> $out" >&2
# weir-bench knows --quick; full is its default.
quick=()
[[ $mode == --quick ]] && quick=(--quick)
WEIR_BENCH_COMMAND="bench/run.sh $mode $*" target/release/weir-bench suite "${quick[@]}" \
  --out "$out" --results-md bench/RESULTS.md \
  --weir "$PWD/target/release/weir" "$@"
echo "==> done: bench/RESULTS.md, $out/" >&2
