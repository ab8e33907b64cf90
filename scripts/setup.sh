#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh machine of this kind (Debian,
# root, rustup with stable and nightly toolchains). Safe to run again: it only acts on
# what is missing. Never runs `rustup update`: everything derives from the installed
# toolchains.
set -euo pipefail

log() { echo "setup: $*" >&2; }

command -v cargo >/dev/null || { log "cargo not found: this machine needs a Rust toolchain (rustup)"; exit 1; }

# Debian packages the tests use (ip for network namespaces arrives with the datapath).
need_pkgs=()
for tool in pkg-config:pkg-config; do
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
log "ok ($(cargo --version))"
