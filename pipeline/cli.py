"""The command line: parse with typer, build a Recipe, call ``pipeline.run``, print with rich.

No logic lives here beyond mapping exceptions to the documented exit codes:
0 ok; 1 verification failed (the report says where); 2 bad input or usage (one line, no
traceback unless ``--debug``). Nothing is written to OUT unless the run succeeds.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.pass_manager import PassRecord
from pipeline.providers import (
    ProviderRequest,
    parse_provider_options,
    quantization_device,
    required_target,
)
from pipeline.recipe import Recipe
from pipeline.report import Report, check_report_path, write_report
from pipeline.runtime.compare import Tolerance
from pipeline.runtime.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL_ERROR,
    UserError,
    VerificationFailed,
)

console = Console(stderr=True)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def _pick_target(target: str | None, portable: bool) -> str | None:
    """``--portable`` is shorthand for ``--target portable``; the two must not disagree."""
    if portable and target not in (None, "portable"):
        raise UserError(f"--portable contradicts --target {target}")
    return "portable" if portable else target


def _provider_request(
    text: str, allow_fallback: bool, options: list[str] | None, target: str | None, portable: bool
) -> ProviderRequest:
    """Validate --provider/--provider-option now; TensorRT cannot take a contrib-op graph."""
    request = ProviderRequest(text, allow_fallback, parse_provider_options(options))
    needed = required_target(text)
    chosen = _pick_target(target, portable)
    if needed and chosen not in (None, needed):
        raise UserError(f"--provider {text} needs the {needed} graph; drop --target {target}")
    return request


def _parse_output_tolerances(texts: list[str] | None, recipe: Recipe) -> dict[str, Tolerance]:
    """``name=RTOL,ATOL`` strings -> per-output Tolerance (fp16 ulps as the recipe's)."""
    parsed: dict[str, Tolerance] = {}
    for text in texts or []:
        name, sep, values = text.partition("=")
        parts = values.split(",")
        try:
            if not sep or not name or len(parts) != 2:
                raise ValueError("expected name=RTOL,ATOL")
            parsed[name] = Tolerance(rtol=float(parts[0]), atol=float(parts[1]))
        except ValueError as exc:
            raise UserError(f"--output-tol expects name=RTOL,ATOL, got '{text}' ({exc})") from exc
    return parsed


def _quantize_options(provider: str, **fields):
    """Validate the precision flags now (exit 2 on a bad value, before any work): the values,
    and a plug-in metric, which is imported here."""
    from pipeline.quantization import metrics
    from pipeline.quantization.lm_guard import LmBudget
    from pipeline.quantization.stage import METRIC_AUTO, QuantizeOptions

    max_perplexity_increase, min_top1 = fields.pop("lm_budget")
    try:
        options = QuantizeOptions(
            device=quantization_device(provider),
            lm_budget=LmBudget(max_perplexity_increase, min_top1),
            **fields,
        )
    except ValueError as exc:
        raise UserError(f"--precision options: {exc}") from exc
    if options.metric != METRIC_AUTO:
        metrics.resolve(options.metric, options.min_neighbour_agreement)
    for flag, path in (
        ("--calibration", options.calibration),
        ("--evaluation", options.evaluation),
        ("--tokenizer", options.tokenizer),
    ):
        if path is not None and not path.exists():
            raise UserError(f"{flag} path not found: {path}")
    if options.evaluation is not None and options.calibration is None:
        raise UserError("--evaluation needs --calibration (the data decisions are made on)")
    return options


def _prune_options(spec: str | None, max_drop: float | None, reconstruct: bool):
    """Validate the --prune flags now (exit 2 on a bad value, before any work)."""
    if spec is None:
        if max_drop is not None:
            raise UserError("--prune-max-drop needs --prune")
        return None
    from pipeline.pruning import spec as spec_mod
    from pipeline.pruning.stage import DEFAULT_MAX_DROP, PruneOptions

    try:
        chosen = DEFAULT_MAX_DROP if max_drop is None else max_drop
        return PruneOptions(spec_mod.parse(spec), max_drop=chosen, reconstruct=reconstruct)
    except ValueError as exc:
        raise UserError(f"--prune {spec}: {exc}") from exc


class ConsoleListener:
    """Prints each stage and each pass application as it happens."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def stage(self, name: str) -> None:
        if not self.quiet:
            console.print(f"[bold cyan]>[/] {name}")

    def record(self, record: PassRecord) -> None:
        if self.quiet or not (record.modified or record.verification == "rolled_back"):
            return
        colour = {"passed": "green", "rolled_back": "red"}.get(record.verification, "yellow")
        console.print(
            f"  [{colour}]{record.verification:<11}[/] {record.name:<32} "
            f"nodes {record.nodes_before} -> {record.nodes_after}  "
            f"matches {record.matches}  {record.seconds * 1e3:.0f} ms"
            + (f"\n    [red]{record.reason}[/]" if record.reason else "")
        )


def _summary(report: Report) -> Table:
    table = Table(title="optimization summary", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("optimized", justify="right")
    before, after = report.input_model, report.output_model
    table.add_row("nodes", str(before.nodes), str(after.nodes))
    table.add_row("initializers", str(before.initializers), str(after.initializers))
    table.add_row(
        "file size (MB)", f"{before.size_bytes / 1e6:.2f}", f"{after.size_bytes / 1e6:.2f}"
    )
    if report.latency:
        lat = report.latency
        table.add_row(
            "latency (ms, median)",
            f"{lat['median_ms_original']:.3f}",
            f"{lat['median_ms_optimized']:.3f}  ({lat['ratio']:.2f}x ±{lat['noise']:.2f})",
        )
    if report.quantization:
        check = report.quantization.get("final_check") or {}
        table.add_row("precision", "fp32", f"{report.quantization['precision']}")
        table.add_row("accuracy", "", check.get("summary", ""))
    if report.pruning and report.pruning.get("pruned"):
        for target, total in report.pruning["totals"].items():
            table.add_row(f"pruned {target}", str(total["before"]), str(total["after"]))
        table.add_row("pruning accuracy", "", report.pruning["final_check"]["summary"])
    if report.parity:
        worst = max((o["max_abs_error"] or 0.0 for o in report.parity["outputs"]), default=0.0)
        table.add_row(
            "parity",
            "",
            f"{'pass' if report.parity['passed'] else 'FAIL'} (max abs err {worst:.2e})",
        )
    if report.provider:
        fallback = " (fallback)" if report.provider["fallback"] else ""
        table.add_row("provider", "", f"{report.provider['resolved']}{fallback}")
    return table


def _candidates(report: Report) -> Table | None:
    """``--precision auto``'s measured candidates: what each kept, scored and cost."""
    section = report.quantization or {}
    rows = section.get("candidates") or []
    if not rows:
        return None
    table = Table(
        title=f"auto: candidates measured ({section.get('metric')}, budget "
        f"{section.get('max_drop', 0):.4g} on the drop)",
        header_style="bold",
    )
    for column in ("candidate", "float", "accuracy", "latency", "verdict"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        latency, noise = row.get("latency_ratio"), row.get("noise")
        values = list((row.get("accuracy") or {}).values())
        figures = " / ".join([f"{v:.4f}" for v in values[:1]] + [f"{v:.3f}" for v in values[1:]])
        table.add_row(
            row["precision"] + (" *" if row.get("chosen") else ""),
            "" if row.get("kept_float") is None else str(row["kept_float"]),
            figures if row["precision"] != "fp32" else "",
            "" if latency is None else f"{latency:.2f}x" + (f"±{noise:.2f}" if noise else ""),
            row.get("verdict", ""),
        )
    table.caption = (
        "* chosen. float: nodes kept float by the guard. accuracy (decision data): "
        + " / ".join((next((r["accuracy"] for r in rows if r.get("accuracy")), {}) or {}).keys())
        + "; latency = candidate time / fp32 time (< 1 is faster)"
    )
    return table


@app.command()
def optimize(
    model: Annotated[
        Path | None, typer.Argument(help="Input .onnx model (never modified).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Output path (default: IN.opt.onnx).")
    ] = None,
    report: Annotated[Path | None, typer.Option(help="Write report.json here.")] = None,
    recipe: Annotated[str, typer.Option(help="Bundled recipe name or a .toml file.")] = "default",
    passes: Annotated[
        str | None, typer.Option(help="Comma-separated passes (replaces the recipe's list).")
    ] = None,
    skip_passes: Annotated[
        str | None, typer.Option(help="Comma-separated passes to leave out.")
    ] = None,
    inputs: Annotated[
        Path | None, typer.Option(help="Real input data: a .npz, or a folder of .npz/.npy.")
    ] = None,
    input_shape: Annotated[
        list[str] | None, typer.Option(help="Fix an input's shape: name=1,3,224,224 (repeatable).")
    ] = None,
    rtol: Annotated[float | None, typer.Option(help="Relative tolerance for parity.")] = None,
    atol: Annotated[float | None, typer.Option(help="Absolute tolerance for parity.")] = None,
    output_tol: Annotated[
        list[str] | None,
        typer.Option(help="Per-output tolerance: name=RTOL,ATOL (repeatable)."),
    ] = None,
    verify: Annotated[
        str | None,
        typer.Option(
            help="per-pass | end | auto (verify each pass, or once at the end and bisect)."
        ),
    ] = None,
    speed_check: Annotated[
        bool | None,
        typer.Option(
            "--speed-check/--no-speed-check", help="Time original vs. optimized (default: recipe)."
        ),
    ] = None,
    time_kernels: Annotated[
        bool | None,
        typer.Option(
            "--time-kernels/--no-time-kernels",
            help="Time each contrib fusion against the ops it replaces on this CPU and skip "
            "it where slower (cpu target; default: recipe).",
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Where the model will run: cpu | cuda (ORT contrib ops where a kernel exists) "
            "| portable (standard ONNX only, e.g. for TensorRT). Default: recipe."
        ),
    ] = None,
    portable: Annotated[
        bool, typer.Option(help="Same as --target portable: never emit com.microsoft ops.")
    ] = False,
    raise_opset: Annotated[
        int | None,
        typer.Option(help="Raise the opset up to N when a standard fused op needs it (0: never)."),
    ] = None,
    external_data: Annotated[
        bool | None,
        typer.Option(
            "--external-data/--no-external-data",
            help="Force or forbid external data (default: by size).",
        ),
    ] = None,
    allow_unverified: Annotated[
        bool,
        typer.Option(
            help="Optimize even when ONNX Runtime cannot run the model (checker-only verification)."
        ),
    ] = False,
    keep_initializer_inputs: Annotated[
        bool,
        typer.Option(help="Keep weights that old exporters also listed as graph inputs as inputs."),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for generated inputs.")] = 0,
    provider: Annotated[
        str,
        typer.Option(
            help="cpu | cuda | tensorrt | auto, or an ordered list (tensorrt,cuda,cpu). "
            "Probed for real; one that does not work is an error unless --allow-fallback."
        ),
    ] = "cpu",
    allow_fallback: Annotated[
        bool,
        typer.Option(help="Run on CPU when the requested provider does not work (reported)."),
    ] = False,
    provider_option: Annotated[
        list[str] | None,
        typer.Option(help="Provider option KEY=VALUE, e.g. trt_fp16_enable=1 (repeatable)."),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="fp32 | fp16 | int8-dynamic | int8-static | int8-weight-only | int4 | auto "
            "(fastest tier within "
            "the accuracy budget, measured)."
        ),
    ] = "fp32",
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Real data: a folder of .npz/.npy input sets or .txt files (a sample per "
            "line). It calibrates int8-static and decides the guard; about 1 item in 4 (by "
            "content hash) is held out for the final check."
        ),
    ] = None,
    evaluation: Annotated[
        Path | None,
        typer.Option(help="Held-out data for the final check (then --calibration is not split)."),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="tokenizer.json for .txt data and the LM guard (default: beside the model)."
        ),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            help="What the budget is measured on: cosine | pooled-cosine (sentence "
            "embeddings) | top1 | perplexity (causal LM) | MODULE:FUNCTION (your scorer, "
            "returns a loss). auto: perplexity for a causal LM with a tokenizer, else cosine."
        ),
    ] = "auto",
    calibration_method: Annotated[
        str, typer.Option(help="minmax | entropy | percentile (int8-static).")
    ] = "minmax",
    max_drop: Annotated[
        float | None,
        typer.Option(
            "--max-drop",
            "--max-cosine-drop",
            help="Accuracy budget on --metric: 1 - similarity (cosine, pooled-cosine, top1), "
            "the relative perplexity increase, or a plug-in's loss (default per tier: fp16 "
            "0.001, int8 0.01, int4 0.02; perplexity --max-perplexity-increase).",
        ),
    ] = None,
    exclude_nodes: Annotated[
        str | None, typer.Option(help="Comma-separated node names never quantized.")
    ] = None,
    min_neighbour_agreement: Annotated[
        float,
        typer.Option(
            help="--metric pooled-cosine: share of samples whose nearest other sample must "
            "stay the same (0 turns it off)."
        ),
    ] = 0.95,
    smooth_alpha: Annotated[
        float | None,
        typer.Option(
            help="int8: SmoothQuant strength in (0, 1), e.g. 0.5 (needs --calibration); auto "
            "tries 0.5 by itself."
        ),
    ] = None,
    int4_block_size: Annotated[int, typer.Option(help="int4 MatMulNBits block size.")] = 32,
    int4_algorithm: Annotated[
        str,
        typer.Option(
            help="affine (float block offsets kept, see int4_affine) | rtn | hqq | gptq (int4)."
        ),
    ] = "affine",
    max_perplexity_increase: Annotated[
        float,
        typer.Option(
            help="LM guard (a causal LM with tokenizer.json beside it): perplexity on real "
            "text may grow by this fraction."
        ),
    ] = 0.05,
    min_top1: Annotated[
        float,
        typer.Option(help="LM guard: share of positions where the greedy next token agrees."),
    ] = 0.90,
    prune: Annotated[
        str | None,
        typer.Option(
            help="Structured pruning before quantization: ffn=FRACTION (share of the "
            "feed-forward channels removed, per block by measured importance; needs "
            "--calibration), heads=FRACTION (attention heads of fused Attention), both "
            "(ffn=0.2,heads=0.25), or auto (the largest ffn share within --prune-max-drop)."
        ),
    ] = None,
    prune_max_drop: Annotated[
        float | None,
        typer.Option(
            help="Pruning's budget on --metric's drop against the unpruned model (default "
            "0.03; perplexity: the relative increase)."
        ),
    ] = None,
    prune_reconstruct: Annotated[
        bool,
        typer.Option(
            "--prune-reconstruct/--no-prune-reconstruct",
            help="Refit each down projection by least squares on calibration activations.",
        ),
    ] = True,
    list_passes: Annotated[
        bool, typer.Option(help="List registered passes and recipes, then exit.")
    ] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print only the summary.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks and debug logs.")] = False,
) -> None:
    """Optimize an ONNX model with verified graph passes.

    Exit codes: 0 ok, 1 verification failed, 2 bad input or usage, 3 internal error.
    """
    from graph_passes.registry import FUSIONS_GROUP, REGISTRY, default_fusions
    from pipeline.recipe import bundled_recipe_names, load_recipe
    from pipeline.run import RunOptions, run
    from pipeline.runtime import inputs as inputs_mod

    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s"
    )
    if list_passes:
        for name, cls in sorted(REGISTRY.items()):
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            typer.echo(f"{name:<34} {doc}")
        typer.echo(f"{FUSIONS_GROUP} (recipe entry): " + ", ".join(default_fusions()))
        typer.echo("recipes: " + ", ".join(bundled_recipe_names()))
        raise typer.Exit(0)
    sink: list[Report] = []
    code = 0
    try:
        if model is None:
            raise UserError("missing input model: optimize.py IN.onnx -o OUT.onnx")
        if report is not None:
            check_report_path(report)
        chosen = load_recipe(recipe).with_overrides(
            passes=_split(passes),
            skip_passes=_split(skip_passes),
            rtol=rtol,
            atol=atol,
            verify_mode=verify,
            speed_check=speed_check,
            time_kernels=time_kernels,
            target=_pick_target(target, portable),
            raise_opset_to=raise_opset,
        )
        options = RunOptions(
            input_path=model,
            output_path=output or model.with_name(model.stem + ".opt.onnx"),
            recipe=chosen,
            inputs_path=inputs,
            input_shapes=inputs_mod.parse_shape_overrides(input_shape),
            output_tolerances=_parse_output_tolerances(output_tol, chosen),
            external_data=external_data,
            allow_unverified=allow_unverified,
            keep_initializer_inputs=keep_initializer_inputs,
            seed=seed,
            provider=_provider_request(provider, allow_fallback, provider_option, target, portable),
            quantize=_quantize_options(
                provider,
                precision=precision,
                calibration=calibration,
                evaluation=evaluation,
                tokenizer=tokenizer,
                metric=metric,
                calibration_method=calibration_method,
                max_drop=max_drop,
                exclude_nodes=tuple(_split(exclude_nodes) or ()),
                int4_block_size=int4_block_size,
                int4_algorithm=int4_algorithm,
                smooth_alpha=smooth_alpha,
                min_neighbour_agreement=min_neighbour_agreement,
                lm_budget=(max_perplexity_increase, min_top1),
            ),
            prune=_prune_options(prune, prune_max_drop, prune_reconstruct),
        )
        result = run(options, sink, ConsoleListener(quiet))
        candidates = _candidates(result)
        if candidates is not None:
            console.print(candidates)
        console.print(_summary(result))
        for warning in result.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        for name, reason in result.rolled_back.items():
            console.print(f"[red]rolled back:[/] {name}: {reason}")
        console.print(f"[green]wrote[/] {options.output_path}")
    except (UserError, VerificationFailed) as exc:
        if debug:
            console.print_exception()
        code = exc.exit_code
        label = "error" if code == EXIT_BAD_INPUT else "verification failed"
        console.print(f"[red]{label}:[/] {exc}", soft_wrap=True)
        if sink:
            sink[0].status = "error" if code == EXIT_BAD_INPUT else "verification_failed"
            sink[0].exit_code, sink[0].message = code, str(exc)
    except Exception as exc:  # a bug in this project: say so in one line, write nothing
        if debug:
            console.print_exception()
        code = EXIT_INTERNAL_ERROR
        console.print(f"[red]internal error:[/] {type(exc).__name__}: {exc} (re-run with --debug)")
        if sink:
            sink[0].status, sink[0].exit_code, sink[0].message = "error", code, str(exc)
    if report is not None and sink:
        try:
            write_report(sink[0], report)
        except UserError as exc:
            console.print(f"[red]error:[/] {exc}")
            code = code or EXIT_BAD_INPUT
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point; ``optimize.py bench ...`` is the benchmark harness."""
    if sys.argv[1:2] == ["bench"]:
        from pipeline.bench.cli import main as bench_main

        bench_main(sys.argv[2:])
        return
    try:
        app()
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]; nothing was written")
        sys.exit(130)
