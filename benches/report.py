#!/usr/bin/env python3
"""Turns the raw results of benches/run.sh into benches/RESULTS.md.

Inputs, in the results directory: one fio JSON file per run, named
WORKLOAD.SYSTEM.REP.json, and results.tsv with the measurements fio does not make
(WORKLOAD, SYSTEM, REP, VALUE per line). For every workload the report gives the median
of each system and the median of the per-repetition ratios ours/qsd, and checks the target.
Anything after the line NOTES_MARK in an existing report is kept (hand-written analysis).
Standard library only.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from pathlib import Path

NOTES_MARK = "<!-- notes: kept when the table is regenerated -->"

# name -> (description, unit, target)
# unit: "MB/s" and "IOPS" from fio (higher is better), "ms" (lower is better; the raw value
# is in microseconds), "MiB" (peak RSS). target: ("ratio>=", x), ("ratio<=", x) or None.
WORKLOADS = [
    ("plain.seq_buf", "sequential 1 MiB reads, buffered, one cold pass", "MB/s", (">=", 3.0)),
    ("plain_ra.seq_buf", "the same, qcow2fs with `-o readahead=1024`", "MB/s", (">=", 3.0)),
    ("plain.seq_direct", "sequential 1 MiB reads, O_DIRECT", "MB/s", (">=", 2.5)),
    ("plain.rand_qd1_buf", "4 KiB random reads, QD1, buffered", "IOPS", None),
    ("plain.rand_qd1_direct", "4 KiB random reads, QD1, O_DIRECT", "IOPS", (">=", 2.0)),
    ("plain.rand_4j_buf", "4 KiB random reads, 4 jobs, buffered", "IOPS", None),
    ("plain.rand_4j_direct", "4 KiB random reads, 4 jobs, O_DIRECT", "IOPS", (">=", 2.0)),
    ("zlib.seq_direct", "zlib image: sequential 1 MiB, O_DIRECT", "MB/s", None),
    ("zlib.rand_qd1_direct", "zlib image: 4 KiB random, QD1, O_DIRECT", "IOPS", (">=", 3.0)),
    ("zstd.seq_direct", "zstd image: sequential 1 MiB, O_DIRECT", "MB/s", (">=", 2.0)),
    ("zstd.rand_qd1_direct", "zstd image: 4 KiB random, QD1, O_DIRECT", "IOPS", None),
    ("chain.seq_direct", "8-deep chain: sequential 1 MiB, O_DIRECT", "MB/s", (">=", 2.0)),
    ("chain.rand_qd1_direct", "8-deep chain: 4 KiB random, QD1, O_DIRECT", "IOPS", None),
    ("snap.seq_direct", "snapshot file*: sequential 1 MiB, O_DIRECT", "MB/s", (">=", 4.0)),
    ("snap.rand_qd1_direct", "snapshot file*: 4 KiB random, QD1, O_DIRECT", "IOPS", None),
    ("snap.dd_cold", "snapshot file*: `dd bs=1M`, cold", "MB/s", None),
    ("snap.dd_warm", "snapshot file*: `dd bs=1M` again, new process", "MB/s", (">=", 10.0)),
    ("sparse.mount_first_read", "1 TiB sparse image: mount to first 4 KiB read", "ms", ("<=", 0.5)),
    ("rw.write_seq", "allocating sequential 1 MiB writes, O_DIRECT, fsync", "MB/s", (">=", 1.5)),
    ("rw.write_rand", "4 KiB random overwrites, QD1, O_DIRECT, fsync", "IOPS", (">=", 1.5)),
    ("luks.seq_direct", "LUKS aes-256-xts image: sequential 1 MiB, O_DIRECT", "MB/s", (">=", 2.0)),
    ("luks.rand_qd1_direct", "LUKS aes-256-xts image: 4 KiB random, QD1, O_DIRECT", "IOPS", (">=", 2.0)),
    ("luks.rand_4j_direct", "LUKS aes-256-xts image: 4 KiB random, 4 jobs, O_DIRECT", "IOPS", (">=", 2.0)),
    ("rw_luks.write_seq", "LUKS image: allocating sequential 1 MiB writes, O_DIRECT, fsync", "MB/s", None),
    ("rw_luks.write_rand", "LUKS image: 4 KiB random overwrites, QD1, O_DIRECT, fsync", "IOPS", None),
    ("rw.write_seq_bitmap", "the same sequential writes, with an enabled bitmap", "MB/s", None),
    ("rw.write_rand_bitmap", "the same random overwrites, with an enabled bitmap", "IOPS", None),
]

# Workloads run with and without an enabled persistent bitmap: (without, with).
BITMAP_PAIRS = [
    ("rw.write_seq", "rw.write_seq_bitmap", "1 MiB sequential writes"),
    ("rw.write_rand", "rw.write_rand_bitmap", "4 KiB random writes"),
]

SYSTEMS = ["ours", "qsd", "qcowmount"]

# The RSS bound: 64 MiB plus the L2 cache qcow2fs is configured with (32 MiB by default).
RSS_LIMIT_MIB = 64 + 32


def fio_value(path, unit):
    """The job's result in `unit`, and the work it did (MB, or I/Os for IOPS)."""
    text = path.read_text()
    start = text.find("{")  # fio may print warnings before the JSON
    job = json.loads(text[start:])["jobs"][0]
    side = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
    if unit == "IOPS":
        return side["iops"], side["total_ios"]
    return side["bw_bytes"] / 1e6, side["io_bytes"] / 1e6


