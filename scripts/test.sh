#!/usr/bin/env bash
# The whole test suite: unit, property (>= 10,000 cases), CLI, datapath and agent tests on
# network namespaces, the 48 upstream cases at model level, then the case files (48
# upstream + those fuzzing found) on real traffic through the real agent (IPv4 routed, IPv6
# routed, dual-stack bridged over two nodes; probes to Service ClusterIPs), the
# ClusterNetworkPolicy cases of the upstream suite in the same three setups, the Service,
# node and lifecycle cases (in those, and with proxy-ARP host veths on two nodes), then
# `conformance fuzz` with a fixed seed, without and with ClusterNetworkPolicies. Installs what it needs first. Ends with one line
# `tests: N passed, M failed` summing everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PROPTEST_CASES="${PROPTEST_CASES:-10000}"
log=$(mktemp)
runs=$(mktemp -d)
trap 'rm -f "$log"; rm -rf "$runs"' EXIT
status=0
took() { echo "=== $1 took $(( $(date +%s) - $2 )) s"; }
t0=$(date +%s)
# One test mostly sleeps through three API outages (5, 30 and 120 s) and cargo runs test
# binaries one after another: it runs beside the others instead, from its own binary.
slow=api_changes_are_enforced_and_resume_at_once_after_api_restarts
cargo test --workspace --locked --no-run 2>&1 | tee "$runs/build.log" || status=$?
api_bin=$(sed -n 's/.*Executable tests\/api_source.rs (\(.*\))$/\1/p' "$runs/build.log" | tail -1)
took "the build" "$t0"
if [ -z "$api_bin" ]; then
  echo "no api_source test binary in the build's output" | tee "$log"
  status=1
else
  # cargo runs an integration test from its package's directory.
  (cd conformance && "../$api_bin" --exact "$slow" > "$runs/api.log" 2>&1 || echo "run-status $?" >> "$runs/api.log") &
  api_pid=$!
fi
t1=$(date +%s)
cargo test --workspace --locked --no-fail-fast -- --skip "$slow" 2>&1 | tee -a "$log" || status=$?
took "cargo test" "$t1"
if [ -n "${api_pid:-}" ]; then
  wait "$api_pid" || true
  echo "=== $slow (beside the other tests)" | tee -a "$log"
  tee -a "$log" < "$runs/api.log"
  if grep -q '^run-status ' "$runs/api.log" || ! grep -q '^test result: ok. 1 passed' "$runs/api.log"; then status=1; fi
fi
cargo build --locked -q -p policy-agent -p conformance --bins
# The real-traffic runs are independent (each its own namespaces, agents and pins) and
# mostly wait on probes: run the three setups side by side, each to its own log, shown in
# order once all are done. Blocked-expected probes must time out, and an allowed probe
# that times out is probed again until the run's deadline, so load makes them slower, not
# wrong.
t3=$(date +%s)
n=0
pids=()
for config in "--family ipv4 --topology routed --nodes 1" \
              "--family ipv6 --topology routed --nodes 1" \
              "--family dual --topology bridge --nodes 2"; do
  n=$((n + 1))
  (
    t2=$(date +%s)
    echo "=== conformance run $config (upstream cases, real traffic)"
    # shellcheck disable=SC2086
    ./target/debug/conformance run $config conformance/cases/*.yaml 2>&1 || echo "run-status $?"
    # The upstream ClusterNetworkPolicy conformance tests, probing pod addresses as
    # upstream does (a blocked probe must be a drop).
    echo "=== conformance run $config --probe-to pod (ClusterNetworkPolicy cases, real traffic)"
    # shellcheck disable=SC2086
    ./target/debug/conformance run $config --probe-to pod conformance/cases/cnp/*.yaml 2>&1 || echo "run-status $?"
    if [ "$n" = 1 ]; then
      # The Service, node and lifecycle cases in the other host-veth layout: no IPv4
      # address on the host veths (proxy-ARP), where kube-proxy's masquerade picks the
      # node's own address.
      echo "=== conformance run --family dual --topology proxy-arp --nodes 2 (Service, node and lifecycle cases, real traffic)"
      ./target/debug/conformance run --family dual --topology proxy-arp --nodes 2 \
        conformance/cases/{nodeport,service,hairpin,lifecycle,namespace,node-own,spanning}-*.yaml 2>&1 || echo "run-status $?"
    fi
    took "conformance run $config (all of its runs)" "$t2"
  ) > "$runs/$n.log" 2>&1 &
  pids+=($!)
done
# Random cases in the cyclonus families, expectations from the reference evaluator; a
# fixed seed so CI is reproducible (any disagreement is written under target/fuzz-failures).
(
  t2=$(date +%s)
  echo "=== conformance fuzz --seed 1 --cases 22 --family dual --topology bridge --nodes 2"
  ./target/debug/conformance fuzz --seed 1 --cases 22 --family dual --topology bridge --nodes 2 2>&1 || echo "run-status $?"
  # The same with ClusterNetworkPolicies of both tiers mixed in (other cases).
  echo "=== conformance fuzz --seed 1 --cases 24 --family dual --topology bridge --nodes 2 --cluster-policies"
  ./target/debug/conformance fuzz --seed 1 --cases 24 --family dual --topology bridge --nodes 2 --cluster-policies 2>&1 || echo "run-status $?"
  took "conformance fuzz (both seeds)" "$t2"
) > "$runs/fuzz.log" 2>&1 &
pids+=($!)
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
took "the real-traffic runs" "$t3"
for f in "$runs"/1.log "$runs"/2.log "$runs"/3.log "$runs"/fuzz.log; do
  cat "$f" | tee -a "$log"
  if grep -q '^run-status ' "$f"; then status=1; fi
done
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     /^[0-9]+ passed, [0-9]+ failed$/ { p += $1; f += $3 }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
