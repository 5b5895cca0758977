#!/usr/bin/env bash
# Installs everything weir needs on a fresh Debian 12 machine, idempotently.
#
# What a fresh machine lacks (see ../shared/TOOLCHAIN.md): the nightly `rust-src` component
# (for -Z build-std=core), bpf-linker built against nightly's own LLVM 22, bpftool, nftables,
# iperf3, tcpdump, ethtool, socat and a Prometheus server; bpffs is not mounted.
#
# Tools are cached under $WEIR_CACHE (default ~/.cache/weir), keyed on the nightly's
# `rustc -vV`, so a second run takes seconds. Every step prints what it does; a step that
# fails stops the script with a message naming the missing piece.
set -euo pipefail

WEIR_CACHE=${WEIR_CACHE:-$HOME/.cache/weir}
NIGHTLY=${WEIR_NIGHTLY:-nightly}
BPF_LINKER_VERSION=0.13.0
APT_PACKAGES=(iproute2 iptables nftables iperf3 bpftool tcpdump ethtool socat prometheus curl jq)

step() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[bootstrap] error:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "weir needs root (network namespaces, bpffs, BPF programs); run as root"
command -v rustup >/dev/null || die "rustup is missing: weir expects rustup with a stable and a '$NIGHTLY' toolchain"
command -v cargo >/dev/null || die "cargo is missing"

# 1. apt packages (only the ones that are not installed yet).
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Debian's prometheus package would start a system service on :9090; we only want the
  # binary (tests start their own on loopback), so policy-rc.d forbids service starts.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -qq >&2 || die "apt-get update failed: cannot reach Debian's package mirror (needed for: ${missing[*]})"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
    || die "apt-get install failed for: ${missing[*]}"
  rm -f /usr/sbin/policy-rc.d; trap - EXIT
else
  step "Debian packages present"
fi

# 2. nightly toolchain and rust-src.
rustup toolchain list | grep -q "^$NIGHTLY" \
  || die "the rust toolchain '$NIGHTLY' is not installed (weir builds its eBPF side with it; RUSTUP_AUTO_INSTALL=0 forbids a silent download)"
if ! rustup component list --toolchain "$NIGHTLY" --installed 2>/dev/null | grep -q '^rust-src'; then
  step "adding rust-src to the $NIGHTLY toolchain"
  rustup component add rust-src --toolchain "$NIGHTLY" >&2 \
    || die "could not install the rust-src component for $NIGHTLY (download from the Rust distribution server failed); it is needed for -Z build-std=core"
else
  step "rust-src present for $NIGHTLY"
fi

# 3. bpf-linker built against the nightly's own libLLVM (Debian 12 has no LLVM 22).
TC_DIR=$(rustc +"$NIGHTLY" --print sysroot)
KEY=$(rustc +"$NIGHTLY" -vV | sha256sum | cut -c1-16)
LINKER_ROOT=$WEIR_CACHE/bpf-linker-$BPF_LINKER_VERSION-$KEY
if [ ! -x "$LINKER_ROOT/bin/bpf-linker" ]; then
  libllvm=$(ls "$TC_DIR"/lib/libLLVM.so.* 2>/dev/null | head -n1)
  [ -n "$libllvm" ] || die "no libLLVM.so.* in $TC_DIR/lib: cannot build bpf-linker against the nightly's LLVM"
  llvm_major=$(basename "$libllvm" | sed -E 's/libLLVM\.so\.([0-9]+).*/\1/')
  step "building bpf-linker $BPF_LINKER_VERSION against $(basename "$libllvm") (one time, 1-3 minutes)"
  mkdir -p "$LINKER_ROOT/llvm/lib"
  ln -sf "$libllvm" "$LINKER_ROOT/llvm/lib/libLLVM.so"
  LLVM_PREFIX=$LINKER_ROOT/llvm RUSTFLAGS="-C link-arg=-Wl,-rpath,$TC_DIR/lib" \
    cargo +"$NIGHTLY" install "bpf-linker@$BPF_LINKER_VERSION" --locked --no-default-features \
      --features "llvm-$llvm_major" --root "$LINKER_ROOT" >&2 \
    || die "building bpf-linker failed (needs crates.io and the $NIGHTLY toolchain's libLLVM)"
else
  step "bpf-linker present ($LINKER_ROOT)"
fi
"$LINKER_ROOT/bin/bpf-linker" --version >/dev/null 2>&1 || die "bpf-linker at $LINKER_ROOT does not run"
mkdir -p "$WEIR_CACHE/bin"
ln -sf "$LINKER_ROOT/bin/bpf-linker" "$WEIR_CACHE/bin/bpf-linker"

# 4. bpffs.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  step "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf || die "could not mount bpffs at /sys/fs/bpf"
fi

step "ready (tools in $WEIR_CACHE/bin)"
# Callers source the PATH line this prints.
echo "export PATH=$WEIR_CACHE/bin:\$PATH"
