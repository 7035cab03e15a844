"""Peak memory of one ``optimize.py`` run, against the size of the model it was given.

    python scripts/bench_memory.py MODEL.onnx [--max-ratio 3] [-- OPTIMIZE OPTIONS ...]

The run is a child process (``optimize.py MODEL -o TMP/out.onnx OPTIONS``) and its peak
resident set (``VmHWM``, the kernel's high-water mark of the child's resident pages, weights
memory-mapped or copied alike, read by the child as it exits) is divided by the
model's size on disk (the ``.onnx`` file plus the external-data files it names). The child's
Python, numpy and ONNX Runtime libraries are part of the figure: that is what a user's
machine must hold. Exit status: the child's when it fails, 1 when ``--max-ratio`` is
exceeded, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.load import referenced_data_files
from pipeline.runtime import machine
from pipeline.runtime.atomic_write import write_text_atomic
from pipeline.runtime.errors import UserError

# The child writes its own /proc status when it exits: VmHWM is the high-water mark of its
# address space alone. (``ru_maxrss`` from wait4 would not do: Linux carries the parent's
# peak across fork and exec, so a big parent would be counted in the child's figure.)
_CHILD = (
    "import atexit, os, sys, shutil\n"
    "atexit.register(shutil.copyfile, '/proc/self/status', os.environ['OVO_BENCH_STATUS'])\n"
    "from pipeline.cli import main\n"
    "sys.argv[0] = 'optimize.py'\n"
    "main()\n"
)


def model_bytes(path: Path) -> int:
    """The model file plus the external-data files it refers to."""
    names = referenced_data_files(path)
    return path.stat().st_size + sum((path.parent / n).stat().st_size for n in names)


def measure(model: Path, options: list[str], folder: Path) -> dict:
    """Run ``optimize.py`` on ``model`` in a child process; its peak RSS and exit status."""
    command = [sys.executable, "-c", _CHILD, str(model), "-o", str(folder / "out.onnx")]
    status = folder / "child-status.txt"
    started = time.perf_counter()
    child = subprocess.run(
        [*command, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OVO_BENCH_STATUS": str(status)},
    )
    size = model_bytes(model)
    peak = _status_kib(status.read_text(), "VmHWM") * 1024
    return {
        "model": str(model),
        "model_bytes": size,
        "options": options,
        "exit_code": child.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_bytes": peak,
        "ratio": round(peak / size, 3),
        "output_tail": child.stdout.decode(errors="replace")[-2000:],
    }


def _status_kib(status: str, field: str) -> int:
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"no {field} in /proc status")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--max-ratio", type=float, help="fail (exit 1) above this peak/size")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.epilog = "Options for optimize.py go after a lone --."
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, options = parser.parse_args(argv[:split]), argv[split + 1 :]
    if not args.model.is_file():
        raise SystemExit(f"error: model not found: {args.model}")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=args.model.parent) as tmp:
            result = measure(args.model, options, Path(tmp))
    except (OSError, UserError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    result["cpu"] = machine.cpu().model
    print(
        f"{args.model.name}: {result['model_bytes'] / 1e6:.1f} MB on disk, optimize "
        f"{' '.join(options) or '(default options)'}: exit {result['exit_code']}, "
        f"{result['seconds']} s, peak RSS {result['peak_rss_bytes'] / 1e6:.1f} MB = "
        f"{result['ratio']:.2f}x the model"
    )
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    if result["exit_code"] != 0:
        print(result["output_tail"], file=sys.stderr)
        return result["exit_code"]
    if args.max_ratio is not None and result["ratio"] > args.max_ratio:
        print(f"peak RSS above {args.max_ratio}x the model", file=sys.stderr)
        return 1
    return 0
