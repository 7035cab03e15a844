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
from rich.markup import escape

from pipeline.pass_manager import PassRecord
from pipeline.providers import (
    ProviderRequest,
    parse_provider_options,
    quantization_device,
    required_target,
)
from pipeline.recipe import Recipe
from pipeline.render import console as render_console
from pipeline.render.live import LiveProgress
from pipeline.report import Report, check_report_paths, write_reports
from pipeline.runtime import sessions
from pipeline.runtime.compare import Tolerance
from pipeline.runtime.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL_ERROR,
    UserError,
    VerificationFailed,
)

console = Console(stderr=True)
# Click's plain help: whole option names at 80 columns (rich's panels cut them).
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


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
    """Prints each stage and each pass application as it happens, and moves the live
    progress line when there is one."""

    def __init__(self, quiet: bool, live: LiveProgress | None) -> None:
        self.quiet = quiet
        self.live = live
        self._header = False

    def stage(self, name: str) -> None:
        if self.live is not None:
            self.live.stage(name)
        if not self.quiet:
            console.print(f"[bold cyan]>[/] {escape(name)}", soft_wrap=True)

    def record(self, record: PassRecord) -> None:
        if self.quiet or not (record.modified or record.verification == "rolled_back"):
            return
        if not self._header:  # 78 columns, as the lines below
            console.print(
                f"[dim]  {'check':<11} {'pass':<31} {'nodes':^16} {'matches':>7} {'time':>7}[/]",
                soft_wrap=True,
            )
            self._header = True
        colour = {"passed": "green", "rolled_back": "red"}.get(record.verification, "yellow")
        console.print(
            f"  [{colour}]{record.verification:<11}[/] {record.name:<31} "
            f"{record.nodes_before:>6} -> {record.nodes_after:<6} {record.matches:>7} "
            f"{record.seconds * 1e3:>4.0f} ms"
            + (f"\n    [red]{escape(record.reason)}[/]" if record.reason else ""),
            soft_wrap=True,
        )


