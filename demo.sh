#!/usr/bin/env bash
# weir's main job on its embedded default: builds weir and runs `weir lab demo`, which
# builds a small cluster of network namespaces from examples/demo (nodes, pods with real
# servers, one real weir agent per node), probes its Services and NetworkPolicy with real
# connections, prints what it saw against what upstream Kubernetes expects, and removes
# everything. Installs what it needs first. Needs root.
set -euo pipefail
cd "$(dirname "$0")"
printf '\033[1m==> bootstrap\033[0m\n' >&2
eval "$(scripts/bootstrap.sh)" || { echo "demo.sh: bootstrap failed (see above)" >&2; exit 1; }
printf '\033[1m==> building weir (the first build takes a few minutes)\033[0m\n' >&2
cargo build --locked -p weir --bin weir || { echo "demo.sh: build failed" >&2; exit 1; }
printf '\033[1m==> weir lab demo\033[0m\n' >&2
exec "${CARGO_TARGET_DIR:-target}/debug/weir" lab demo "$@"
