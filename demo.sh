#!/usr/bin/env bash
# weir's main job on its embedded default: builds weir and runs the demo, which creates
# throwaway network namespaces, runs a real weir agent, and shows a ClusterIP Service
# balancing real connections. Installs what it needs first. Needs root.
set -euo pipefail
cd "$(dirname "$0")"
printf '\033[1m==> bootstrap\033[0m\n' >&2
eval "$(scripts/bootstrap.sh)" || { echo "demo.sh: bootstrap failed (see above)" >&2; exit 1; }
printf '\033[1m==> building weir (the first build takes a few minutes)\033[0m\n' >&2
cargo build --locked -p weir --bin weir || { echo "demo.sh: build failed" >&2; exit 1; }
printf '\033[1m==> weir demo\033[0m\n' >&2
exec "${CARGO_TARGET_DIR:-target}/debug/weir" demo "$@"