class WarningLog(logging.Handler):
    """Warnings logged during the run (by this project or a library, Python ``warnings``
    included), kept to be printed once, one line each, with the report's own warnings:
    several modules log a warning they also put in the report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().strip()
        if record.name == "py.warnings":  # "file:line: Category: message\n  source line"
            text = text.splitlines()[0].split(": ", 1)[-1] if text else text
        self.lines.append(" ".join(text.split()))


def _setup_logging(debug: bool) -> WarningLog | None:
    """``--debug``: every log line as it comes, ONNX Runtime's own log included. Otherwise
    warnings are collected (``WarningLog``) and ONNX Runtime's log is silenced: its error
    lines repeat, with ANSI colours, what our one-line message says."""
    sessions.silence_onnxruntime_log(not debug)
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
        return None
    collected = WarningLog()
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    root.addHandler(collected)
    logging.captureWarnings(True)
    return collected


def _print_warnings(report: Report | None, logged: WarningLog | None) -> None:
    lines = (report.warnings if report else []) + (logged.lines if logged else [])
    for line in dict.fromkeys(lines):  # once each, in order
        console.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True)


def _list_passes() -> None:
    """The passes, those of the default recipe first in the order they run, with the first
    paragraph of each docstring wrapped to 80 columns."""
    import inspect
    import textwrap

    from graph_passes.registry import REGISTRY
    from pipeline.recipe import bundled_recipe_names, load_recipe

    def line(mark: str, name: str) -> str:
        doc = inspect.getdoc(REGISTRY[name]) or ""
        text = " ".join(doc.split("\n\n")[0].split()).replace("``", "")
        head = f"{mark:>3} {name:<31} "
        return (
            textwrap.fill(text, 79, initial_indent=head, subsequent_indent=" " * len(head))
            if text
            else head.rstrip()
        )

    default = load_recipe("default").passes
    typer.echo("Passes of the default recipe, in the order they run:")
    for index, name in enumerate(default, 1):
        typer.echo(line(str(index), name))
    others = sorted(set(REGISTRY) - set(default))
    if others:
        typer.echo("Other passes (name them in --passes or a recipe file):")
        for name in others:
            typer.echo(line("", name))
    typer.echo("Recipes: " + ", ".join(bundled_recipe_names()) + " (--recipe NAME or FILE.toml)")


# Click keeps the lines of a paragraph marked \b as written: each fits 78 columns.
EPILOG = """\b
Reports: --report r.json --report r.md --report r.html writes each
format (the suffix picks it); every path is checked before any work.
\b
Providers: cpu, cuda (or gpu), tensorrt (or trt), auto (the first that
works of tensorrt, cuda, cpu), or an ordered list: tensorrt,cuda,cpu.
\b
Benchmark: optimize.py bench BASE.onnx CANDIDATE.onnx [...] times models
side by side (optimize.py bench --help).
\b
Exit codes: 0 ok, 1 verification failed, 2 bad input or usage,
3 internal error."""


@app.command(epilog=EPILOG)
def optimize(
    model: Annotated[
        Path | None, typer.Argument(metavar="MODEL", help="Input .onnx model (never modified).")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", metavar="PATH", help="Output path (default: IN.opt.onnx)."),
    ] = None,
    report: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="PATH",
            help="Write the report here: .json, .md or .html by suffix (repeatable).",
        ),
    ] = None,
    recipe: Annotated[
        str, typer.Option(metavar="NAME|FILE", help="Bundled recipe name or a .toml file.")
    ] = "default",
    passes: Annotated[
        str | None,
        typer.Option(metavar="A,B", help="Passes to run (replaces the recipe's list)."),
    ] = None,
    skip_passes: Annotated[
        str | None, typer.Option(metavar="A,B", help="Passes to leave out.")
    ] = None,
    inputs: Annotated[
        Path | None,
        typer.Option(metavar="PATH", help="Real input data: a .npz, or a folder of .npz/.npy."),
    ] = None,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=DIMS", help="Fix an input's shape: x=1,3,224,224 (repeatable)."),
    ] = None,
    rtol: Annotated[
        float | None, typer.Option(metavar="X", help="Relative tolerance for parity.")
    ] = None,
    atol: Annotated[
        float | None, typer.Option(metavar="X", help="Absolute tolerance for parity.")
    ] = None,
    output_tol: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=RTOL,ATOL", help="Tolerance for one output (repeatable)."),
    ] = None,
    verify: Annotated[
        str | None,
        typer.Option(
            metavar="MODE",
            help="per-pass | end | auto (verify each pass, or once at the end and bisect).",
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
    retime: Annotated[
        bool,
        typer.Option(
            "--retime",
            help="Time the fusions again instead of reusing this machine's stored kernel "
            "timings, and store the new ones.",
        ),
    ] = False,
    target: Annotated[
        str | None,
        typer.Option(
            metavar="TARGET",
            help="Where the model will run: cpu | cuda (ORT contrib ops where a kernel exists) "
            "| portable (standard ONNX only, e.g. for TensorRT). Default: recipe.",
        ),
    ] = None,
    portable: Annotated[
        bool,
        typer.Option("--portable", help="Same as --target portable: never emit com.microsoft ops."),
    ] = False,
    raise_opset: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Raise the opset up to N when a standard fused op needs it (0: never).",
        ),
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
            "--allow-unverified",
            help="Optimize even when ONNX Runtime cannot run the model (checker-only "
            "verification).",
        ),
    ] = False,
    keep_initializer_inputs: Annotated[
        bool,
        typer.Option(
            "--keep-initializer-inputs",
            help="Keep weights that old exporters also listed as graph inputs as inputs.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed for generated inputs.")] = 0,
    provider: Annotated[
        str,
        typer.Option(
            metavar="NAME[,NAME]",
            help="cpu | cuda (or gpu) | tensorrt (or trt) | auto, or an ordered list "
            "(tensorrt,cuda,cpu). Probed for real; one that does not work is an error unless "
            "--allow-fallback.",
        ),
    ] = "cpu",
    allow_fallback: Annotated[
        bool,
        typer.Option(
            "--allow-fallback",
            help="Run on CPU when the requested provider does not work (reported).",
        ),
    ] = False,
    provider_option: Annotated[
        list[str] | None,
        typer.Option(
            metavar="KEY=VALUE", help="Provider option, e.g. trt_fp16_enable=1 (repeatable)."
        ),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            metavar="TIER",
            help="fp32 | fp16 | int8-dynamic | int8-static | int8-weight-only | int4 | auto "
            "(the fastest tier within the accuracy budget, measured).",
        ),
    ] = "fp32",
    calibration: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Real data: a folder of .npz/.npy input sets or .txt files (a sample per "
            "line). It calibrates int8-static and decides the guard; about 1 item in 4 (by "
            "content hash) is held out for the final check.",
        ),
    ] = None,
    evaluation: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Held-out data for the final check (then --calibration is not split).",
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="tokenizer.json for .txt data and the LM guard (default: beside the model).",
        ),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            metavar="NAME",
            help="What the budget is measured on: cosine | pooled-cosine (sentence "
            "embeddings) | top1 | perplexity (causal LM) | MODULE:FUNCTION (your scorer, "
            "returns a loss). auto: perplexity for a causal LM with a tokenizer, else cosine.",
        ),
    ] = "auto",
    calibration_method: Annotated[
        str,
        typer.Option(metavar="NAME", help="minmax | entropy | percentile (int8-static)."),
    ] = "minmax",
    max_drop: Annotated[
        float | None,
        typer.Option(
            "--max-drop",
            "--max-cosine-drop",
            metavar="X",
            help="Accuracy budget on --metric: 1 - similarity (cosine, pooled-cosine, top1), "
            "the relative perplexity increase, or a plug-in's loss (default per tier: fp16 "
            "0.001, int8 0.01, int4 0.02; perplexity: --max-perplexity-increase).",
        ),
    ] = None,
    exclude_nodes: Annotated[
        str | None, typer.Option(metavar="A,B", help="Node names never quantized.")
    ] = None,
    min_neighbour_agreement: Annotated[
        float,
        typer.Option(
            metavar="X",
            help="--metric pooled-cosine: share of samples whose nearest other sample must "
            "stay the same (0 turns it off).",
        ),
    ] = 0.95,
    smooth_alpha: Annotated[
        float | None,
        typer.Option(
            metavar="X",
            help="int8: SmoothQuant strength in (0, 1), e.g. 0.5 (needs --calibration); auto "
            "tries 0.5 by itself.",
        ),
    ] = None,
    int4_block_size: Annotated[
        int, typer.Option(metavar="N", help="int4 MatMulNBits block size.")
    ] = 32,
    int4_algorithm: Annotated[
        str,
        typer.Option(
            metavar="NAME",
            help="affine (block offsets kept, see int4_affine) | rtn | hqq | gptq (int4).",
        ),
    ] = "affine",
    max_perplexity_increase: Annotated[
        float,
        typer.Option(
            metavar="X",
            help="LM guard (a causal LM with tokenizer.json beside it): perplexity on real "
            "text may grow by this fraction.",
        ),
    ] = 0.05,
    min_top1: Annotated[
        float,
        typer.Option(
            metavar="X", help="LM guard: share of positions where the greedy next token agrees."
        ),
    ] = 0.90,
    prune: Annotated[
        str | None,
        typer.Option(
            metavar="SPEC",
            help="Structured pruning before quantization: ffn=FRACTION (share of the "
            "feed-forward channels removed, per block by measured importance; needs "
            "--calibration), heads=FRACTION (attention heads of fused Attention), "
            "layers=N (the N whole layers of least measured influence), sparse=2:4 "
            "(2 of every 4 MatMul weights zeroed, for TensorRT's sparse kernels), several "
            "(layers=2,ffn=0.2,sparse=2:4: layers first, sparse last), or auto (the "
            "largest ffn share within --prune-max-drop).",
        ),
    ] = None,
    prune_max_drop: Annotated[
        float | None,
        typer.Option(
            metavar="X",
            help="Pruning's budget on --metric's drop against the unpruned model (default "
            "0.03; perplexity: the relative increase).",
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
        bool,
        typer.Option(
            "--list-passes", help="List the passes (default recipe marked) and recipes, then exit."
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("-q", "--quiet", help="Print only the summary and warnings.")
    ] = False,
    live: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="A live progress line for long stages (default: on a terminal, unless -q).",
        ),
    ] = None,
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Show tracebacks, debug logs and ONNX Runtime's own log."),
    ] = False,
) -> None:
    """Optimize an ONNX model with verified graph passes.

    Every pass is checked against the original model's outputs; a pass that breaks them is
    rolled back. The result is written only when it is as correct as the original and not
    slower.
    """
    if list_passes:
        _list_passes()
        raise typer.Exit(0)
    logged = _setup_logging(debug)
    reports = list(report or [])
    sink: list[Report] = []
    code = 0
    try:
        if model is None:
            raise UserError("missing input model: optimize.py IN.onnx -o OUT.onnx")
        output_path = output or model.with_name(model.stem + ".opt.onnx")
        check_report_paths(reports, (model, output_path))
        options = _run_options(
            model,
            output_path,
            recipe=recipe,
            passes=passes,
            skip_passes=skip_passes,
            rtol=rtol,
            atol=atol,
            verify=verify,
            speed_check=speed_check,
            time_kernels=time_kernels,
            retime=retime,
            target=target,
            portable=portable,
            raise_opset=raise_opset,
            inputs=inputs,
            input_shape=input_shape,
            output_tol=output_tol,
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
        result = _run_with_display(options, sink, quiet, live)
        data = result.to_dict()
        table = render_console.candidates(data)
        if table is not None:
            console.print(table)
        console.print(render_console.summary(data))
        _print_warnings(result, logged)
        for name, reason in result.rolled_back.items():
            console.print(f"[red]rolled back:[/] {name}: {escape(reason)}", soft_wrap=True)
        console.print(
            f"[green]wrote[/] {escape(str(options.output_path))} "
            f"({result.seconds.get('total', 0.0):.1f} s)",
            soft_wrap=True,
        )
    except (UserError, VerificationFailed) as exc:
        if debug:
            console.print_exception()
        code = exc.exit_code
        _print_warnings(sink[0] if sink else None, logged)
        label = "error" if code == EXIT_BAD_INPUT else "verification failed"
        console.print(f"[red]{label}:[/] {escape(str(exc))}", soft_wrap=True)
        if sink:
            sink[0].status = "error" if code == EXIT_BAD_INPUT else "verification_failed"
            sink[0].exit_code, sink[0].message = code, str(exc)
    except Exception as exc:  # a bug in this project: say so in one line, write nothing
        if debug:
            console.print_exception()
        code = EXIT_INTERNAL_ERROR
        console.print(
            f"[red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} "
            "(re-run with --debug)",
            soft_wrap=True,
        )
        if sink:
            sink[0].status, sink[0].exit_code, sink[0].message = "error", code, str(exc)
    if reports and sink:
        try:
            write_reports(sink[0], reports)
            console.print("report: " + ", ".join(escape(str(p)) for p in reports), soft_wrap=True)
        except UserError as exc:
            console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            code = code or EXIT_BAD_INPUT
    raise typer.Exit(code)


def _run_options(model: Path, output_path: Path, **given):
    """The RunOptions for ``pipeline.run``, every value validated (UserError otherwise)."""
    from pipeline.recipe import load_recipe
    from pipeline.run import RunOptions
    from pipeline.runtime import inputs as inputs_mod

    chosen = load_recipe(given["recipe"]).with_overrides(
        passes=_split(given["passes"]),
        skip_passes=_split(given["skip_passes"]),
        rtol=given["rtol"],
        atol=given["atol"],
        verify_mode=given["verify"],
        speed_check=given["speed_check"],
        time_kernels=given["time_kernels"],
        retime=given["retime"] or None,
        target=_pick_target(given["target"], given["portable"]),
        raise_opset_to=given["raise_opset"],
    )
    if chosen.speed.retime and not chosen.speed.time_kernels:
        raise UserError(
            "--retime needs kernel timing, which --no-time-kernels (or the recipe) turns off"
        )
    return RunOptions(
        input_path=model,
        output_path=output_path,
        recipe=chosen,
        inputs_path=given["inputs"],
        input_shapes=inputs_mod.parse_shape_overrides(given["input_shape"]),
        output_tolerances=_parse_output_tolerances(given["output_tol"], chosen),
        external_data=given["external_data"],
        allow_unverified=given["allow_unverified"],
        keep_initializer_inputs=given["keep_initializer_inputs"],
        seed=given["seed"],
        provider=given["provider"],
        quantize=given["quantize"],
        prune=given["prune"],
    )


def _run_with_display(options, sink: list[Report], quiet: bool, live: bool | None) -> Report:
    """``pipeline.run`` with the stage log and, on a terminal (or when asked), the live
    progress line; ``-q`` shows neither."""
    from pipeline.run import run

    if quiet or not (console.is_terminal if live is None else live):
        return run(options, sink, ConsoleListener(quiet, None))
    # Asked for on a pipe: the live line needs a terminal's control codes, so it gets them.
    screen = console if console.is_terminal else Console(stderr=True, force_terminal=True)
    with LiveProgress(screen) as progress_line:
        return run(options, sink, ConsoleListener(quiet, progress_line))


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
