#!/usr/bin/env bash
# The eBPF toolchain: the nightly toolchain's rust-src (to build `core` for the BPF
# target) and bpf-linker linked against that nightly's own LLVM, which ships inside the
# toolchain as a shared library (see ../shared/DESIGN.md). Only acts on what is missing.
set -euo pipefail
log() { echo "setup-ebpf: $*" >&2; }

BPF_LINKER_VERSION=0.13.0
# The toolchain that builds the kernel programs (policy-agent/build.rs reads the same).
NIGHTLY="${POLICY_AGENT_EBPF_TOOLCHAIN:-nightly}"

rustup toolchain list | grep -q "^$NIGHTLY" || { log "no $NIGHTLY toolchain installed; this recipe derives everything from the installed one"; exit 1; }
if ! rustup component list --toolchain "$NIGHTLY" --installed | grep -q '^rust-src'; then
  log "adding rust-src to $NIGHTLY"
  rustup component add rust-src --toolchain "$NIGHTLY"
fi

sysroot=$(rustc "+$NIGHTLY" --print sysroot)
llvm_major=$(rustc "+$NIGHTLY" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
prefix="${POLICY_AGENT_LLVM_PREFIX:-$HOME/.cache/policy-agent/llvm-$llvm_major}"

have_linker() {
  command -v bpf-linker >/dev/null && bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION" \
    && [ -f "$prefix/.built-for" ] && [ "$(cat "$prefix/.built-for")" = "$sysroot" ]
}

if have_linker; then
  log "ok (bpf-linker $BPF_LINKER_VERSION, LLVM $llvm_major from $sysroot)"
  exit 0
fi

# The toolchain ships the library as libLLVM.so.<ver>-rust-<ver> (an ELF) plus a small
# linker-script stub; link against the ELF, under its own name too (bpf-linker's rpath).
lib=""
for f in "$sysroot"/lib/libLLVM.so.* "$sysroot"/lib/libLLVM-*.so; do
  [ -f "$f" ] && head -c 4 "$f" | grep -q 'ELF' && { lib=$f; break; }
done
[ -n "$lib" ] || { log "no libLLVM shared object in $sysroot/lib"; exit 1; }
mkdir -p "$prefix/lib"
ln -sf "$lib" "$prefix/lib/libLLVM.so"
ln -sf "$lib" "$prefix/lib/$(basename "$lib")"
if ! command -v cc >/dev/null; then
  log "installing a C toolchain"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential >/dev/null
fi
log "building bpf-linker $BPF_LINKER_VERSION against LLVM $llvm_major ($lib); this takes a few minutes"
LLVM_PREFIX="$prefix" LD_LIBRARY_PATH="$prefix/lib:${LD_LIBRARY_PATH:-}" \
  cargo install --locked --force bpf-linker --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-$llvm_major"
echo "$sysroot" > "$prefix/.built-for"
bpf-linker --version >&2
log "ok"
