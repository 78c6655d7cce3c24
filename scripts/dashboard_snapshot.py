#!/usr/bin/env python3
"""Draws the Grafana dashboard (helm/arbiter/files/dashboard.json) as a PNG
from a running Prometheus: each panel's queries over the last minutes, laid
out as the dashboard lays them out. Grafana itself is not needed (nor
reachable here); this is the dashboard's data, not Grafana's drawing of it.

    python3 scripts/dashboard_snapshot.py --prometheus http://127.0.0.1:9090 \\
        --job arbiter --minutes 5 --out docs/dashboard.png

Needs matplotlib (`pip install matplotlib`); by hand only, not in the tests."""

import argparse
import json
import math
import pathlib
import re
import time
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "helm" / "arbiter" / "files" / "dashboard.json"


def query_range(prometheus, expr, start, end, step):
    url = f"{prometheus}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(url, timeout=30) as r:
        answer = json.load(r)
    if answer["status"] != "success":
        raise RuntimeError(f"{expr}: {answer}")
    return answer["data"]["result"]


def legend(fmt, labels):
    return re.sub(r"\{\{(\w+)\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or "value"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--rate-interval", default="15s")
    ap.add_argument("--out", default="dashboard.png")
    args = ap.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = json.loads(DASHBOARD.read_text())
    end = time.time()
    start = end - 60 * args.minutes
    step = max(1, int(60 * args.minutes / 150))
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
    unit_h = 0.42
    fig = plt.figure(figsize=(24, rows * unit_h), facecolor="#111217")
    fig.suptitle(f"{board['title']}  (job {args.job}, last {args.minutes:g} min; drawn from the "
                 "dashboard's queries by scripts/dashboard_snapshot.py, not by Grafana)",
                 color="#d8d9da", x=0.01, ha="left", fontsize=13)
    for panel in board["panels"]:
        g = panel["gridPos"]
        left, width = g["x"] / 24, g["w"] / 24
        bottom = 1 - (g["y"] + g["h"]) / rows
        height = g["h"] / rows
        if panel["type"] == "row":
            fig.text(left + 0.005, bottom + height * 0.2, panel["title"], color="#d8d9da",
                     fontsize=12, weight="bold")
            continue
        ax = fig.add_axes([left + 0.012, bottom + 0.012, width - 0.02, height - 0.035], facecolor="#181b1f")
        ax.set_title(panel["title"], color="#d8d9da", fontsize=9, loc="left")
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        lines = 0
        for target in panel["targets"]:
            expr = (target["expr"].replace("$job", args.job).replace('instance=~"$instance"', 'instance=~".*"')
                    .replace("$__rate_interval", args.rate_interval))
            for series in query_range(args.prometheus, expr, start, end, step):
                points = [(float(t) - end, float(v)) for t, v in series["values"]
                          if not math.isnan(float(v)) and not math.isinf(float(v))]
                if not points:
                    continue
                xs, ys = zip(*points)
                ax.plot([x / 60 for x in xs], ys, linewidth=1.2,
                        label=legend(target["legendFormat"], series["metric"]))
                lines += 1
        if lines:
            ax.legend(fontsize=6, loc="upper left", facecolor="#181b1f", edgecolor="#2c3235",
                      labelcolor="#d8d9da", ncol=2 if lines > 4 else 1)
        else:
            ax.text(0.5, 0.5, "no data", color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlim(-args.minutes, 0)
        ax.grid(color="#2c3235", linewidth=0.5)
    fig.savefig(args.out, dpi=60, facecolor=fig.get_facecolor())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
