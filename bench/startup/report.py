#!/usr/bin/env python3
"""The cold-start report of bench/startup.sh, in Markdown on stdout.

Usage: report.py RESULTS_TSV WORK RATE RTT_MS ROUNDS

RESULTS_TSV has one row per round: workload label, method, total, pull and
run seconds, registry requests and bytes, peak RSS (KiB), the output's last
line; method `local` rows are the overlayfs node's second run of the same
command (the lower bound's local run). WORK holds what startup.sh measured
beside it: images.tsv, workloads.tsv, needed-WL.txt (bench/needed.py),
convert-times.tsv and convert-times-go.tsv.

The report: a summary table (one row per workload, medians side by side
with the lower bound and the ratios), then per workload a table of every
method with median [min-max] cells (bench/chart.py reads these), the ratios
and the lower bound: the needed compressed bytes and the layers' TOCs at the
link's rate, + 4 round trips (manifest, config, the TOCs in parallel, the
data in parallel), + the command's local run time.
"""
import os
import platform
import re
import statistics
import subprocess
import sys

METHODS = ["overlayfs", "go-stargz", "stargaze"]
TRIPS = 4


def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "?"


def table(path):
    if not os.path.exists(path):
        return []
    return [line.rstrip("\n").split("\t") for line in open(path) if line.strip()]


