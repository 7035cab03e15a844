"""Peers side by side: every ONNX optimizer we compete with, on the same models and inputs.

    python scripts/bench_peers.py [--models A.onnx,B.onnx | A.onnx B.onnx] [--tools a,b]
        [--repeats 15] [--threads 1] [--timeout 900] [--json OUT.json] [--write]

For each model, each tool reads the same original file and writes its own output:

- ``onnxsim``: ``onnxsim.simplify`` on the loaded ModelProto.
- ``onnxslim``: ``onnxslim.slim(in, out)``.
- ``onnxscript``: ``onnxscript.optimizer.optimize_ir`` (constant folding, the rewriter's
  default rules, dead-code removal, CSE, initializer deduplication).
- ``ort-transformers``: ``onnxruntime.transformers.optimizer.optimize_model`` with the
  model type, head count and hidden size read from the model's Hugging Face config
  (transformers only: BERT, ViT, GPT-2 ...).
- ``optimum-o2``: Optimum's ``ORTOptimizer`` at ``AutoOptimizationConfig.O2()`` on a local
  folder holding the model and its ``config.json`` (``optimum-o3`` on request).
- ``optimum-int8``: Optimum's ``ORTQuantizer``, dynamic int8, the ``avx512_vnni`` config on
  CPUs that have VNNI, ``avx2`` otherwise (``arm64`` on ARM). A quantization row: judged by
  cosine similarity, not by max abs error.
- ``ours``: ``python optimize.py IN -o OUT --no-speed-check --report R.json --inputs SETS``.
- ``module:function``: any callable ``function(src: Path, dst: Path)`` that writes an
  optimized copy of ``src`` to ``dst`` (to try a tool of your own; the tests use it).

Each tool runs in its own subprocess with a timeout, so a crash, a hang or a memory blow-up
of one tool is recorded (verbatim: the exception's first line, or stderr's last meaningful
line) and the run goes on. The output of every tool that succeeded is then evaluated, also
in a subprocess: node count (all graphs), parity against the original on the same input
sets (ONNX Runtime with graph optimizations off for both, so ORT's own fusions do not hide
what the tool did), and latency against ONNX Runtime on the original (both at
``ORT_ENABLE_ALL``, interleaved A/B rounds, ``pipeline.runtime.timing.compare_latency``: the
median of per-round ratios and half their inter-quartile range as the noise).

The input sets are the zoo entry's own example inputs when the model is a zoo model (a
GPT-2 decoder's attention mask must span past + new tokens, which generic inputs cannot
know), else ``pipeline.runtime.inputs.generate_input_sets``. Every tool and the evaluation use those
same sets, saved as ``.npz`` in the work folder.

"seconds" is the tool's own time from reading the input file to writing the output, in
process, without interpreter start-up and imports; for ``ours`` it is the report's
``seconds.total`` (which includes our verification sessions; onnxsim and onnxslim verify
nothing by default).

With no models given, the zoo's full-size minilm, vit, gpt2, resnet and mobilenet from
``artifacts/zoo`` are used (exported with ``scripts/batch_export.py`` when missing).
``--write`` replaces the peers section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from pipeline.runtime import machine as machine_info
from pipeline.runtime.compare import Tolerance, compare_sets

ROOT = Path(__file__).resolve().parents[2]

logger = logging.getLogger("bench_peers")

SECTION = "bench_peers"
HEADING = "## Peers side by side (`scripts/bench_peers.py`)"
DEFAULT_MODELS = ("minilm", "vit", "gpt2", "resnet", "mobilenet")
DEFAULT_TOOLS = (
    "onnxsim",
    "onnxslim",
    "onnxscript",
    "ort-transformers",
    "optimum-o2",
    "optimum-int8",
    "ours",
)
QUANT_TOOLS = ("optimum-int8",)
# The zoo exports were validated on these (batch, sequence) shapes (models.export).
ZOO_SHAPES = ((2, 8), (3, 13))
SCHEMA_VERSION = "1.0"


# --------------------------------------------------------------------------------------
# what a model is: its inputs and (for transformers) its Hugging Face config


@dataclasses.dataclass
class ModelCase:
    """One model under test, prepared once and shared by every tool."""

    name: str
    path: Path
    folder: Path  # work folder of this model: inputs/, hf/, one folder per tool
    nodes: int
    inputs_dir: Path
    inputs_source: str  # "zoo example inputs" | "generated (pipeline.runtime.inputs)"
    hf_dir: Path | None  # folder holding config.json, when there is one
    hf: dict | None  # model_type, num_heads, hidden_size


def _zoo_config(name: str, tiny: bool) -> object | None:
    """The transformers config of a zoo model (None for the plain-torch CNNs)."""
    if name == "minilm":
        from transformers import AutoConfig

        from models import minilm

        return AutoConfig.from_pretrained(minilm.model_dir(), local_files_only=True)
    module = {"vit": "models.vit", "gpt2": "models.gpt2", "bert_base": "models.bert_base"}
    if name in module:
        config = getattr(importlib.import_module(module[name]), "config", None)
        return config(tiny) if config is not None else None
    return None


def _matches(model_specs: dict[str, tuple], feeds: dict[str, np.ndarray]) -> bool:
    if set(model_specs) != set(feeds):
        return False
    for name, shape in model_specs.items():
        array = feeds[name]
        if shape is None:
            continue
        if len(shape) != array.ndim:
            return False
        if any(isinstance(d, int) and d != s for d, s in zip(shape, array.shape, strict=True)):
            return False
    return True


def _zoo_inputs(name: str, model) -> tuple[list[dict[str, np.ndarray]], bool] | None:
    """The zoo entry's example inputs if ``name`` is a zoo model and they fit; (sets, tiny)."""
    from models.zoo import ZOO
    from pipeline.runtime.inputs import input_specs

    if name not in ZOO:
        return None
    specs = {s.name: s.shape for s in input_specs(model)}
    for tiny in (False, True):
        try:
            sets = [ZOO[name].example_inputs(tiny, b, s) for b, s in ZOO_SHAPES]
        except Exception as exc:  # noqa: BLE001 - a zoo entry that cannot build is just no match
            logger.info("zoo inputs of %s (tiny=%s) failed: %s", name, tiny, exc)
            continue
        if all(_matches(specs, feeds) for feeds in sets):
            return sets, tiny
    return None


