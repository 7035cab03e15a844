#!/usr/bin/env python3
"""Build a model with more than 2 GB of external weights, optimize it, and measure peak memory.

The model is a chain of MatMul over ``[dim, dim]`` float32 weights (256 MiB each at the default
dim 8192), plus work for the passes: an Identity (remove_noops), one weight stored twice
(merge_duplicate_initializers) and a Transpose of a small constant (fold_constants). The
weights are written chunk by chunk into one external-data file and the ``.onnx`` file only
holds references, so no >2 GB protobuf (and no full weight array) ever exists here.

The pipeline then runs as a subprocess while its resident memory is sampled from
``/proc/<pid>/status``; the peak (VmHWM, also ``ru_maxrss`` after exit) is compared with the
weight bytes. Goal: peak RSS <= 1.5x the weights, output saved with external data.

    python scripts/huge_model.py [--dim 8192] [--layers 9] [--workdir artifacts/huge]
    python scripts/huge_model.py --dim 4096 --layers 9     # ~600 MB, for iterating
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
ALIGN = 65536  # external-data offsets aligned so ONNX Runtime can memory-map them
CHUNK_ROWS = 512


def _external(name: str, shape: list[int], location: str, offset: int, length: int):
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return tensor


def build(path: Path, dim: int, layers: int, seed: int = 0) -> int:
    """Write ``path`` and ``path.data``; returns the bytes of weight data referenced."""
    data_name = path.name + ".data"
    rng = np.random.default_rng(seed)
    scale = np.float32(1.0 / np.sqrt(dim))
    weight_bytes = dim * dim * 4
    duplicate_of = {layers // 2: 1} if layers > 2 else {}  # layer -> earlier layer it copies
    initializers, nodes = [], []
    offsets: dict[int, int] = {}
    with open(path.parent / data_name, "wb") as data:
        for layer in range(layers):
            offset = -(-data.tell() // ALIGN) * ALIGN
            data.write(b"\0" * (offset - data.tell()))
            offsets[layer] = offset
            if layer in duplicate_of:  # same bytes again, chunk-wise from the file itself
                data.flush()
                with open(path.parent / data_name, "rb") as source:
                    source.seek(offsets[duplicate_of[layer]])
                    for _ in range(0, weight_bytes, 1 << 25):
                        data.write(source.read(min(1 << 25, weight_bytes - (data.tell() - offset))))
            else:
                for _ in range(0, dim, CHUNK_ROWS):
                    rows = rng.standard_normal((CHUNK_ROWS, dim), dtype=np.float32) * scale
                    data.write(rows.tobytes())
            initializers.append(_external(f"W{layer}", [dim, dim], data_name, offset, weight_bytes))
    small = rng.standard_normal((dim, 1), dtype=np.float32)
    initializers.append(helper.make_tensor("bias_t", TensorProto.FLOAT, [dim, 1], small.ravel()))
    previous = "x"
    for layer in range(layers):
        out = f"h{layer}"
        nodes.append(helper.make_node("MatMul", [previous, f"W{layer}"], [out], name=f"mm{layer}"))
        previous = out
        if layer == 0:
            nodes.append(helper.make_node("Identity", [out], ["h0_id"], name="noop"))
            previous = "h0_id"
    nodes.append(helper.make_node("Transpose", ["bias_t"], ["bias"], perm=[1, 0], name="tr"))
    nodes.append(helper.make_node("Add", [previous, "bias"], ["y"], name="add"))
    graph = helper.make_graph(
        nodes,
        "huge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))  # references only: a few KB
    onnx.checker.check_model(str(path))
    return weight_bytes * layers


class PeakSampler(threading.Thread):
    """Samples a process's memory from /proc until it exits (kernel peak: VmHWM)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.hwm = self.max_anon = self.max_file = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

            def kib(key: str, fields: dict = fields) -> int:
                return int(fields.get(key, "0 kB").split()[0]) * 1024

            self.hwm = max(self.hwm, kib("VmHWM"))
            self.max_anon = max(self.max_anon, kib("RssAnon"))
            self.max_file = max(self.max_file, kib("RssFile"))
            time.sleep(self.interval)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--workdir", type=Path, default=ROOT / "artifacts" / "huge")
    parser.add_argument("--reuse", action="store_true", help="keep an existing big.onnx")
    parser.add_argument("extra", nargs="*", help="extra optimize.py arguments (after --)")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / "big.onnx"
    out = args.workdir / "out.onnx"
    report = args.workdir / "r.json"
    t0 = time.perf_counter()
    if args.reuse and model.exists():
        weight_bytes = args.dim * args.dim * 4 * args.layers
    else:
        weight_bytes = build(model, args.dim, args.layers)
    print(f"built {model} in {time.perf_counter() - t0:.1f} s; weights {_gb(weight_bytes)}")
    for stale in (out, out.with_name(out.name + ".data"), report):
        stale.unlink(missing_ok=True)

    command = [
        sys.executable,
        str(ROOT / "optimize.py"),
        str(model),
        "-o",
        str(out),
        "--report",
        str(report),
        "--no-speed-check",
        *args.extra,
    ]
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT)
    sampler = PeakSampler(child.pid)
    sampler.start()
    code = child.wait()
    sampler.stop.set()
    sampler.join()
    wall = time.perf_counter() - start
    peak = max(sampler.hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)

    print(f"weight bytes:        {weight_bytes} ({_gb(weight_bytes)})")
    print(f"peak RSS (VmHWM):    {peak} ({_gb(peak)})")
    print(f"  max RssAnon seen:  {_gb(sampler.max_anon)}  (heap: copies of weights)")
    print(f"  max RssFile seen:  {_gb(sampler.max_file)}  (memory-mapped files)")
    print(f"ratio peak/weights:  {peak / weight_bytes:.2f}  (goal <= 1.5)")
    print(f"wall time:           {wall:.1f} s")
    print(f"exit code:           {code}")
    for path in sorted(args.workdir.iterdir()):
        if path.name.startswith(("out", "r.json", ".")):
            print(f"  {path.name:24s} {os.path.getsize(path):>14d} bytes")
    return code


if __name__ == "__main__":
    sys.exit(main())
