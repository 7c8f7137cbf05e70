"""The results file (markdown), its chart (PNG) and the raw figures (JSON)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT
from benchmarks.scenarios import DELAY_TARGET_MS, Section

LIBRARIES = ("fastapi", "starlette", "uvicorn", "websockets", "wsproto", "uvloop", "httptools", "anyio", "orjson",
             "pydantic", "psutil", "matplotlib")


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    import psutil

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libraries": versions,
        "commit": commit,
        "load_average": os.getloadavg(),
    }


def markdown(sections: list[Section], info: dict[str, Any], meta: dict[str, Any], chart_name: str | None) -> str:
    lines = [
        f"# Benchmark results{' (smoke: checks the harness, not the numbers)' if meta['smoke'] else ''}",
        "",
        f"- Date: {info['date']}; commit {info['commit'] or 'unknown'}",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, {info['os']}",
        f"- Python {info['python']}; " + ", ".join(f"{k} {v}" for k, v in info["libraries"].items()),
        f"- Pinning: {meta['pinning']}",
        f"- Load average before / after: {' '.join(f'{x:.2f}' for x in meta['load_before'])} / "
        f"{' '.join(f'{x:.2f}' for x in meta['load_after'])} (the machine may be shared: compare ratios, "
        "not absolute figures)",
        f"- Host CPU steal over the run: {meta.get('steal_pct', float('nan')):.1f}% of all CPUs' time (time the "
        "hypervisor gave other guests; rows where it passed a few percent say so)",
        f"- Command: `{meta['command']}`; took {meta['elapsed_s']:.0f} s",
        "",
    ]
    if chart_name:
        lines += [f"![benchmark chart]({chart_name})", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.rows:
            lines.append("| " + " | ".join(section.columns) + " |")
            lines.append("|" + "|".join("---" for _ in section.columns) + "|")
            lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in section.rows]
            lines.append("")
        lines += [*(f"{note}\n" for note in section.notes)]
    return "\n".join(lines).rstrip() + "\n"


def chart(sections: list[Section], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {s.key: s for s in sections}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    groups = [k for k in ("s1", "s2") if k in by_key and by_key[k].data.get("measured")]
    if groups:
        names = [m["target"] for m in by_key[groups[0]].data["measured"]]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            values = [next((m["tokens_per_s"] for m in by_key[g].data["measured"] if m["target"] == name), 0)
                      for g in groups]
            ax.bar([x + i * width for x in range(len(groups))], values, width, label=name)
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(groups))],
                      ["1 stream" if g == "s1" else "many streams" for g in groups])
        ax.set_ylabel("tokens/s delivered")
        ax.set_title("Scenarios 1-2: throughput at full speed")
        ax.legend(fontsize=8)
    ax = axes[0][1]
    if "s3" in by_key and by_key["s3"].data.get("measured"):
        rows = by_key["s3"].data["measured"]
        for name in dict.fromkeys(m["target"] for m in rows):
            points = sorted((m["n"], m["delay_p99_ms"]) for m in rows if m["target"] == name)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.axhline(DELAY_TARGET_MS, color="grey", linestyle="--", linewidth=1, label=f"{DELAY_TARGET_MS:g} ms target")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent paced streams")
        ax.set_ylabel("p99 added delay per token (ms)")
        ax.set_title("Scenario 3: realistic load")
        ax.legend(fontsize=8)
    ax = axes[1][0]
    if "s4" in by_key and by_key["s4"].data.get("measured"):
        for name, steps in by_key["s4"].data["measured"].items():
            ax.plot([s["target"] for s in steps], [s["kb_per_conn"] for s in steps], marker="o", label=name)
        ax.set_xlabel("idle connections held")
        ax.set_ylabel("RSS per connection (KB)")
        ax.set_title("Scenario 4: idle connections")
        ax.legend(fontsize=8)
    ax = axes[1][1]
    if "variants" in by_key and by_key["variants"].data.get("measured"):
        results = by_key["variants"].data["measured"]
        names = list(results)
        ax.barh(range(len(names)), [results[n]["s2"]["tokens_per_s"] for n in names])
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("tokens/s, scenario 2")
        ax.set_title("Hot path: WebSocket implementation, loop, parser")
    elif "s5" in by_key and by_key["s5"].data.get("rss"):
        points = by_key["s5"].data["rss"]
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.axvline(0, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("s since the slow clients' buffers filled")
        ax.set_ylabel("gateway RSS (MB)")
        ax.set_title("Scenario 5: RSS with never-reading clients")
    for row in axes:
        for a in row:
            if not a.has_data():
                a.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(out: Path, sections: list[Section], info: dict[str, Any], meta: dict[str, Any]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    png = out / "bench.png"
    md = out / "bench.md"
    raw = out / "bench.json"
    chart(sections, png)
    md.write_text(markdown(sections, info, meta, png.name), encoding="utf-8")
    raw.write_text(
        json.dumps({"machine": info, "meta": meta, "sections": [
            {"key": s.key, "title": s.title, "columns": s.columns, "rows": s.rows, "notes": s.notes, "data": s.data}
            for s in sections]}, indent=1, default=str),
        encoding="utf-8",
    )
    return [md, png, raw]