def _hf_info(config: object) -> dict | None:
    """model_type / num_heads / hidden_size for ORT's transformer optimizer, from a config."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    model_type = getattr(config, "model_type", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if model_type is None:
        return None
    return {
        "model_type": model_type,
        "ort_model_type": model_type if model_type in MODEL_TYPES else None,
        "num_heads": int(heads or 0),
        "hidden_size": int(hidden or 0),
    }


def prepare_model(path: Path, workdir: Path) -> ModelCase:
    """Load the model once: node count, input sets (saved as .npz), Hugging Face config."""
    import onnx_ir as ir

    from pipeline.pass_manager import count_nodes
    from pipeline.runtime.inputs import generate_input_sets

    name = path.stem
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    model = ir.load(path)
    zoo = _zoo_inputs(name, model)
    if zoo is not None:
        sets, tiny = zoo
        source = f"zoo example inputs{' (tiny)' if tiny else ''}"
    else:
        sets, tiny = generate_input_sets(model), False
        source = "generated (pipeline.runtime.inputs)"
    source += ", shapes " + "; ".join(
        ", ".join(f"{k}{list(v.shape)}" for k, v in list(feeds.items())[:3])
        + (" ..." if len(feeds) > 3 else "")
        for feeds in sets
    )
    inputs_dir = folder / "inputs"
    inputs_dir.mkdir(exist_ok=True)
    for index, feeds in enumerate(sets):
        np.savez(inputs_dir / f"set{index}.npz", **feeds)
    hf_dir, hf = None, None
    config = None
    if (path.parent / "config.json").is_file():
        from transformers import AutoConfig

        hf_dir = path.parent
        config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    else:
        try:
            config = _zoo_config(name, tiny)
        except Exception as exc:  # noqa: BLE001 - no config means the HF tools do not apply
            logger.warning("no Hugging Face config for %s: %s", name, exc)
        if config is not None:
            hf_dir = folder / "hf"
            config.save_pretrained(hf_dir)
    if config is not None:
        hf = _hf_info(config)
    return ModelCase(name, path, folder, count_nodes(model), inputs_dir, source, hf_dir, hf)


# --------------------------------------------------------------------------------------
# the tools (run in a child process: ``--child-tool JOB.json``)


def _save_proto(proto, dst: Path) -> None:
    import onnx

    from pipeline.runtime.proto_size import fits_one_message

    if not fits_one_message(proto):
        onnx.save(proto, str(dst), save_as_external_data=True, location=dst.name + ".data")
    else:
        onnx.save(proto, str(dst))


def tool_onnxsim(job: dict) -> dict:
    import onnx
    import onnxsim

    start = time.perf_counter()
    model, ok = onnxsim.simplify(onnx.load(job["src"]))
    if not ok:
        raise RuntimeError("onnxsim.simplify reported that its check failed")
    _save_proto(model, Path(job["dst"]))
    return {"seconds": time.perf_counter() - start}


def tool_onnxslim(job: dict) -> dict:
    import onnxslim

    start = time.perf_counter()
    onnxslim.slim(job["src"], job["dst"])
    return {"seconds": time.perf_counter() - start}


def tool_onnxscript(job: dict) -> dict:
    import onnx_ir as ir
    import onnxscript.optimizer

    start = time.perf_counter()
    model = ir.load(job["src"])
    onnxscript.optimizer.optimize_ir(model)
    ir.save(model, job["dst"])
    return {"seconds": time.perf_counter() - start}


def tool_ort_transformers(job: dict) -> dict:
    from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

    hf = job["hf"]
    start = time.perf_counter()
    optimizer = optimize_model(
        job["src"],
        model_type=hf["ort_model_type"],
        num_heads=hf["num_heads"],
        hidden_size=hf["hidden_size"],
        use_gpu=False,
    )
    optimizer.save_model_to_file(job["dst"])
    seconds = time.perf_counter() - start
    fused = {k: v for k, v in optimizer.get_fused_operator_statistics().items() if v}
    _, _, level = MODEL_TYPES[hf["ort_model_type"]]
    config = (
        f"model_type {hf['ort_model_type']}, {hf['num_heads']} heads, hidden "
        f"{hf['hidden_size']}, opt_level {level}; fused: "
        + (", ".join(f"{k} {v}" for k, v in fused.items()) or "nothing")
    )
    return {"seconds": seconds, "fused": fused, "config": config}


def _hf_folder(job: dict) -> Path:
    """A folder holding the model as model.onnx (+ config.json when known), no copy if possible."""
    folder = Path(job["out_dir"]) / "hf_in"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    if not target.exists():
        try:
            os.link(job["src"], target)
        except OSError:
            target.symlink_to(Path(job["src"]).resolve())
    if job.get("hf_dir"):
        shutil.copyfile(Path(job["hf_dir"]) / "config.json", folder / "config.json")
    return folder


def _tool_optimum_optimizer(job: dict, level: str) -> dict:
    from optimum.onnxruntime import AutoOptimizationConfig, ORTOptimizer

    folder = _hf_folder(job)
    save_dir = Path(job["out_dir"]) / "optimum_out"
    start = time.perf_counter()
    optimizer = ORTOptimizer.from_pretrained(folder, file_names=["model.onnx"])
    config = getattr(AutoOptimizationConfig, level)()
    optimizer.optimize(optimization_config=config, save_dir=save_dir)
    seconds = time.perf_counter() - start
    shutil.move(save_dir / "model_optimized.onnx", job["dst"])
    return {"seconds": seconds}


def tool_optimum_o2(job: dict) -> dict:
    return _tool_optimum_optimizer(job, "O2")


def tool_optimum_o3(job: dict) -> dict:
    return _tool_optimum_optimizer(job, "O3")


def quantization_config_name() -> str:
    """Optimum's dynamic int8 config for this CPU (VNNI when the CPU has it)."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    flags = machine_info.cpu().flags
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def tool_optimum_int8(job: dict) -> dict:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    folder = _hf_folder(job)
    save_dir = Path(job["out_dir"]) / "optimum_out"
    name = quantization_config_name()
    start = time.perf_counter()
    quantizer = ORTQuantizer.from_pretrained(folder, file_name="model.onnx")
    qconfig = getattr(AutoQuantizationConfig, name)(is_static=False, per_channel=False)
    out = quantizer.quantize(quantization_config=qconfig, save_dir=save_dir)
    seconds = time.perf_counter() - start
    produced = Path(out) if Path(out).suffix == ".onnx" else save_dir / "model_quantized.onnx"
    shutil.move(produced, job["dst"])
    return {"seconds": seconds, "config": f"AutoQuantizationConfig.{name}(is_static=False)"}


