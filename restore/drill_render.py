"""Drill reports for people: Markdown, and a self-contained HTML page with an RTO/RPO chart.

Pure functions over the JSON report dicts (the current drill plus past ones from the
repository); no I/O but the caller's file writes.
"""
from __future__ import annotations

import html
from typing import Any


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# statevault DR drill {report['id']}", "",
             f"- started: {report['started_at']}", f"- finished: {report.get('finished_at')}",
             f"- result: **{report['status'].upper()}**",
             f"- total RTO: {_fmt_seconds(report.get('rto_seconds'))}; worst RPO: {_fmt_seconds(report.get('rpo_seconds'))}",
             "", "| source | kind | snapshot | result | RTO | RPO | records | scratch cleaned | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in report["sources"]:
        lines.append(f"| {s['source']} | {s['kind']} | {s.get('snapshot_id') or '-'} | {s['status']} | "
                     f"{_fmt_seconds(s.get('rto_seconds'))} | {_fmt_seconds(s.get('rpo_seconds'))} | "
                     f"{s.get('records', 0):,} | {'yes' if s.get('cleaned_up') else 'no'} | {s.get('error') or ''} |")
    for s in report["sources"]:
        bad = [c for c in s.get("checks", []) if not c.get("ok", True)]
        if bad:
            lines += ["", f"## {s['source']}: items that did not verify", ""]
            for c in bad:
                lines.append(f"- `{c['item']}`: expected {c['expected']['records']} records, "
                             f"found {c['actual']['records']}; diff {c.get('diff', {}).get('counts', {})}")
        oc = s.get("offline_check")
        if oc:
            lines += ["", f"Offline index ({s['source']}): {oc['queries']} sampled queries, "
                          f"{len(oc['mismatches'])} mismatches (compared up to ties)."]
            for mm in oc["mismatches"]:
                if "offline" in mm:  # reports before the (id, score) lists had only where
                    lines.append(f"- `{mm['collection']}` vector `{mm['vector'] or '(unnamed)'}`, row {mm['row']}: "
                                 f"offline {_ids(mm['offline'])}, Qdrant {_ids(mm['qdrant'])}")
    return "\n".join(lines) + "\n"


def _ids(hits: list) -> str:
    return "[" + ", ".join(f"{pid} ({score:g})" for pid, score in hits) + "]"


def _chart(history: list[dict[str, Any]], width: int = 640, height: int = 200) -> str:
    """An inline SVG of total RTO and worst RPO per drill (two polylines, log-free, scaled to max)."""
    pts = [(r.get("rto_seconds") or 0.0, r.get("rpo_seconds") or 0.0, r.get("ok")) for r in history[-30:]]
    if not pts:
        return "<p>No drills yet.</p>"
    pad = 30
    top = max(max(p[0] for p in pts), max(p[1] for p in pts), 1e-9)
    step = (width - 2 * pad) / max(len(pts) - 1, 1)

    def y(v: float) -> float:
        return height - pad - (v / top) * (height - 2 * pad)

    rto = " ".join(f"{pad + i * step:.1f},{y(p[0]):.1f}" for i, p in enumerate(pts))
    rpo = " ".join(f"{pad + i * step:.1f},{y(p[1]):.1f}" for i, p in enumerate(pts))
    dots = "".join(f'<circle cx="{pad + i * step:.1f}" cy="{y(p[0]):.1f}" r="4" fill="{"#2a2" if p[2] else "#d22"}"/>'
                   for i, p in enumerate(pts))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="RTO and RPO over the last {len(pts)} drills">'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>'
            f'<polyline fill="none" stroke="#36c" stroke-width="2" points="{rto}"/>'
            f'<polyline fill="none" stroke="#c63" stroke-width="2" stroke-dasharray="5,3" points="{rpo}"/>{dots}'
            f'<text x="{pad}" y="16" font-size="12" fill="#36c">RTO (max {_fmt_seconds(max(p[0] for p in pts))})</text>'
            f'<text x="{width / 2}" y="16" font-size="12" fill="#c63">RPO (max {_fmt_seconds(max(p[1] for p in pts))})</text>'
            f'</svg>')


def to_html(report: dict[str, Any], history: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr class='{'ok' if s['ok'] else 'bad'}'><td>{html.escape(s['source'])}</td><td>{s['kind']}</td>"
        f"<td>{html.escape(s.get('snapshot_id') or '-')}</td><td>{s['status']}</td>"
        f"<td>{_fmt_seconds(s.get('rto_seconds'))}</td><td>{_fmt_seconds(s.get('rpo_seconds'))}</td>"
        f"<td>{s.get('records', 0):,}</td><td>{html.escape(s.get('error') or '')}</td></tr>"
        for s in report["sources"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>statevault drill {html.escape(report['id'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}tr.ok td:nth-child(4){{color:#181}}
tr.bad td:nth-child(4){{color:#b11;font-weight:bold}}</style></head><body>
<h1>DR drill {html.escape(report['id'])}: {report['status'].upper()}</h1>
<p>Started {html.escape(report['started_at'])}; total RTO {_fmt_seconds(report.get('rto_seconds'))},
worst RPO {_fmt_seconds(report.get('rpo_seconds'))}.</p>
<table><tr><th>source</th><th>kind</th><th>snapshot</th><th>result</th><th>RTO</th><th>RPO</th><th>records</th><th>error</th></tr>
{rows}</table>
<h2>RTO and RPO over past drills</h2>
{_chart(history)}
</body></html>
"""
