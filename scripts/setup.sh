#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh machine of this kind (Debian,
# root, rustup with stable and nightly toolchains). Safe to run again: it only acts on
# what is missing. Never runs `rustup update`: everything derives from the installed
# toolchains.
set -euo pipefail

log() { echo "setup: $*" >&2; }

command -v cargo >/dev/null || { log "cargo not found: this machine needs a Rust toolchain (rustup)"; exit 1; }

# Debian packages: iproute2 (network namespaces, veths), iptables and nftables (the
# tests' kube-proxy-style Service DNAT and masquerade; the datapath bench's iptables and
# nftables rulesets).
need_pkgs=()
for tool in ip:iproute2 iptables:iptables nft:nftables nsenter:util-linux; do
  bin=${tool%%:*}; pkg=${tool##*:}
  command -v "$bin" >/dev/null || need_pkgs+=("$pkg")
done
if ((${#need_pkgs[@]})); then
  log "installing ${need_pkgs[*]}"
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    log "not root: install ${need_pkgs[*]} yourself"; exit 1
  fi
fi
# The eBPF toolchain (nightly rust-src, bpf-linker on the nightly's LLVM).
bash "$(dirname "$0")/setup-ebpf.sh"

# Pins live on the BPF filesystem.
if [ "$(id -u)" -eq 0 ] && ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  log "mounting bpffs on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
log "ok ($(cargo --version))"