def tool_ours(job: dict) -> dict:
    report = Path(job["out_dir"]) / "report.json"
    command = [
        sys.executable,
        str(ROOT / "optimize.py"),
        job["src"],
        "-o",
        job["dst"],
        "--no-speed-check",
        "--report",
        str(report),
        "--inputs",
        job["inputs_dir"],
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"optimize.py exit {done.returncode}: {meaningful_line(done.stderr or done.stdout)}"
        )
    data = json.loads(report.read_text())
    seconds = (data.get("seconds") or {}).get("total", wall)
    return {"seconds": seconds, "wall_seconds": wall, "report": str(report)}


TOOLS: dict[str, Callable[[dict], dict]] = {
    "onnxsim": tool_onnxsim,
    "onnxslim": tool_onnxslim,
    "onnxscript": tool_onnxscript,
    "ort-transformers": tool_ort_transformers,
    "optimum-o2": tool_optimum_o2,
    "optimum-o3": tool_optimum_o3,
    "optimum-int8": tool_optimum_int8,
    "ours": tool_ours,
}


def _custom_tool(spec: str) -> Callable[[dict], dict]:
    """``module:function`` -> a tool calling ``function(src: Path, dst: Path)``."""
    module_name, _, function_name = spec.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)

    def run(job: dict) -> dict:
        start = time.perf_counter()
        function(Path(job["src"]), Path(job["dst"]))
        return {"seconds": time.perf_counter() - start}

    return run


