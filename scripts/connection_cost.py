#!/usr/bin/env python3
"""CPU time per TCP connection, function by function, with no program, the floor and
policy-agent on the path: where the agent's cost per connection goes.

`bench` measures each configuration's TCP connection loop in turn; this records
`perf record -a` over 12 s of each loop, then turns each function's share of the samples
into CPU time per connection (share x CPUs / connections per second) and prints the
differences. Usage, as root, with nothing else running (build first, not during it):

    python3 scripts/connection_cost.py record DIR [BENCH]   # BENCH: target/release/bench
    python3 scripts/connection_cost.py report DIR [A B]     # A minus B; default agent none

Needs perf (`linux-perf`) and bpftool. `record` starts `BENCH --mechanisms
none,floor,policy-agent --rules 10000 --rounds 1 --seconds 25`, finds each phase by what
is loaded (no program, `pass_all`, `pod_egress`) and samples a few seconds into it.
"""
import os, re, signal, subprocess, sys, time

PHASES = ("none", "floor", "agent")
BENCH_NAMES = {"none": "none", "floor": "floor", "policy-agent": "agent"}


def loaded(name):
    return subprocess.run(["bpftool", "prog", "show", "name", name], capture_output=True).returncode == 0


def wait_for(cond, seconds):
    end = time.time() + seconds
    while time.time() < end:
        if cond():
            return
        time.sleep(0.5)
    sys.exit("timed out waiting for the bench's next phase")


def record(d, bench):
    os.makedirs(d, exist_ok=True)
    log = open(os.path.join(d, "bench.log"), "w")
    args = [bench, "--mechanisms", "none,floor,policy-agent", "--rules", "10000", "--rounds", "1",
            "--seconds", "25", "--warmup-seconds", "2", "--bulk-seconds", "1"]
    b = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    netns = lambda: subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.strip() != ""
    waits = {"none": (netns, 7), "floor": (lambda: loaded("pass_all"), 4), "agent": (lambda: loaded("pod_egress"), 4)}
    for phase in PHASES:
        cond, settle = waits[phase]
        wait_for(cond, 300)
        time.sleep(settle)  # past the setup and the warm-up, into the connection loop
        subprocess.run(["perf", "record", "-F", "2999", "-a", "-o", os.path.join(d, phase + ".data"), "--", "sleep", "12"],
                       capture_output=True, check=True)
    if b.wait() != 0:
        sys.exit("the bench failed: see " + log.name)
    for phase in PHASES:
        out = subprocess.run(["perf", "report", "-i", os.path.join(d, phase + ".data"), "--sort", "sym", "--stdio",
                              "--no-children", "-g", "none"], capture_output=True, text=True, check=True).stdout
        with open(os.path.join(d, phase + ".txt"), "w") as f:
            f.write(out)
    print("recorded in", d)


def rates(d):
    out = {}
    for line in open(os.path.join(d, "bench.log")):
        m = re.match(r"round 1: (\S+)\s.*?(\d+) conn/s", line)
        if m and m.group(1) in BENCH_NAMES:
            out[BENCH_NAMES[m.group(1)]] = int(m.group(2))
    return out


def shares(d, phase):
    """Percent of all samples per function (a loaded program's tag left out of its name)."""
    out = {}
    for line in open(os.path.join(d, phase + ".txt")):
        t = line.split()
        if len(t) >= 3 and t[0].endswith("%"):
            sym = re.sub(r"bpf_prog_[0-9a-f]+_", "bpf_prog_", " ".join(t[2:]))
            out[sym] = out.get(sym, 0.0) + float(t[0][:-1])
    return out


def report(d, a="agent", b="none", rows=25):
    r = rates(d)
    cpus = os.cpu_count()
    ns = {p: {s: v / 100 * cpus * 1e9 / r[p] for s, v in shares(d, p).items()} for p in (a, b)}
    total = {p: sum(ns[p].values()) for p in (a, b)}
    print("connections/s:", r)
    print("CPU per connection: %s %.1f us, %s %.1f us" % (a, total[a] / 1000, b, total[b] / 1000))
    print("%9s %9s %9s  function (ns per connection)" % (a + "-" + b, b, a))
    diff = sorted(((ns[a].get(s, 0) - ns[b].get(s, 0), s) for s in set(ns[a]) | set(ns[b])), reverse=True)
    for delta, s in diff[:rows]:
        print("%9.0f %9.0f %9.0f  %s" % (delta, ns[b].get(s, 0), ns[a].get(s, 0), s))


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the output quietly
    if len(sys.argv) < 3 or sys.argv[1] not in ("record", "report"):
        sys.exit(__doc__)
    if sys.argv[1] == "record":
        record(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "target/release/bench")
    else:
        report(sys.argv[2], *sys.argv[3:5])
