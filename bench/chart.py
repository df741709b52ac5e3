#!/usr/bin/env python3
"""Bar chart of the cold-start results: bench/results/startup.md -> startup.png.

    python3 bench/chart.py bench/results/startup.md bench/results/startup.png

Reads the Markdown tables bench/startup.sh writes (one `## workload: ...`
section per workload, one row per method with `median [min-max]` cells) and
draws, per workload, the median total time of each method with its min-max
range, on a log scale (a warm start takes 0.1 s, reading the whole image a
minute). The machine, link and kernel lines of the report go in the caption.
Needs matplotlib (Debian: python3-matplotlib; bench/startup.sh installs it).
"""
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = [("overlayfs", "full pull (overlayfs)", "#9e9e9e"),
           ("go-stargz", "Go Stargz Snapshotter", "#4c78a8"),
           ("stargaze", "stargaze", "#f58518")]
CELL = re.compile(r"([0-9.]+)\s*\[([0-9.]+)-([0-9.]+)\]")


def parse(path):
    """[(workload, {method: (median, min, max)})] and the header lines."""
    workloads, header, current = [], [], None
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        if line.startswith("## "):
            name = line[3:].split(":")[0].strip()
            current = (name, {})
            workloads.append(current)
        elif current is None and line.startswith(("Link:", "Machine:")):
            header.append(line)
        elif current is not None and line.startswith("| ") and not line.startswith(("| method", "|---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            m = CELL.match(cells[1]) if len(cells) > 1 else None
            if m:
                current[1][cells[0]] = tuple(float(x) for x in m.groups())
    return [w for w in workloads if w[1]], header


def main():
    src, dst = sys.argv[1], sys.argv[2]
    workloads, header = parse(src)
    if not workloads:
        sys.exit(f"chart: no result tables in {src}")
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    width = 0.26
    for i, (method, label, color) in enumerate(METHODS):
        xs, med, lo, hi = [], [], [], []
        for j, (_, rows) in enumerate(workloads):
            if method in rows:
                m, a, b = rows[method]
                xs.append(j + (i - 1) * width)
                med.append(m)
                lo.append(m - a)
                hi.append(b - m)
        bars = ax.bar(xs, med, width, label=label, color=color, yerr=[lo, hi], capsize=3)
        for bar, v in zip(bars, med):
            ax.annotate(f"{v:.2f}" if v < 10 else f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v),
                        xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds to the container's output (median, min-max), log scale")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([w[0] for w in workloads])
    ax.set_title("Cold start: full pull vs Go Stargz Snapshotter vs stargaze (lower is better)")
    ax.legend(loc="upper left")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.text(0.01, 0.01, "\n".join(header) + "\nbench/startup.sh (make bench)", fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(dst)
    print(f"chart: wrote {dst}")


if __name__ == "__main__":
    main()
