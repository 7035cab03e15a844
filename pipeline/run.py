"""The pipeline end to end: load -> inputs -> verified passes -> parity -> speed -> save.

Raises ``UserError`` (exit 2) for anything the user can fix and ``VerificationFailed``
(exit 1) when the optimized model cannot be shown to be as correct and as fast as the
original. In both cases nothing is written to the output path; the report (if asked for) is
always filled in so the caller can write it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import onnx_ir as ir
import onnxruntime as ort

from graph_passes.registry import create_pass
from graph_passes.target.targets import Target
from pipeline import providers as providers_mod
from pipeline.fusion_report import expected_fusions, kernel_timing_rows
from pipeline.load import (
    detach_initializer_inputs,
    file_sha256,
    load_model,
    load_notes,
    save_model,
    tensor_bytes,
)
from pipeline.pass_manager import AUTO_END_VERIFY_BYTES, PassRecord, VerifiedPassManager
from pipeline.pruning import stage as prune_mod
from pipeline.quantization import stage as quantize_mod
from pipeline.quantization.lm_guard import tokenizer_beside
from pipeline.recipe import Recipe, VerifySettings
from pipeline.report import Report, model_facts
from pipeline.runtime import inputs as inputs_mod
from pipeline.runtime import sessions as runners
from pipeline.runtime.atomic_write import check_writable_folder
from pipeline.runtime.compare import Tolerance
from pipeline.runtime.errors import UserError, VerificationFailed
from pipeline.runtime.scratch_weights import ScratchWeights, scratch_weights
from pipeline.runtime.timing import compare_latency
from pipeline.verify import DECODER_TOLERANCE, Verifier, decoder_output_tolerances

logger = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """Everything one optimization run needs (the CLI builds this)."""

    input_path: Path
    output_path: Path
    recipe: Recipe
    inputs_path: Path | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    output_tolerances: dict[str, Tolerance] = field(default_factory=dict)
    external_data: bool | None = None
    allow_unverified: bool = False
    keep_initializer_inputs: bool = False
    seed: int = 0
    # --provider / --allow-fallback / --provider-option; None is plain CPU, as before.
    provider: providers_mod.ProviderRequest | None = None
    # --precision and friends; None (or precision fp32) skips the quantize stage.
    quantize: quantize_mod.QuantizeOptions | None = None
    # --prune and friends; None skips the prune stage, which takes its metric and data from
    # ``quantize`` (--metric, --calibration, ...).
    prune: prune_mod.PruneOptions | None = None


class Listener(Protocol):
    def stage(self, name: str) -> None: ...

    def record(self, record: PassRecord) -> None: ...


class _Silent:
    def stage(self, name: str) -> None:
        logger.info("stage: %s", name)

    def record(self, record: PassRecord) -> None:
        logger.info("pass %s: %s", record.name, record.verification)


def _check_fusions(original: ir.Model, optimized: ir.Model, target: Target, report: Report):
    """Expected vs. achieved fusions into the report; a shortfall is a loud warning, a
    fusion left out because its kernel was measured slower is not (it is the point)."""
    rows = expected_fusions(original.clone(), optimized.clone(), target)
    report.fusions = [dataclasses.asdict(row) for row in rows]
    report.warnings.extend(
        f"fusion shortfall: {row.note}" for row in rows if row.note and row.unexplained
    )
    report.kernel_timing = kernel_timing_rows(target.kernel_checks)


def _check_paths(options: RunOptions) -> None:
    source = options.input_path
    target = options.output_path
    if target.exists() and target.is_dir():
        raise UserError(f"output path is a directory: {target}")
    if source.exists() and target.exists() and source.resolve() == target.resolve():
        raise UserError(
            f"output path is the input path ({target}); the input model is never overwritten"
        )
    if target.exists() and not target.is_file():  # /dev/null, a FIFO: never rename over one
        raise UserError(f"output path exists and is not a regular file: {target}")
    folder = target.parent if str(target.parent) else Path(".")
    for parent in (folder, *folder.parents):  # fail before the expensive work, not at save
        if parent.exists() and not parent.is_dir():
            raise UserError(f"output folder is not a folder: {parent} is a file")
    if not folder.is_dir():
        raise UserError(f"output folder does not exist: {folder}")
    try:
        check_writable_folder(folder)
    except OSError as exc:
        raise UserError(f"cannot write to output folder {folder}: {exc.strerror or exc}") from exc


# When the model fails on the generated inputs, these are tried in turn (each a change to
# how ``inputs.generate_input_sets`` sizes things), then every dynamic dimension at 1.
# The last plans: batch 1, every dim at 1 but one grown to GROWN_SIZE (512: a 32 ms audio
# frame at 16 kHz, longer than the reflect pads and STFT windows of speech front ends), for
# at most MAX_GROWN_DIMS dims in turn.
GROWN_SIZE = 512
MAX_GROWN_DIMS = 4
_INPUT_PLANS = (
    ("longer non-batch dynamic dimensions (x4)", {"scale": 4}),
    ("longer non-batch dynamic dimensions (x16)", {"scale": 16}),
    ("longer non-batch dynamic dimensions (x64)", {"scale": 64}),
    ("the attention mask spanning past + new tokens", {"mask_spans_past": True}),
)


def _reference_run(
    model: ir.Model, options: RunOptions, report: Report
) -> tuple[list[inputs_mod.Feeds], list[runners.Outputs] | None]:
    """Pick input sets and compute the original model's outputs on them.

    Generated inputs are a search, not a guess: when the model fails on the default sizes,
    the plans above are tried in turn; the report's ``inputs.search`` lists every attempt.
    """
    if options.inputs_path is not None:
        sets = inputs_mod.load_user_inputs(options.inputs_path)
        inputs_mod.check_user_inputs(model, sets)
        source = "user"
    else:
        sets = inputs_mod.generate_input_sets(model, options.input_shapes, seed=options.seed)
        source = "generated"
    try:
        session = runners.create_session(model, optimization="disable_all")
    except Exception as exc:
        return _unverifiable(options, report, sets, source, f"cannot load it: {_ort_reason(exc)}")
    try:
        outputs = runners.run_all(session, sets)
    except Exception as exc:
        if source == "user":
            raise UserError(f"the input model fails on your --inputs data: {_line(exc)}") from exc
        return _search_inputs(model, options, report, session, sets, exc)
    report.inputs = _describe_inputs(sets, source)
    return sets, outputs


def input_plans(model: ir.Model, input_shapes: dict, seed: int) -> list[tuple[str, Callable]]:
    """The generated-input plans tried after the default sizes, in order: ``(words, make)``
    with ``make()`` -> the input sets (the benchmark of third-party models replays them)."""
    plans = [
        (
            text,
            lambda kw=kw: inputs_mod.generate_input_sets(model, input_shapes, seed=seed, **kw),
        )
        for text, kw in _INPUT_PLANS
    ]
    plans.append(
        (
            "every dynamic dimension at 1",
            lambda: [inputs_mod.minimal_input_set(model, input_shapes, seed=seed)],
        )
    )
    symbols = inputs_mod.growable_symbols(model, input_shapes)[:MAX_GROWN_DIMS]
    plans += [
        (
            f"every dynamic dimension at 1 but {inputs_mod.symbol_text(symbol)} at {GROWN_SIZE}",
            lambda symbol=symbol: [
                inputs_mod.minimal_input_set(
                    model, input_shapes, seed=seed, grow=(symbol, GROWN_SIZE)
                )
            ],
        )
        for symbol in symbols
    ]
    return plans


def _search_inputs(model, options, report, session, first_sets, first_error):
    """The generated default sets failed: try the other plans (``input_plans``)."""
    attempts = [("the default sizes", first_sets, first_error)]
    plans = input_plans(model, options.input_shapes, options.seed)
    for text, make in plans:
        sets = make()
        try:
            outputs = runners.run_all(session, sets)
        except Exception as exc:
            attempts.append((text, sets, exc))
            continue
        report.warnings.append(
            f"the model failed on the default generated inputs ({_ort_reason(first_error)}); "
            f"verified with {text} instead. Pass --inputs or --input-shape for inputs that "
            "look like real use."
        )
        report.inputs = _describe_inputs(sets, "generated") | {
            "search": [_attempt(t, s, e) for t, s, e in attempts] + [_attempt(text, sets, None)]
        }
        return sets, outputs
    report.inputs = _describe_inputs(first_sets, "generated") | {
        "search": [_attempt(t, s, e) for t, s, e in attempts]
    }
    if options.allow_unverified:
        reason = f"cannot run it: {_ort_reason(first_error)}"
        return _unverifiable(options, report, first_sets, "generated", reason)
    raise UserError(_no_inputs_found(model, attempts))


def _attempt(plan: str, sets: list[inputs_mod.Feeds], error: BaseException | None) -> dict:
    shapes = {name: list(array.shape) for name, array in sets[0].items()}
    return {"plan": plan, "shapes": shapes, "error": None if error is None else _ort_reason(error)}


_ORT_NODE = re.compile(r"running (\w+) node\. Name:'([^']*)'")


def _no_inputs_found(model: ir.Model, attempts) -> str:
    """The one-line error when no generated inputs run: the failing node, what was tried,
    and the exact options to pass instead."""
    _, first_sets, first_error = attempts[0]
    reason = _ort_reason(first_error)
    where = _ORT_NODE.search(str(first_error))
    node = ""
    if where:
        node = (
            f" at {where.group(1)} node '{where.group(2)}'"
            if where.group(2)
            else f" at a {where.group(1)} node"
        )
    dynamic = {
        spec.name
        for spec in inputs_mod.input_specs(model)
        if spec.shape is None or any(not isinstance(d, int) for d in spec.shape)
    }
    shapes = " ".join(
        f"--input-shape {name}={','.join(map(str, array.shape))}"
        for name, array in first_sets[0].items()
        if name in dynamic
    )
    hint = f"or fix the dynamic sizes, e.g. {shapes} with sizes it accepts" if shapes else ""
    return (
        f"ONNX Runtime cannot run the model on generated inputs{node}: {_line(reason)} "
        f"(tried {len(attempts)} input plans: {', '.join(t for t, _, _ in attempts)}). "
        f"Pass real data with --inputs DIR (.npz files holding {', '.join(sorted(first_sets[0]))}) "
        f"{hint}; --allow-unverified skips output verification"
    )


def _unverifiable(options, report, sets, source, reason):
    message = f"ONNX Runtime {_line(reason)}"
    if not options.allow_unverified:
        raise UserError(
            f"{message}; outputs cannot be verified (re-run with --allow-unverified to "
            "optimize with checker-only verification)"
        )
    report.warnings.append(f"{message}; passes were verified by the ONNX checker only")
    report.inputs = report.inputs or _describe_inputs(sets, source)
    return sets, None


# ONNX Runtime's load errors carry a prefix, a C++ source location and a function signature
# before the words that matter; two common ones are rewritten to name both versions.
_ORT_PREFIX = re.compile(
    r"\[ONNXRuntimeError\] : \d+ : \w+ : "
    r"|Load model from .*? failed:"
    r"|\S+\.(?:h|cc|cpp):\d+ \S+?\(.*?\) "
)
_ORT_IR = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")
_ORT_OPSET = re.compile(
    r"Opset (\d+) is under development.*?support for domain (\S+) is till opset (\d+)", re.S
)


def _ort_reason(exc: BaseException) -> str:
    text = str(exc)
    if match := _ORT_IR.search(text):
        model_ir, max_ir = match.groups()
        return (
            f"the model's IR version {model_ir} is newer than ONNX Runtime {ort.__version__} "
            f"supports (at most IR version {max_ir}); save it with ir_version <= {max_ir}"
        )
    if match := _ORT_OPSET.search(text):
        opset, domain, max_opset = match.groups()
        return (
            f"the model imports opset {opset} of domain {domain}, newer than ONNX Runtime "
            f"{ort.__version__} supports (at most opset {max_opset})"
        )
    return _ORT_PREFIX.sub("", text).strip()


def _describe_inputs(sets: list[inputs_mod.Feeds], source: str) -> dict:
    described = [
        {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in feeds.items()}
        for feeds in sets
    ]
    return {"source": source, "sets": described}


def _line(exc: object) -> str:
    return " ".join(str(exc).split())[:300]


def _resolve_provider(
    options: RunOptions, recipe: Recipe, report: Report, listener: Listener
) -> tuple[Recipe, providers_mod.Resolution]:
    """Probe the requested provider before the heavy work; a TensorRT or CUDA run also
    changes the graph target (TensorRT takes standard ONNX only)."""
    request = options.provider or providers_mod.ProviderRequest()
    if request.names != ("cpu",):
        listener.stage(f"provider ({request.text})")
    try:
        resolution = providers_mod.resolve(request)
    except providers_mod.ProviderUnavailable as exc:
        report.provider = exc.to_dict()
        raise
    report.provider = resolution.to_dict()
    target, note = providers_mod.target_for(resolution.resolved, recipe.target)
    if note:
        recipe = recipe.with_overrides(target=target)
        report.recipe["target"] = target
        resolution.notes.append(note)
        report.provider = resolution.to_dict()
    if resolution.fallback:
        report.warnings.append(f"provider: {resolution.reason}")
    return recipe, resolution


def _with_tokenizer(options: RunOptions) -> quantize_mod.QuantizeOptions:
    """The quantize options, pointed at the ``tokenizer.json`` beside the input model when
    none was given (text data and, for a causal LM, the LM guard use it)."""
    tokenizer = tokenizer_beside(options.input_path)
    quantize = options.quantize or quantize_mod.QuantizeOptions()
    if quantize.tokenizer is not None or tokenizer is None:
        return quantize
    return dataclasses.replace(quantize, tokenizer=tokenizer)


def _quantize_options_for(model: ir.Model, options: RunOptions):
    """The quantize options for this model, checked before any work: the metric must fit
    the model (perplexity needs a causal LM and its tokenizer)."""
    lowered = options.quantize is not None and options.quantize.precision != "fp32"
    if not lowered and options.prune is None:
        return options.quantize
    chosen = _with_tokenizer(options)
    names = [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]
    try:
        chosen.metric_for(*names)
    except ValueError as exc:
        raise UserError(f"--metric {chosen.metric}: {exc}") from exc
    return chosen


def _output_tolerances(
    model: ir.Model, recipe: Recipe, options: RunOptions, report: Report
) -> dict[str, Tolerance]:
    """The user's per-output tolerances, plus the decoder LM budget for the outputs they left
    alone when the recipe keeps the default tolerance (an explicit --rtol/--atol wins)."""
    chosen = dict(options.output_tolerances)
    if (recipe.verify.rtol, recipe.verify.atol) != (VerifySettings.rtol, VerifySettings.atol):
        return chosen
    decoder = {
        name: tol for name, tol in decoder_output_tolerances(model).items() if name not in chosen
    }
    if decoder:
        report.warnings.append(
            f"decoder LM: {len(decoder)} outputs (logits, present.*) verified at "
            f"{DECODER_TOLERANCE.describe()}, the fp32 noise of a deep decoder; "
            "--rtol/--atol or --output-tol NAME=RTOL,ATOL to change"
        )
    return chosen | decoder


def run(options: RunOptions, report_sink: list[Report], listener: Listener | None = None) -> Report:
    """Optimize one model. The report is appended to ``report_sink`` as soon as it exists,
    so a caller can write it even when this raises."""
    _check_paths(options)
    with scratch_weights(options.output_path.parent) as scratch:
        return _run(options, report_sink, listener or _Silent(), scratch)


def _run(
    options: RunOptions, report_sink: list[Report], listener: Listener, scratch: ScratchWeights
) -> Report:
    started = time.perf_counter()
    listener.stage("load")
    model = load_model(options.input_path, scratch)
    input_hash = file_sha256(options.input_path)
    recipe = options.recipe
    report = Report(
        recipe=dataclasses.asdict(recipe), input_model=model_facts(model, options.input_path)
    )
    report_sink.append(report)
    if not options.keep_initializer_inputs:
        detach_initializer_inputs(model)
    report.warnings.extend(load_notes(model))
    report.seconds["load"] = time.perf_counter() - started
    quantize_options = _quantize_options_for(model, options)
    if options.prune is not None:
        prune_mod.check(model, quantize_options, options.prune.spec, fused=False)
    recipe, resolution = _resolve_provider(options, recipe, report, listener)

    listener.stage("reference run")
    sets, reference = _reference_run(model, options, report)
    tolerance = Tolerance(rtol=recipe.verify.rtol, atol=recipe.verify.atol)
    unknown = sorted(set(options.output_tolerances) - {v.name for v in model.graph.outputs})
    if unknown:
        raise UserError(f"--output-tol names unknown output(s) {', '.join(unknown)}")
    output_tolerances = _output_tolerances(model, recipe, options, report)
    verifier = Verifier(sets, reference, tolerance, output_tolerances)
    report.recipe["verify"]["output_tolerances"] = {
        name: dataclasses.asdict(tol) for name, tol in output_tolerances.items()
    }

    mode = recipe.verify.mode
    if mode == "auto":
        mode = "end" if tensor_bytes(model) > AUTO_END_VERIFY_BYTES else "per-pass"
    report.recipe["verify"]["mode_used"] = mode
    original = model.clone()
    listener.stage("passes")
    target = Target(
        recipe.target,
        recipe.raise_opset_to,
        time_kernels=recipe.speed.time_kernels,
        retime=recipe.speed.retime,
    )
    manager = VerifiedPassManager(
        recipe.passes,
        verifier,
        max_iterations=recipe.max_iterations,
        mode=mode,
        on_record=listener.record,
        pass_factory=functools.partial(create_pass, target=target),
    )
    t0 = time.perf_counter()
    result = manager.run(model)
    report.seconds["passes_and_verification"] = time.perf_counter() - t0
    report.seconds["passes"] = sum(r.seconds for r in result.records)
    report.passes = [dataclasses.asdict(r) for r in result.records]
    report.rolled_back = dict(result.rolled_back)
    report.iterations = result.iterations
    optimized = result.model
    scratch.spill(optimized)
    _check_fusions(original, optimized, target, report)

    listener.stage("final verification")
    verdict = verifier.verify(optimized)
    report.parity = verdict.comparison.to_dict() if verdict.comparison is not None else None
    if not verdict.ok:
        raise VerificationFailed(
            f"optimized model fails verification at {verdict.stage}: {verdict.reason}"
        )

    if resolution.resolved != "cpu" and verifier.can_run:
        listener.stage(f"parity and placement on {resolution.resolved}")
    check = providers_mod.check_on_provider(
        optimized, resolution, sets, reference, tolerance, output_tolerances
    )
    report.provider = {**resolution.to_dict(), "check": check}
    if check.get("passed") is False:
        raise VerificationFailed(
            f"optimized model fails parity on {resolution.resolved}: {check['summary']}"
        )
    latency_providers = None if resolution.resolved == "cpu" else resolution.session_providers()

    if options.prune is not None:
        # After the fp32 checks, before quantization: held to the metric budget against the
        # verified model, not to parity (pruning changes the outputs by design).
        listener.stage(f"prune {options.prune.spec.text}")
        t0 = time.perf_counter()
        optimized, report.pruning = prune_mod.run_stage(
            optimized, options.prune, quantize_options, sets, reference
        )
        report.seconds["prune"] = time.perf_counter() - t0
        report.warnings.extend(report.pruning["notes"])
        failure = prune_mod.stage_failure(report.pruning)
        if failure:
            raise VerificationFailed(failure)
        if options.prune.spec.sparse:
            report.warnings.append(providers_mod.flag_sparse_weights(resolution))
            report.provider["options"] = resolution.to_dict()["options"]
            if resolution.resolved != "cpu":
                latency_providers = resolution.session_providers()

    lowered = options.quantize is not None and options.quantize.precision != "fp32"
    if lowered:
        # After the fp32 checks above (a pass bug is never blamed on quantization); the
        # lowered model is checked against the ORIGINAL outputs with its cosine budget.
        listener.stage(f"quantize {options.quantize.precision}")
        t0 = time.perf_counter()
        optimized, report.quantization = quantize_mod.run_stage(
            optimized, quantize_options, sets, reference
        )
        report.seconds["quantize"] = time.perf_counter() - t0
        scratch.spill(optimized)
        report.warnings.extend(report.quantization.get("notes", []))
        failure = quantize_mod.stage_failure(report.quantization)
        if failure:
            raise VerificationFailed(failure)

    changed = (
        lowered
        or options.prune is not None
        or any(r.modified and r.verification != "rolled_back" for r in result.records)
    )
    if recipe.speed.check and verifier.can_run and changed:
        listener.stage("speed check")
        latency = compare_latency(
            original,
            optimized,
            sets[0],
            rounds=recipe.speed.rounds,
            max_slowdown=recipe.speed.max_slowdown,
            providers=latency_providers,
        )
        if latency.verdict == "slower":
            # A slowdown fails the run, so it must be confirmed: a busy machine can make one
            # measurement look slow. A second, longer measurement decides.
            first = latency
            latency = compare_latency(
                original,
                optimized,
                sets[0],
                rounds=2 * recipe.speed.rounds,
                max_slowdown=recipe.speed.max_slowdown,
                providers=latency_providers,
            )
            report.warnings.append(
                f"first speed measurement said {first.ratio:.3f}x (noise {first.noise:.3f}); "
                f"re-measured with {2 * recipe.speed.rounds} rounds: {latency.ratio:.3f}x"
            )
        report.latency = latency.to_dict()
        if latency.verdict == "slower":
            raise VerificationFailed(
                f"optimized model is slower: {latency.ratio:.3f}x the original's latency "
                f"(noise {latency.noise:.3f}, budget {recipe.speed.max_slowdown:.2f})"
            )

    listener.stage("save")
    if scratch.in_use and options.external_data is None:
        report.warnings.append(
            "weights saved as external data beside the model (a model this large is; ONNX "
            "Runtime memory-maps them instead of copying); --no-external-data writes one file"
        )
    save_model(optimized, options.output_path, external_data=options.external_data)
    if file_sha256(options.input_path) != input_hash:  # a guarantee, checked every run
        raise RuntimeError("input model file changed during the run")
    report.output_model = model_facts(optimized, options.output_path)
    report.status = "ok"
    report.exit_code = 0
    report.seconds["total"] = time.perf_counter() - started
    return report