def load(results):
    """{workload: {system: {rep: value}}} in the workload's unit, the same for other
    measurements, and {workload: {system: {rep: work}}} for fio jobs."""
    units = {w[0]: w[2] for w in WORKLOADS}
    data = defaultdict(lambda: defaultdict(dict))
    extra = defaultdict(lambda: defaultdict(dict))
    work = defaultdict(lambda: defaultdict(dict))
    for path in sorted(results.glob("*.json")):
        parts = path.name[: -len(".json")].rsplit(".", 2)
        if len(parts) != 3:
            continue
        workload, system, rep = parts
        unit = units.get(workload, "MB/s")
        target = data if workload in units else extra
        value, done = fio_value(path, unit)
        target[workload][system][int(rep)] = value
        work[workload][system][int(rep)] = done
    tsv = results / "results.tsv"
    if tsv.exists():
        for line in tsv.read_text().splitlines():
            if not line.strip():
                continue
            workload, system, rep, value = line.split("\t")
            value = float(value)
            if units.get(workload) == "ms":
                value /= 1000.0  # recorded in microseconds
            target = data if workload in units else extra
            target[workload][system][int(rep)] = value
    return data, extra, work


def cpu_ratio(name, extra, work):
    """Median over repetitions of (daemon CPU per unit of work) ours / qsd."""
    cpu = extra.get(name + ".cpu_ms", {})
    done = work.get(name, {})
    ratios = []
    for rep, ms in cpu.get("ours", {}).items():
        q = cpu.get("qsd", {}).get(rep)
        wo, wq = done.get("ours", {}).get(rep), done.get("qsd", {}).get(rep)
        if q and wo and wq and ms > 0:
            ratios.append((ms / wo) / (q / wq))
    return statistics.median(ratios) if ratios else None


def cpu_per_mb(name, extra, work, system="ours"):
    """Median over repetitions of the daemon's CPU milliseconds per MB of a fio job."""
    cpu = extra.get(name + ".cpu_ms", {}).get(system, {})
    done = work.get(name, {}).get(system, {})
    v = [ms / done[r] for r, ms in cpu.items() if done.get(r)]
    return statistics.median(v) if v else None


