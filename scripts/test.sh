#!/usr/bin/env bash
# The whole test suite: unit, property (>= 10,000 cases), CLI and the 48 upstream cases
# at model level. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PROPTEST_CASES="${PROPTEST_CASES:-10000}"
cargo test --workspace --locked