def not_applicable(tool: str, case: ModelCase) -> str | None:
    """Why ``tool`` does not apply to ``case`` (None when it does)."""
    if tool == "ort-transformers":
        if case.hf is None:
            return "not applicable: no Hugging Face config (not a transformer)"
        if case.hf["ort_model_type"] is None:
            return (
                f"not applicable: model_type '{case.hf['model_type']}' is not one "
                "onnxruntime.transformers.optimizer knows"
            )
    if tool in ("optimum-o2", "optimum-o3") and case.hf_dir is None:
        return (
            "not applicable: ORTOptimizer needs a transformers config.json "
            "(model_type, heads, hidden size); this model has none"
        )
    return None


def meaningful_line(text: str) -> str:
    """The line of stderr that says what went wrong (the exception line, else the last)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Fail", "Failure")) or head in (
            "Killed",
            "Segmentation fault",
        ):
            return line
    return lines[-1] if lines else ""


def _child_tool(job_path: Path) -> int:
    """Child process: run one tool on one model and write the result JSON."""
    job = json.loads(job_path.read_text())
    tool = job["tool"]
    result: dict = {"status": "ok"}
    try:
        function = _custom_tool(tool) if ":" in tool else TOOLS[tool]
        result.update(function(job))
        if not Path(job["dst"]).is_file():
            raise RuntimeError(f"{tool} wrote no output model")
    except BaseException as exc:  # noqa: BLE001 - every failure is data for the table
        message = str(exc).strip().splitlines()
        result = {
            "status": "failed",
            "error": f"{type(exc).__name__}: {message[0] if message else ''}".rstrip(": "),
            "traceback": traceback.format_exc()[-4000:],
        }
    Path(job["result"]).write_text(json.dumps(result, default=str))
    return 0


# --------------------------------------------------------------------------------------
# evaluation of one output (child process: ``--child-eval JOB.json``)


def _load_sets(folder: Path) -> list[dict[str, np.ndarray]]:
    sets = []
    for path in sorted(folder.glob("set*.npz")):
        with np.load(path, allow_pickle=False) as data:
            sets.append({k: data[k] for k in data.files})
    return sets


def _parity(reference: list[dict], candidate: list[dict]) -> dict:
    """Max abs difference and cosines of the candidate's outputs (``runtime.compare``);
    ``error`` names outputs that are missing or shaped differently (not a tolerance)."""
    comparison = compare_sets(reference, candidate, Tolerance())
    floats = [o for o in comparison.outputs if o.max_abs_error is not None]
    broken = [o for o in comparison.outputs if not o.passed and o.max_abs_error is None]
    cosines = [o.cosine for o in floats if o.cosine is not None]
    return {
        "max_abs_diff": max((o.max_abs_error for o in floats), default=0.0),
        "mean_cosine": float(np.mean(cosines)) if cosines else None,
        "min_cosine": float(np.min(cosines)) if cosines else None,
        "error": "; ".join(f"'{o.name}': {o.reason}" for o in broken[:3]) or None,
    }


def _child_eval(job_path: Path) -> int:
    """Child process: nodes, parity and latency of one tool's output vs. the original."""
    import onnx_ir as ir

    from pipeline.pass_manager import count_nodes
    from pipeline.runtime import sessions as runners
    from pipeline.runtime.timing import compare_latency

    job = json.loads(job_path.read_text())
    result: dict = {}
    try:
        sets = _load_sets(Path(job["inputs_dir"]))
        original = ir.load(job["original"])
        candidate = ir.load(job["candidate"])
        result["nodes_after"] = count_nodes(candidate)
        threads = job.get("threads")
        # The original's outputs, computed once per model and shared by every tool's eval.
        folder = Path(job["reference"])
        paths = [folder / f"set{i}.npz" for i in range(len(sets))]
        if all(p.is_file() for p in paths):
            reference = []
            for path in paths:
                with np.load(path, allow_pickle=False) as data:
                    reference.append({k: data[k] for k in data.files})
        else:
            session = runners.create_session(original, intra_op_threads=threads)
            reference = runners.run_all(session, sets)
            del session
            folder.mkdir(parents=True, exist_ok=True)
            for path, outputs in zip(paths, reference, strict=True):
                np.savez(path, **{k: np.asarray(v) for k, v in outputs.items()})
        try:
            session = runners.create_session(candidate, intra_op_threads=threads)
            result["parity"] = _parity(reference, runners.run_all(session, sets))
            del session
        except Exception as exc:  # noqa: BLE001
            result["parity"] = {"error": f"{type(exc).__name__}: {_first_line(exc)}"}
        if job["repeats"] > 0:
            try:
                latency = compare_latency(
                    original, candidate, sets[0], rounds=job["repeats"], intra_op_threads=threads
                )
                result["latency"] = latency.to_dict()
            except Exception as exc:  # noqa: BLE001
                result["latency"] = {"error": f"{type(exc).__name__}: {_first_line(exc)}"}
    except Exception as exc:  # noqa: BLE001
        result["error"] = f"{type(exc).__name__}: {_first_line(exc)}"
    Path(job["result"]).write_text(json.dumps(result, default=str))
    return 0


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


