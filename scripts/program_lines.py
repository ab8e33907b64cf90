#!/usr/bin/env python3
"""Where in their source the loaded kernel programs spend their time, from a `perf` profile.

perf here samples with cpu-clock and cannot disassemble BPF (no libbfd), but each loaded
program's JIT line table (`bpf_prog_info.jited_line_info`) maps a sampled address to a BPF
instruction, and `bpftool prog dump xlated linum` maps that to a source line. Usage, as
root, while the programs are loaded (e.g. during `bench`'s policy-agent phase):

    python3 scripts/program_lines.py save DIR            # line tables of pod_egress/pod_ingress
    perf record -F 4999 -a -o DIR/perf.data -- sleep 15  # in the same load of the programs
    perf script -i DIR/perf.data -F ip,sym > DIR/perf.txt
    python3 scripts/program_lines.py report DIR          # share of each source line, per program

Needs bpftool (Debian's `bpftool`) and perf (`linux-perf`). Shares are of the samples in
each program's own code; a cache miss shows on the instruction after the load.
"""
import bisect, collections, ctypes, json, os, re, signal, struct, subprocess, sys

SYS_BPF, PROG_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD = 321, 13, 15
PROGRAMS = ("pod_egress", "pod_ingress")
libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    r = libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def info(fd, buf):
    a = (ctypes.c_char * 128)()
    struct.pack_into("IIQ", a, 0, fd, len(buf), ctypes.addressof(buf))
    bpf(OBJ_GET_INFO_BY_FD, a)


def jit_lines(prog_id):
    """(subprogram (start, length) list, sorted (JIT address, instruction) list)."""
    attr = (ctypes.c_char * 128)()
    struct.pack_into("I", attr, 0, prog_id)
    fd = bpf(PROG_GET_FD_BY_ID, attr)
    first = (ctypes.c_char * 256)()
    info(fd, first)
    # Offsets in struct bpf_prog_info (include/uapi/linux/bpf.h).
    nr_ksyms, nr_lens = struct.unpack_from("II", first, 104)
    nr_li, = struct.unpack_from("I", first, 148)
    nr_jli, li_size, jli_size = struct.unpack_from("III", first, 168)
    ksyms, lens = (ctypes.c_uint64 * nr_ksyms)(), (ctypes.c_uint32 * nr_lens)()
    li, jli = (ctypes.c_char * (nr_li * li_size))(), (ctypes.c_uint64 * nr_jli)()
    second = (ctypes.c_char * 256)()
    struct.pack_into("IIQQ", second, 104, nr_ksyms, nr_lens, ctypes.addressof(ksyms), ctypes.addressof(lens))
    struct.pack_into("I", second, 148, nr_li)
    struct.pack_into("QQIII", second, 152, ctypes.addressof(li), ctypes.addressof(jli), nr_jli, li_size, jli_size)
    info(fd, second)
    os.close(fd)
    subs = [(ksyms[i], lens[i]) for i in range(nr_ksyms)]
    lines = sorted((jli[i], struct.unpack_from("I", li, i * li_size)[0]) for i in range(nr_jli))
    return subs, lines


def source_lines(prog_id):
    """BPF instruction -> 'file:line | source', from bpftool's dump."""
    out = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", str(prog_id), "linum"], check=True, capture_output=True, text=True).stdout
    src, cur = {}, None
    for l in out.splitlines():
        m = re.search(r"\[file:(\S+) line_num:(\d+)", l)
        if l.startswith(";") and m:
            cur = "%s:%s | %s" % (m.group(1).split("/")[-1], m.group(2), l[1:l.find("[file:")].strip()[:70])
            continue
        m = re.match(r"\s*(\d+):", l)
        if m:
            src[int(m.group(1))] = cur
    return src


def save(d):
    os.makedirs(d, exist_ok=True)
    listing = json.loads(subprocess.run(["bpftool", "-j", "prog", "list"], check=True, capture_output=True, text=True).stdout)
    saved = {}
    for p in listing:
        if p.get("name") in PROGRAMS:
            subs, lines = jit_lines(p["id"])
            saved[p["name"]] = {"subs": subs, "lines": lines, "source": source_lines(p["id"])}
    if not saved:
        sys.exit("none of %s is loaded" % ", ".join(PROGRAMS))
    with open(os.path.join(d, "lines.json"), "w") as f:
        json.dump(saved, f)
    print("saved", ", ".join(saved))


def report(d, floor=1.0):
    saved = json.load(open(os.path.join(d, "lines.json")))
    counts, totals = collections.Counter(), collections.Counter()
    for l in open(os.path.join(d, "perf.txt")):
        t = l.split()
        if len(t) < 2 or "bpf_prog" not in t[1]:
            continue
        ip = int(t[0], 16)
        for name, s in saved.items():
            if any(b <= ip < b + n for b, n in s["subs"]):
                i = bisect.bisect_right(s["lines"], [ip, 1 << 40]) - 1
                counts[(name, s["source"].get(str(s["lines"][i][1])) if i >= 0 else None)] += 1
                totals[name] += 1
                break
    for name in sorted(totals):
        print("== %s: %d samples" % (name, totals[name]))
        for (n, line), c in counts.most_common():
            if n == name and 100.0 * c / totals[name] >= floor:
                print("%5.1f%% %s" % (100.0 * c / totals[name], line))


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the output quietly
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "report"):
        sys.exit(__doc__)
    (save if sys.argv[1] == "save" else report)(sys.argv[2])
