#!/usr/bin/env python3
"""SVG of a planner run from `turbine sim --planner-log` CSVs: observed requests per
interval (load), each predictor's forecast, and the workers each provisioned, over time.
Usage: planner_plot.py KALMAN.csv CONSTANT.csv OUT.svg TITLE  (standard library only)."""
import csv
import sys

def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))

kal, con, out, title = read(sys.argv[1]), read(sys.argv[2]), sys.argv[3], sys.argv[4]
# Reactions (between intervals) carry no load: the load lines use the interval rows only.
def ticks(rows): return [r for r in rows if r.get("reaction", "0") != "1"]
W, H, L, R, T, B = 760, 360, 60, 60, 30, 40
t_max = max(float(r["t_s"]) for r in kal + con) or 1.0
load_max = max([float(r["observed_requests"]) for r in ticks(kal + con)] +
               [float(r["forecast_requests"] or 0) for r in ticks(kal + con)]) or 1.0
work_max = max(int(r["provisioned_workers"] or 0) for r in kal + con) or 1

def x(t): return L + (W - L - R) * t / t_max
def y_load(v): return H - B - (H - T - B) * v / load_max
def y_work(v): return H - B - (H - T - B) * v / work_max

def line(rows, key, fy, color, dash="", step=False):
    pts, prev = [], None
    for r in rows:
        if r[key] == "":
            continue
        t, v = float(r["t_s"]), float(r[key])
        if step and prev is not None:
            pts.append(f"{x(t):.1f},{fy(prev):.1f}")
        pts.append(f"{x(t):.1f},{fy(v):.1f}")
        prev = v
    d = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline fill="none" stroke="{color}" stroke-width="1.5"{d} points="{" ".join(pts)}"/>'

parts = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
    f'<rect width="{W}" height="{H}" fill="white"/>',
    f'<text x="{L}" y="18" font-size="13">{title}: load, forecast (requests per interval, left) and workers (right)</text>',
    f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/>',
    f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>',
    f'<line x1="{W-R}" y1="{T}" x2="{W-R}" y2="{H-B}" stroke="black"/>',
    f'<text x="{L-5}" y="{T+4}" text-anchor="end">{load_max:.0f}</text>',
    f'<text x="{L-5}" y="{H-B}" text-anchor="end">0</text>',
    f'<text x="{W-R+5}" y="{T+4}">{work_max}</text>',
    f'<text x="{W-R+5}" y="{H-B}">0</text>',
    f'<text x="{W-R}" y="{H-B+15}" text-anchor="end">{t_max:.0f} s</text>',
    line(ticks(kal), "observed_requests", y_load, "#888"),
    line(ticks(kal), "forecast_requests", y_load, "#1f77b4", "4 2"),
    line(ticks(con), "forecast_requests", y_load, "#ff7f0e", "4 2"),
    line(kal, "provisioned_workers", y_work, "#1f77b4", step=True),
    line(con, "provisioned_workers", y_work, "#ff7f0e", step=True),
]
legend = [("#888", "", "load"), ("#1f77b4", "4 2", "Kalman forecast"), ("#ff7f0e", "4 2", "constant forecast"),
          ("#1f77b4", "", "workers (Kalman)"), ("#ff7f0e", "", "workers (constant)")]
for i, (c, d, name) in enumerate(legend):
    lx = L + 10 + i * 135
    dd = f' stroke-dasharray="{d}"' if d else ""
    parts.append(f'<line x1="{lx}" y1="{H-12}" x2="{lx+20}" y2="{H-12}" stroke="{c}" stroke-width="2"{dd}/>')
    parts.append(f'<text x="{lx+24}" y="{H-8}">{name}</text>')
parts.append("</svg>")
with open(out, "w") as f:
    f.write("\n".join(parts))

# Forecast error on the ramps: intervals whose load rose over the one before, comparing the
# forecast made one interval earlier with what came.
def ramp_error(rows):
    rows, errs = ticks(rows), []
    for prev, cur in zip(rows, rows[1:]):
        if prev["forecast_requests"] == "":
            continue
        if float(cur["observed_requests"]) > float(prev["observed_requests"]):
            errs.append(abs(float(prev["forecast_requests"]) - float(cur["observed_requests"])))
    return sum(errs) / len(errs) if errs else float("nan")

print(f"ramp forecast error (mean |forecast - load| on rising intervals, requests/interval): "
      f"kalman {ramp_error(kal):.2f}, constant {ramp_error(con):.2f}")