# --------------------------------------------------------------------------------------
# the parent: one subprocess per tool and per evaluation


def _child(flag: str, job: dict, job_path: Path, timeout: float, threads: int | None) -> dict:
    """Run this script as a child with ``flag JOB``; never raises for the child's failures."""
    job_path.write_text(json.dumps(job))
    result_path = Path(job["result"])
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    pythonpath = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    command = [sys.executable, "-m", "pipeline.bench.peers", flag, str(job_path)]
    start = time.perf_counter()
    # A session of its own, so that a timeout ends the child's own children too (ours runs
    # optimize.py as a grandchild) and nothing is left eating the CPU of the next tool.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"status": "timeout", "error": f"timeout after {timeout:g} s"}
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    wall = time.perf_counter() - start
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        result["process_seconds"] = round(wall, 3)
        return result
    code = done.returncode
    why = f"signal {-code}" if code < 0 else f"exit {code}"
    line = meaningful_line(done.stderr) or meaningful_line(done.stdout)
    return {
        "status": "crashed",
        "error": f"crashed ({why}): {line}" if line else f"crashed ({why})",
        "stderr_tail": (done.stderr or "")[-2000:],
    }


def run_tool(case: ModelCase, tool: str, args: argparse.Namespace) -> dict:
    """One row: run the tool, then evaluate its output."""
    row: dict = {"tool": tool, "kind": "quantization" if tool in QUANT_TOOLS else "graph"}
    reason = not_applicable(tool, case)
    if reason:
        return {**row, "status": "not applicable", "error": reason}
    out_dir = case.folder / tool.replace(":", "_").replace("/", "_")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    dst = out_dir / "model.onnx"
    job = {
        "tool": tool,
        "src": str(case.path.resolve()),
        "dst": str(dst),
        "out_dir": str(out_dir),
        "inputs_dir": str(case.inputs_dir),
        "hf_dir": str(case.hf_dir) if case.hf_dir else None,
        "hf": case.hf,
        "result": str(out_dir / "result.json"),
    }
    logger.info("%s: %s ...", case.name, tool)
    result = _child("--child-tool", job, out_dir / "job.json", args.timeout, args.threads)
    row.update(result)
    if row["status"] != "ok":
        logger.warning("%s: %s %s: %s", case.name, tool, row["status"], row.get("error"))
        return row
    evaluation = _child(
        "--child-eval",
        {
            "original": str(case.path.resolve()),
            "candidate": str(dst),
            "inputs_dir": str(case.inputs_dir),
            "reference": str(case.folder / "reference"),
            "repeats": args.repeats,
            "threads": args.threads,
            "result": str(out_dir / "eval.json"),
        },
        out_dir / "eval_job.json",
        args.timeout,
        args.threads,
    )
    if "status" in evaluation:  # the evaluation itself crashed or timed out
        evaluation = {"error": f"evaluation {evaluation['status']}: {evaluation.get('error')}"}
    row["evaluation"] = evaluation
    if not args.keep_outputs:
        for path in out_dir.glob("*.onnx*"):
            path.unlink()
        shutil.rmtree(out_dir / "hf_in", ignore_errors=True)
    return row