def decryption_cost(data, extra, work):
    """What decryption costs qcow2fs: the LUKS image against the unencrypted one with
    the same data, sequential O_DIRECT reads (throughput, and daemon CPU per byte)."""
    plain, luks = data.get("plain.seq_direct", {}), data.get("luks.seq_direct", {})
    if not plain.get("ours") or not luks.get("ours"):
        return None
    tp = statistics.median(plain["ours"].values())
    tl = statistics.median(luks["ours"].values())
    text = (
        f"Cost of decryption (qcow2fs, sequential 1 MiB O_DIRECT reads, the same data "
        f"unencrypted and LUKS aes-256-xts): {tp:.0f} MB/s against {tl:.0f} MB/s "
        f"({tl / tp:.2f}x)"
    )
    cp, cl = cpu_per_mb("plain.seq_direct", extra, work), cpu_per_mb("luks.seq_direct", extra, work)
    if cp is not None and cl is not None:
        # 1 ms of CPU per MB is 1 ns per byte.
        text += (
            f"; daemon CPU {cp:.2f} against {cl:.2f} ns per byte, so decrypting costs "
            f"about {cl - cp:.2f} ns per byte ({1000 / max(cl - cp, 1e-9):.0f} MB/s of one core)"
        )
    qp, ql = plain.get("qsd"), luks.get("qsd")
    if qp and ql:
        a, b = statistics.median(qp.values()), statistics.median(ql.values())
        text += f"; qsd: {a:.0f} against {b:.0f} MB/s ({b / a:.2f}x)"
    return text + "."


def fmt(value, unit):
    if value is None:
        return "n/a"
    if unit == "IOPS":
        return f"{value / 1000:.1f}k"
    if unit == "ms":
        return f"{value:.1f}"
    return f"{value:.0f}"


