#!/usr/bin/env python3
"""Bar chart of the cold-start results: bench/results/startup.md -> startup.png.

    python3 bench/chart.py bench/results/startup.md bench/results/startup.png

Reads the Markdown tables bench/startup.sh writes (one `## workload: ...`
section per workload, one row per method with `median [min-max]` cells, and
`Lower bound: N s` and `Lower bound (pages touched): N s` lines where they
were measured) and draws, per workload, the median total time of each
method with its min-max range, the runs on optimized images (workload
NAME-opt) beside NAME's, and the lower bounds as a black line (whole files)
and a dashed one (touched pages) across the group; on a log scale (a warm start takes 0.1 s,
reading the whole image a minute). The machine, link and kernel lines of the
report go in the caption. Needs matplotlib (Debian: python3-matplotlib;
bench/startup.sh installs it).
"""
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (method, on optimized images, label, color)
BARS = [("overlayfs", False, "full pull (overlayfs)", "#9e9e9e"),
        ("go-stargz", False, "Go Stargz Snapshotter", "#4c78a8"),
        ("go-stargz", True, "Go Stargz, optimized image", "#9ecae9"),
        ("stargaze", False, "stargaze", "#f58518"),
        ("stargaze", True, "stargaze, optimized image", "#ffbf79"),
        ("stargaze-trace", False, "stargaze, learned trace", "#e45756")]
METHODS = {m for m, _, _, _ in BARS}
CELL = re.compile(r"([0-9.]+)\s*\[([0-9.]+)-([0-9.]+)\]")
BOUND = re.compile(r"^Lower bound: ([0-9.]+) s")
TOUCHED = re.compile(r"^Lower bound \(pages touched\): ([0-9.]+) s")


def parse(path):
    """{workload: ({method: (median, min, max)}, [bound, touched bound])}
    in the report's order (None where not measured), and the header lines."""
    workloads, header, current = {}, [], None
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        if line.startswith("## "):
            name = line[3:].split(":")[0].strip()
            current = None if name == "Summary" else workloads.setdefault(name, ({}, [None, None]))
        elif not workloads and line.startswith(("Link:", "Machine:")):
            header.append(line)
        elif current is not None and line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            m = CELL.match(cells[1]) if len(cells) > 1 and cells[0] in METHODS else None
            if m:
                current[0][cells[0]] = tuple(float(x) for x in m.groups())
        elif current is not None and (m := BOUND.match(line)):
            current[1][0] = float(m.group(1))
        elif current is not None and (m := TOUCHED.match(line)):
            current[1][1] = float(m.group(1))
    return workloads, header


def groups(workloads):
    """[(name, {(method, optimized): cell}, [bound, touched bound])]:
    NAME-opt joins NAME."""
    out = {}
    for name, (rows, bound) in workloads.items():
        base, opt = (name[:-4], True) if name.split("@")[0].endswith("-opt") else (name, False)
        bars, b = out.setdefault(base, ({}, [None, None]))
        for method, cell in rows.items():
            bars[(method, opt)] = cell
        b[0], b[1] = b[0] or bound[0], b[1] or bound[1]
    return [(name, bars, b) for name, (bars, b) in out.items() if bars]


def main():
    src, dst = sys.argv[1], sys.argv[2]
    workloads, header = parse(src)
    gs = groups(workloads)
    if not gs:
        sys.exit(f"chart: no result tables in {src}")
    fig, ax = plt.subplots(figsize=(max(10, 1.3 * len(gs)), 6), dpi=110)
    width = 0.14
    for i, (method, opt, label, color) in enumerate(BARS):
        xs, med, lo, hi = [], [], [], []
        for j, (_, bars, _) in enumerate(gs):
            if (method, opt) in bars:
                m, a, b = bars[(method, opt)]
                xs.append(j + (i - (len(BARS) - 1) / 2) * width)
                med.append(m)
                lo.append(m - a)
                hi.append(b - m)
        if not xs:
            continue
        bars = ax.bar(xs, med, width, label=label, color=color, yerr=[lo, hi], capsize=2)
        for bar, v in zip(bars, med):
            ax.annotate(f"{v:.2f}" if v < 10 else f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v),
                        xytext=(0, 3), textcoords="offset points", ha="center", fontsize=6, rotation=90)
    labels = ["lower bound (whole files read)", "lower bound (pages touched)"]
    for j, (_, _, bounds) in enumerate(gs):
        for k, (bound, style) in enumerate(zip(bounds, ("solid", "dashed"))):
            if bound:
                ax.hlines(bound, j - len(BARS) / 2 * width, j + len(BARS) / 2 * width, colors="black", linestyles=style,
                          linewidth=1.5, label=labels[k])
                labels[k] = None
    ax.set_yscale("log")
    ax.set_ylabel("seconds to the container's exit (median, min-max), log scale")
    ax.set_xticks(range(len(gs)))
    ax.set_xticklabels([g[0] for g in gs], rotation=20)
    ax.set_title("Cold start: full pull vs Go Stargz Snapshotter vs stargaze (lower is better)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.text(0.01, 0.01, "\n".join(header) + "\nbench/startup.sh (make bench)", fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(dst)
    print(f"chart: wrote {dst}")


if __name__ == "__main__":
    main()