def run_case(case: ModelCase, tools: list[str], args: argparse.Namespace) -> dict:
    rows = [run_tool(case, tool, args) for tool in tools]
    return {
        "model": case.name,
        "path": str(case.path),
        "nodes_before": case.nodes,
        "inputs": case.inputs_source,
        "hf": case.hf,
        "rows": rows,
    }


# --------------------------------------------------------------------------------------
# output: markdown tables, JSON, the docs section


def _cell(text: object, limit: int = 160) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_row(row: dict, nodes_before: int) -> str:
    evaluation = row.get("evaluation") or {}
    seconds = f"{row['seconds']:.2f}" if isinstance(row.get("seconds"), (int, float)) else ""
    nodes = f"{nodes_before} → {evaluation['nodes_after']}" if "nodes_after" in evaluation else ""
    latency = evaluation.get("latency") or {}
    if "ratio" in latency:
        ratio = f"{latency['ratio']:.3f} ± {latency['noise']:.3f} ({latency['verdict']})"
    else:
        ratio = _cell(latency.get("error", ""), 80)
    parity = evaluation.get("parity") or {}
    if parity.get("error"):
        parity_text = _cell(parity["error"], 80)
    elif row["kind"] == "quantization" and parity.get("mean_cosine") is not None:
        parity_text = f"mean cos {parity['mean_cosine']:.5f} (max abs {parity['max_abs_diff']:.3g})"
    elif "max_abs_diff" in parity:
        parity_text = f"max abs {parity['max_abs_diff']:.3g}"
    else:
        parity_text = ""
    status = row["status"]
    if row.get("error"):
        status = row["error"] if status == "not applicable" else f"{status}: {row['error']}"
    elif evaluation.get("error"):
        status = f"ok, output not evaluated: {evaluation['error']}"
    if row.get("config"):
        status += f" ({row['config']})"
    cells = [row["tool"], row["kind"], seconds, nodes, ratio, parity_text, _cell(status)]
    return "| " + " | ".join(cells) + " |"


def format_tables(results: list[dict]) -> str:
    parts = []
    for result in results:
        parts += [
            f"### {result['model']} ({result['nodes_before']} nodes)",
            "",
            f"Inputs: {result['inputs']}",
            "",
            "| tool | kind | seconds | nodes | latency ratio vs. ORT on the original "
            "| parity vs. original | status |",
            "| --- | --- | ---: | --- | --- | --- | --- |",
            *(format_row(row, result["nodes_before"]) for row in result["rows"]),
            "",
        ]
    return "\n".join(parts)