def machine():
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        mem = f"{int(mem) / 1024 / 1024:.0f} GiB"
    except (OSError, IndexError, ValueError):
        mem = "unknown"
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = ["?"] * 3
    try:
        qemu = subprocess.run(
            ["qemu-img", "--version"], capture_output=True, text=True, check=False
        ).stdout.split("\n")[0]
    except OSError:
        qemu = "unknown"
    try:
        fio = subprocess.run(
            ["fio", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        fio = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "load": " ".join(load),
        "qemu": qemu,
        "fio": fio,
    }


def report(args):
    data, extra, work = load(Path(args.results))
    m = machine()
    lines = []
    out = lines.append
    out("# Benchmark results")
    out("")
    out("Made by `make bench` (`benches/run.sh`, `benches/report.py`); see the end for what")
    out("bounds the targets that are missed.")
    out("")
    out(
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM, {m['kernel']}, "
        f"load average at the end {m['load']}"
    )
    out(f"- date: {datetime.date.today().isoformat()}; qcow2fs commit {args.commit}")
    out(f"- peers: {m['qemu']} (`qemu-storage-daemon --export type=fuse`, \"qsd\")"
        + ("; libqcow `qcowmount` on the plain and zlib images" if args.qcowmount == "1" else
           "; `qcowmount` not installed"))
    out(
        f"- {m['fio']}, psync engine; data images {args.size} (half of every 4 KiB random, "
        f"half zeros), 64 KiB clusters; {args.reps} repetitions, systems interleaved; "
        f"time-based jobs {args.runtime} s"
    )
    out(
        "- page cache dropped before every run; then, except for the cold passes "
        "(buffered sequential, cold `dd`), the image files are read once, so that the "
        "runs measure the FUSE path and the daemons rather than the disk"
    )
    out("")
    out("Values are medians over the repetitions; the ratio is the median of the")
    out("per-repetition ratios ours/qsd (lower is better for latency). \"CPU/work\" is the")
    out("daemon's CPU time (all threads, /proc/PID/stat) per byte or per I/O, ours/qsd: how")
    out("much work each daemon spends, which a busy machine disturbs less than throughput.")
    out("")
    has_qcm = any("qcowmount" in data[w[0]] for w in WORKLOADS)
    head = "| workload | unit | qcow2fs | qsd |" + (" qcowmount |" if has_qcm else "")
    head += " ours/qsd | target | | CPU/work |"
    out(head)
    out("|" + "---|" * (head.count("|") - 1))
    for name, desc, unit, target in WORKLOADS:
        runs = data.get(name, {})
        if not runs:
            continue
        med = {s: statistics.median(runs[s].values()) if runs.get(s) else None for s in SYSTEMS}
        ratios = [
            runs["ours"][r] / runs["qsd"][r]
            for r in runs.get("ours", {})
            if r in runs.get("qsd", {}) and runs["qsd"][r] > 0
        ]
        ratio = statistics.median(ratios) if ratios else None
        verdict, tgt = "", ""
        if target and ratio is not None:
            op, x = target
            tgt = f"{op} {x:g}x"
            met = ratio >= x if op == ">=" else ratio <= x
            verdict = "met" if met else "**missed**"
        row = f"| {desc} | {unit} | {fmt(med['ours'], unit)} | {fmt(med['qsd'], unit)} |"
        if has_qcm:
            row += f" {fmt(med['qcowmount'], unit)} |"
        row += f" {'n/a' if ratio is None else f'{ratio:.2f}x'} | {tgt} | {verdict} |"
        cr = cpu_ratio(name, extra, work)
        row += f" {'' if cr is None else f'{cr:.2f}x'} |"
        out(row)
    out("")
    for runs, what in [
        (
            extra.get("disk.cold_read", {}).get("host"),
            "the cold passes, `dd` of the image file itself with a cold page cache",
        ),
        (
            data.get("snap.dd_warm", {}).get("pagecache"),
            "the warm re-read, `dd` of a regular file of the same size from the page cache",
        ),
    ]:
        if runs:
            out(f"The ceiling for {what}: {statistics.median(runs.values()):.0f} MB/s.")
            out("")
    cost = decryption_cost(data, extra, work)
    if cost:
        out(cost)
        out("")
    out("\\* qsd cannot export an internal snapshot; its figure is for the active disk of")
    out("the same image (it would need qemu-nbd in between for the snapshot).")
    out("")
    pairs = [p for p in BITMAP_PAIRS if data.get(p[0]) and data.get(p[1])]
    if pairs:
        out("The cost of tracking writes in a persistent bitmap, for each system: throughput")
        out("with an enabled bitmap divided by throughput without (1.00x: no cost), and the")
        out("daemon's CPU time per byte or I/O with the bitmap divided by without (1.00x: no")
        out("cost); medians of the per-repetition ratios:")
        out("")
        out("| writes | qcow2fs throughput | qsd throughput | qcow2fs CPU/work | qsd CPU/work |")
        out("|---|---|---|---|---|")
        for without, with_bm, desc in pairs:
            cells = []
            for s in ("ours", "qsd"):
                a, b = data[without].get(s, {}), data[with_bm].get(s, {})
                r = [b[k] / a[k] for k in a if k in b and a[k] > 0]
                cells.append(f"{statistics.median(r):.2f}x" if r else "n/a")
            for s in ("ours", "qsd"):
                r = []
                for rep, ms in extra.get(with_bm + ".cpu_ms", {}).get(s, {}).items():
                    ms0 = extra.get(without + ".cpu_ms", {}).get(s, {}).get(rep)
                    w1 = work.get(with_bm, {}).get(s, {}).get(rep)
                    w0 = work.get(without, {}).get(s, {}).get(rep)
                    if ms0 and w0 and w1 and ms > 0:
                        r.append((ms / w1) / (ms0 / w0))
                cells.append(f"{statistics.median(r):.2f}x" if r else "n/a")
            out(f"| {desc} | " + " | ".join(cells) + " |")
        out("")
    rss = extra.get("sparse.rss_kib", {})
    if rss:
        out("Peak daemon RSS (VmHWM) while reading the 1 TiB sparse image (an L2 table every")
        out("512 MiB: 128 MiB of L2 metadata), first 64 KiB at every 512 MiB over the whole")
        out(f"disk, then sequentially from the start for at most {args.rss_seconds} s:")
        out("")
        out("| system | peak RSS | sequential part read | target | |")
        out("|---|---|---|---|---|")
        for s in ("ours", "qsd"):
            if s not in rss:
                continue
            kib = rss[s][1]
            seq = extra.get("sparse.seq", {}).get(s, {}).get(1)
            seq_path = Path(args.results) / f"sparse.seq.{s}.1.json"
            read = ""
            if seq_path.exists():
                text = seq_path.read_text()
                job = json.loads(text[text.find("{"):])["jobs"][0]["read"]
                read = f"{job['io_bytes'] / 2**30:.0f} GiB at {job['bw_bytes'] / 1e6:.0f} MB/s"
            elif seq is not None:
                read = f"{seq:.0f} MB/s"
            if s == "ours":
                tgt = f"< {RSS_LIMIT_MIB} MiB"
                verdict = "met" if kib / 1024 < RSS_LIMIT_MIB else "**missed**"
            else:
                tgt, verdict = "", ""
            name = "qcow2fs" if s == "ours" else s
            out(f"| {name} | {kib / 1024:.1f} MiB | {read} | {tgt} | {verdict} |")
        out("")
    vm_state(extra, out)
    text = "\n".join(lines) + "\n"
    old = Path(args.out).read_text() if Path(args.out).exists() else ""
    if NOTES_MARK in old:
        text += "\n" + NOTES_MARK + old.split(NOTES_MARK, 1)[1]
    else:
        text += "\n" + NOTES_MARK + "\n"
    Path(args.out).write_text(text)


def vm_state(extra, out):
    """The section of benches/vmstate.sh: the memory file of a snapshot with VM state."""
    med = {
        k: statistics.median(v["ours"].values())
        for k, v in extra.items()
        if k.startswith("vm.") and v.get("ours")
    }
    if "vm.mem.read_cold" not in med:
        return
    ram = med.get("vm.ram_bytes", med["vm.mem_bytes"] - 2**30) / 2**30
    out(f"The VM state of a snapshot of a guest with {ram:.0f} GiB of RAM (`benches/vmstate.sh`:")
    out(f"every 16th page data, the others zero pages, a {med['vm.stream_bytes'] / 2**20:.0f} MiB "
        "stream), a new daemon")
    out("every time: the first 4 KiB of the memory file read with O_DIRECT right after")
    out("mounting (that read builds the page index), then the whole file with O_DIRECT in")
    out("1 MiB blocks, then the same for the stream file in the same mount.")
    out("Cold: page cache dropped before each step (programs are loaded from disk too); warm:")
    out("the image file in it. No peer rebuilds guest memory from a savevm stream: the stream")
    out("file itself, a plain qcow2 read, is the comparison.")
    out("")
    out("| file | size | first 4 KiB, cold | warm | whole file, cold | warm |")
    out("|---|---|---|---|---|---|")
    for what, size in (("mem", med["vm.mem_bytes"]), ("vmstate", med["vm.stream_bytes"])):
        out(
            f"| `NAME.{what}` | {size / 2**20:.0f} MiB "
            f"| {med[f'vm.{what}.ttfb_cold'] / 1000:.1f} ms "
            f"| {med[f'vm.{what}.ttfb_warm'] / 1000:.1f} ms "
            f"| {med[f'vm.{what}.read_cold']:.0f} MB/s | {med[f'vm.{what}.read_warm']:.0f} MB/s |"
        )
    out("")
    rss = med.get("vm.rss_kib")
    out(
        f"The page index: built in {med['vm.index_ms']:.0f} ms from a cold page cache, "
        f"{med['vm.index_kib']:.0f} KiB"
        + (f"; the daemon's peak RSS {rss / 1024:.1f} MiB." if rss else ".")
    )
    out("")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--size", default="?")
    p.add_argument("--reps", default="?")
    p.add_argument("--runtime", default="?")
    p.add_argument("--rss-seconds", default="?")
    p.add_argument("--qcowmount", default="0")
    report(p.parse_args())


if __name__ == "__main__":
    main()
