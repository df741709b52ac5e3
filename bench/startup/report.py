#!/usr/bin/env python3
"""The cold-start report of bench/startup.sh, in Markdown on stdout.

Usage: report.py RESULTS_TSV WORK RATE RTT_MS ROUNDS

RESULTS_TSV has one row per round: workload label, method, total, pull and
run seconds, registry requests and bytes, peak RSS (KiB), the output's last
line; method `local` rows are the overlayfs node's second run of the same
command (the lower bound's local run). WORK holds what startup.sh measured
beside it: images.tsv, workloads.tsv, needed-WL.txt (bench/needed.py),
convert-times.tsv, convert-times-go.tsv and runtime.txt.

The report: a summary table (one row per workload, medians side by side
with the lower bound and the ratios), then per workload a table of every
method with median [min-max] cells (bench/chart.py reads these), the ratios
and the lower bound: the needed compressed bytes and the layers' TOCs at the
link's rate, + 4 round trips (manifest, config, the TOCs in parallel, the
data in parallel), + the command's local run time. Where needed-WL.txt has
the pages the workload touched (bench/pagecache.py), a second bound counts
only the chunks that hold them: for programs that map large files and touch
a few pages (a JVM), whole files overstate what a lazy pull must fetch.
"""
import os
import platform
import re
import statistics
import subprocess
import sys

METHODS = ["overlayfs", "go-stargz", "stargaze", "stargaze-trace", "stargaze-b"]
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

    purpose_rows = table(os.path.join(work, "purposes.tsv"))

    def purposes(wl, method):
        """Median MB per purpose over the rounds, largest first."""
        by = {}
        for r in purpose_rows:
            if r[0] == wl and r[1] == method:
                by.setdefault(r[2], []).append(float(r[3]) / 1e6)
        cells = sorted(((statistics.median(v), p) for p, v in by.items()), reverse=True)
        return ", ".join(f"{p} {mb:.1f}" for mb, p in cells if mb >= 0.05)

    def med(wl, method, col=2):
        v = cells(wl, method, col)
        return statistics.median(v) if v else None

    def base(wl):
        return wl.split("@")[0].removesuffix("-opt")

    def bound(wl):
        """{"s", "bytes", "local", "needed", and "touched_s", "touched_bytes"
        when measured} for a shaped workload with a measured lower bound."""
        if "@" in wl:
            return None
        path = os.path.join(work, f"needed-{base(wl)}.txt")
        if not os.path.exists(path):
            return None
        needed = dict(line.split() for line in open(path) if line.strip())
        toc = int(needed.get("toc_bytes", 0))
        comp = int(needed["compressed_bytes"]) + toc
        local = med(base(wl), "local", 4)
        if local is None and base(wl) == "hello":
            local = med("warm", "overlayfs", 4)
        if local is None:
            local = med(base(wl), "overlayfs", 4)
        if local is None:
            return None  # no overlayfs column (METHODS): no local run time
        at_link = lambda n: n * 8 / bps + TRIPS * rtt / 1000 + local
        b = {"s": at_link(comp), "bytes": comp, "local": local, "needed": needed}
        if "touched_compressed_bytes" in needed:
            b["touched_bytes"] = int(needed["touched_compressed_bytes"]) + toc
            b["touched_s"] = at_link(b["touched_bytes"])
        return b

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
              "`stargaze trace`: a second cold pull of the plain image with the access trace learned in the "
              "stargaze round before it (cache emptied but for its traces). "
              "Bytes: from the registry, pull start to the workload's exit.\n")
        print("| workload | full pull | Go Stargz | Go Stargz -opt | stargaze | stargaze -opt | stargaze trace | lower bound "
              "| stargaze ÷ Go | stargaze ÷ bound | stargaze -opt ÷ bound | stargaze trace ÷ bound | needed MB | stargaze MB ÷ needed "
              "| bound, touched pages | stargaze ÷ it |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for wl in shaped:
            def fmt(v, f="{:.2f}"):
                return f.format(v) if v is not None else ""

            def ratio(a, c):
                return f"{a / c:.2f}×" if a is not None and c else ""
            opt = wl + "-opt"
            b = bound(wl) or {}
            sg, go, sgo = med(wl, "stargaze"), med(wl, "go-stargz"), med(opt, "stargaze")
            sgt = med(wl, "stargaze-trace")
            fetched = med(wl, "stargaze", 6)
            needed_mb = b["bytes"] / 1e6 if b else None
            print(f"| {wl} | {fmt(med(wl, 'overlayfs'))} | {fmt(go)} | {fmt(med(opt, 'go-stargz'))} | {fmt(sg)} "
                  f"| {fmt(sgo)} | {fmt(sgt)} | {fmt(b.get('s'))} | {ratio(sg, go)} | {ratio(sg, b.get('s'))} "
                  f"| {ratio(sgo, b.get('s'))} | {ratio(sgt, b.get('s'))} | {fmt(needed_mb)} | {ratio(fetched, b.get('bytes'))} "
                  f"| {fmt(b.get('touched_s'))} | {ratio(sg, b.get('touched_s'))} |")
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
            needed, comp = b["needed"], b["bytes"]
            go_fetched = med(wl, "go-stargz", 6)
            go_bytes = f" (Go Stargz: {go_fetched / comp:.2f}x)" if go_fetched is not None else ""
            print(f"\nLower bound: {b['s']:.2f} s = {comp / 1e6:.2f} MB needed (the compressed chunks of the "
                  f"{needed['files']} files the workload reads, {int(needed['bytes']) / 1e6:.2f} MB uncompressed, "
                  f"and the layers' TOCs) at {rate}, + {TRIPS} round trips of {rtt:g} ms, + {b['local']:.2f} s local run "
                  f"(overlayfs, image on disk). stargaze = {sg / b['s']:.2f}x the bound; it read "
                  f"{med(wl, 'stargaze', 6) / comp:.2f}x the needed bytes{go_bytes}.")
            if "touched_s" in b:
                print(f"\nLower bound (pages touched): {b['touched_s']:.2f} s = {b['touched_bytes'] / 1e6:.2f} MB: only "
                      f"the chunks holding the {int(needed['touched_bytes']) / 1e6:.2f} MB of pages the workload read or "
                      f"mapped (with the kernel's readahead), and the TOCs. stargaze = {sg / b['touched_s']:.2f}x this bound; "
                      f"it read {med(wl, 'stargaze', 6) / b['touched_bytes']:.2f}x these bytes.")
        for method in ("stargaze", "stargaze-trace", "stargaze-b"):
            line = purposes(wl, method)
            if line:
                print(f"\n{method}'s registry bytes by what asked for them (the fetcher's "
                      f"`stargaze_fetcher_fetched_bytes_total`, median MB to the workload's exit): {line}.")
        print()

    runtime = os.path.join(work, "runtime.txt")
    if os.path.exists(runtime):
        print(f"This run took {open(runtime).read().strip()} (images cached; with the conversions and the strace "
              "measurements).\n")
    times = table(os.path.join(work, "convert-times.tsv")) + table(os.path.join(work, "convert-times-go.tsv"))
    if times:
        print("Conversion of the images: " + "; ".join(f"{img}: {tool} {float(s):.1f} s" for img, tool, s in times) + ".")


if __name__ == "__main__":
    main()