def main():
    results, work, rate, rtt, rounds = sys.argv[1:6]
    rtt = float(rtt)
    rows = table(results)
    what = {r[0]: r[2] for r in table(os.path.join(work, "workloads.tsv"))}
    m = re.match(r"([0-9.]+)\s*([kmg]?)bit", rate.lower())
    bps = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] if m else 100e6

    def cells(wl, method, col):
        return [float(r[col]) for r in rows if r[0] == wl and r[1] == method]

    def med(wl, method, col=2):
        v = cells(wl, method, col)
        return statistics.median(v) if v else None

    def base(wl):
        return wl.split("@")[0].removesuffix("-opt")

    def bound(wl):
        """(seconds, needed bytes, needed dict) for a shaped workload with a
        measured lower bound, else None."""
        if "@" in wl:
            return None
        path = os.path.join(work, f"needed-{base(wl)}.txt")
        if not os.path.exists(path):
            return None
        needed = dict(line.split() for line in open(path) if line.strip())
        comp = int(needed["compressed_bytes"]) + int(needed.get("toc_bytes", 0))
        local = med(base(wl), "local", 4)
        if local is None and base(wl) == "hello":
            local = med("warm", "overlayfs", 4)
        if local is None:
            local = med(base(wl), "overlayfs", 4)
        if local is None:
            return None  # no overlayfs column (METHODS): no local run time
        return comp * 8 / bps + TRIPS * rtt / 1000 + local, comp, needed, local

    print("# Cold start: full pull vs Go Stargz Snapshotter vs stargaze\n")
    print(f"`make bench` (bench/startup.sh), {rounds} cold rounds per cell, median [min-max].")
    print(f"Link: registry in a network namespace, tc tbf {rate} both ways, +{rtt:g} ms RTT (NFQUEUE delayer).")
    print(f"Machine: {os.cpu_count()} CPUs, kernel {platform.release()}; {version(['containerd', '--version'])}.")
    print("Images (Debian bookworm, built offline from Debian packages; every workload's command is given at `ctr run`):\n")
    for name, desc in table(os.path.join(work, "images.tsv")):
        print(f"- `{name}`: {desc}")
    print()

    workloads = []
    for r in rows:
        if r[0] not in workloads:
            workloads.append(r[0])

    # ---- summary
    shaped = [w for w in workloads if "@" not in w and not w.endswith("-opt")]
    if shaped:
        print("## Summary: median total seconds per workload and method\n")
        print("`-opt`: the same command on images with its files first behind a prefetch landmark "
              "(ctr-remote --estargz-record-in for Go, stargaze convert --prioritized-files, one list). "
              "Bytes: from the registry, pull start to the workload's exit.\n")
        print("| workload | full pull | Go Stargz | Go Stargz -opt | stargaze | stargaze -opt | lower bound "
              "| stargaze ÷ Go | stargaze ÷ bound | stargaze -opt ÷ bound | needed MB | stargaze MB ÷ needed |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for wl in shaped:
            def fmt(v, f="{:.2f}"):
                return f.format(v) if v is not None else ""
            opt = wl + "-opt"
            b = bound(wl)
            sg, go, sgo = med(wl, "stargaze"), med(wl, "go-stargz"), med(opt, "stargaze")
            ratio = lambda a, c: f"{a / c:.2f}×" if a is not None and c else ""
            fetched = med(wl, "stargaze", 6)
            print(f"| {wl} | {fmt(med(wl, 'overlayfs'))} | {fmt(go)} | {fmt(med(opt, 'go-stargz'))} | {fmt(sg)} "
                  f"| {fmt(sgo)} | {fmt(b[0] if b else None)} | {ratio(sg, go)} | {ratio(sg, b[0] if b else None)} "
                  f"| {ratio(sgo, b[0] if b else None)} | {fmt(b[1] / 1e6 if b else None)} "
                  f"| {ratio(fetched, b[1] if b else None)} |")
        print()

    # ---- one section per workload
    for wl in workloads:
        link = ", unshaped link (no tbf, no added delay), 1 round" if "@" in wl else ""
        print(f"## {wl}: {what.get(wl.split('@')[0], wl)}{link}\n")
        print("| method | total s | pull s | run s | registry requests | MB from registry | peak RSS of snapshotter processes MB | output |")
        print("|---|---|---|---|---|---|---|---|")
        for method in METHODS:
            rs = [r for r in rows if r[0] == wl and r[1] == method]
            if not rs:
                continue

            def cell(i, scale=1.0, f="{:.2f}"):
                v = [float(r[i]) / scale for r in rs]
                return f.format(statistics.median(v)) + " [" + f.format(min(v)) + "-" + f.format(max(v)) + "]"
            print(f"| {method} | {cell(2)} | {cell(3)} | {cell(4)} | {cell(5, f='{:.0f}')} | {cell(6, 1e6, '{:.1f}')} "
                  f"| {cell(7, 1024, '{:.0f}')} | {rs[-1][8]} |")
        sg = med(wl, "stargaze")
        if sg is not None:
            ratios = [f"{sg / med(wl, m):.2f}x {m}" for m in ("overlayfs", "go-stargz") if med(wl, m)]
            if ratios:
                print(f"\nstargaze total time = {', '.join(ratios)} (median vs median; lower is better).")
        b = bound(wl)
        if b and sg is not None:
            seconds, comp, needed, local = b
            go_fetched = med(wl, "go-stargz", 6)
            go_bytes = f" (Go Stargz: {go_fetched / comp:.2f}x)" if go_fetched is not None else ""
            print(f"\nLower bound: {seconds:.2f} s = {comp / 1e6:.2f} MB needed (the compressed chunks of the "
                  f"{needed['files']} files the workload reads, {int(needed['bytes']) / 1e6:.2f} MB uncompressed, "
                  f"and the layers' TOCs) at {rate}, + {TRIPS} round trips of {rtt:g} ms, + {local:.2f} s local run "
                  f"(overlayfs, image on disk). stargaze = {sg / seconds:.2f}x the bound; it read "
                  f"{med(wl, 'stargaze', 6) / comp:.2f}x the needed bytes{go_bytes}.")
        print()

    times = table(os.path.join(work, "convert-times.tsv")) + table(os.path.join(work, "convert-times-go.tsv"))
    if times:
        print("Conversion of the images: " + "; ".join(f"{img}: {tool} {float(s):.1f} s" for img, tool, s in times) + ".")


if __name__ == "__main__":
    main()
