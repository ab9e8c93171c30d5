#!/usr/bin/env python3
"""Draws docs/plots/scale.svg from the CSV the scale test writes (target/scale/cost.csv).

    NODES=100,200,300,400,500 WINDOW=60 cargo test --release -p grinta-tests --test scale \
        -- --ignored --nocapture cost_per_node
    python3 docs/plots/scale_plot.py target/scale/cost.csv docs/plots/scale.svg

Two panels against the cluster size N: CPU per node per simulated second, and heap per node.
Python's standard library only; the SVG is written by hand.
"""

import csv
import sys

W, H, PAD = 360, 260, 50


def panel(x0, title, unit, points):
    """One line chart at horizontal offset x0: (N, value) points, axes from zero."""
    xmax = max(n for n, _ in points) * 1.1
    ymax = max(v for _, v in points) * 1.2 or 1.0
    sx = lambda n: x0 + PAD + (W - 2 * PAD) * n / xmax
    sy = lambda v: H - PAD - (H - 2 * PAD) * v / ymax
    out = [
        f'<text x="{x0 + W / 2}" y="20" text-anchor="middle" font-size="13">{title}</text>',
        f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(xmax)}" y2="{sy(0)}" stroke="black"/>',
        f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(0)}" y2="{sy(ymax)}" stroke="black"/>',
        f'<text x="{x0 + W / 2}" y="{H - 12}" text-anchor="middle" font-size="11">N (nodes)</text>',
        f'<text x="{x0 + 12}" y="{H / 2}" font-size="11" transform="rotate(-90 {x0 + 12} {H / 2})" text-anchor="middle">{unit}</text>',
    ]
    for i in range(5):
        v = ymax * i / 4
        out.append(f'<text x="{sx(0) - 4}" y="{sy(v) + 4}" text-anchor="end" font-size="9">{v:.0f}</text>')
    path = " ".join(f"{sx(n):.1f},{sy(v):.1f}" for n, v in points)
    out.append(f'<polyline points="{path}" fill="none" stroke="#1f6feb" stroke-width="2"/>')
    for n, v in points:
        out.append(f'<circle cx="{sx(n):.1f}" cy="{sy(v):.1f}" r="3" fill="#1f6feb"/>')
        out.append(f'<text x="{sx(n):.1f}" y="{sy(0) + 14}" text-anchor="middle" font-size="9">{n}</text>')
        out.append(f'<text x="{sx(n):.1f}" y="{sy(v) - 7:.1f}" text-anchor="middle" font-size="9">{v:.1f}</text>')
    return out


def main():
    source, target = sys.argv[1], sys.argv[2]
    rows = sorted(csv.DictReader(open(source)), key=lambda r: int(r["n"]))
    if not rows:
        sys.exit(f"{source}: no rows")
    cpu = [(int(r["n"]), float(r["cpu_us_per_node_s"])) for r in rows]
    heap = [(int(r["n"]), float(r["heap_mib_per_node"])) for r in rows]
    body = panel(0, "CPU per node per simulated second", "us", cpu)
    body += panel(W, "Heap per node", "MiB", heap)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H}" font-family="sans-serif">',
           f'<rect width="{2 * W}" height="{H}" fill="white"/>', *body, "</svg>"]
    open(target, "w").write("\n".join(svg) + "\n")
    print(f"wrote {target} from {len(rows)} sizes")


if __name__ == "__main__":
    main()