def machine() -> dict:
    import onnxruntime

    cpu = machine_info.cpu().model
    versions = {"onnxruntime": onnxruntime.__version__}
    for package in ("onnx", "onnxsim", "onnxslim", "onnxscript", "onnx_ir", "optimum"):
        try:
            from importlib.metadata import version

            versions[package] = version(package.replace("_", "-"))
        except Exception:  # noqa: BLE001
            versions[package] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": versions,
    }


def format_header(info: dict, args: argparse.Namespace, command: str) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    threads = args.threads or "ORT default"
    return "\n".join(
        [
            f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores, "
            f"{info['machine']}), {versions}.",
            f"Latency: {args.repeats} interleaved rounds per tool, intra-op threads "
            f"{threads}, first input set; ratio = median of per-round candidate/original "
            "(< 1 is faster) ± the noise of pipeline.runtime.timing (median CI or block drift).",
            "Seconds: the tool's own time from reading the file to writing its output, in "
            "process (ours: the report's `seconds.total`, its verification sessions "
            "included). Nodes: all graphs, before → after. Parity: both models on ONNX "
            "Runtime with graph optimizations off, the same input sets for every tool; max "
            "abs difference over all outputs and sets, mean cosine for int8 rows. Status: "
            "`ok`, or the failure verbatim (first line of the exception or of stderr).",
            f"Command: `{command}`",
            "",
        ]
    )


def default_models() -> list[Path]:
    folder = ROOT / "artifacts" / "zoo"
    missing = [n for n in DEFAULT_MODELS if not (folder / f"{n}.onnx").is_file()]
    if missing:
        from batch_export import export_all

        logger.info("exporting %s into %s", ", ".join(missing), folder)
        export_all(missing, folder, tiny=False, jobs=1, progress=False)
    return [folder / f"{n}.onnx" for n in DEFAULT_MODELS]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="models (or use --models)")
    parser.add_argument("--models", default="", help="comma-separated .onnx paths")
    parser.add_argument(
        "--tools",
        default=",".join(DEFAULT_TOOLS),
        help=f"comma-separated; known: {', '.join(TOOLS)}, or module:function",
    )
    parser.add_argument("--repeats", type=int, default=15, help="latency rounds (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (0: ORT)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per tool / eval")
    parser.add_argument("--workdir", type=Path, help="keep work files here (default: temp)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the tools' models")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--from-json", type=Path, help="render (and --write) a saved --json run, run nothing"
    )
    parser.add_argument("--child-tool", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-eval", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.threads = args.threads or None
    return args


def render_saved(args: argparse.Namespace, write_section: Callable) -> int:
    """Re-render a saved run (its own command, machine and settings) without running it."""
    payload = json.loads(args.from_json.read_text())
    saved = argparse.Namespace(repeats=payload["repeats"], threads=payload["threads"])
    text = format_header(payload["machine"], saved, payload["command"])
    text += "\n" + format_tables(payload["results"])
    print(text)
    if args.write:
        write_section(args.doc, SECTION, text, HEADING)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_tool:
        return _child_tool(args.child_tool)
    if args.child_eval:
        return _child_eval(args.child_eval)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pipeline.bench.doc_sections import write_section

    if args.from_json:
        return render_saved(args, write_section)

    paths = list(args.paths) + [Path(p) for p in args.models.split(",") if p]
    paths = paths or default_models()
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"error: model file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS and ":" not in t]
    if unknown:
        print(f"error: unknown tool(s) {unknown}; known: {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    command = "python scripts/bench_peers.py " + shlex.join(
        a for a in (argv if argv is not None else sys.argv[1:])
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_peers-"))
    info = {**machine(), "date": datetime.date.today().isoformat()}
    results: list[dict] = []

    def save_json() -> None:  # after every model, so a long run's partial results survive
        if args.json:
            payload = {
                "schema_version": SCHEMA_VERSION,
                "command": command,
                "machine": info,
                "repeats": args.repeats,
                "threads": args.threads,
                "results": results,
            }
            args.json.write_text(json.dumps(payload, indent=2, default=str))

    try:
        for path in paths:
            case = prepare_model(path, workdir)
            results.append(run_case(case, tools, args))
            save_json()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = format_header(info, args, command) + "\n" + format_tables(results)
    print(text)
    if args.write:
        write_section(args.doc, SECTION, text, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
