"""``python optimize.py bench MODEL [MODEL2 ...]``: the benchmark harness's command line.

``optimize.py``'s main command takes the model as its first argument, so ``bench`` is
dispatched on ``argv[1]`` (``pipeline.cli.main``) rather than made a typer subcommand, which
would change how ``optimize.py IN.onnx -o OUT.onnx`` parses. A model file literally named
``bench`` can still be optimized as ``./bench``. Exit codes as for ``optimize``: 0 ok,
2 bad input or usage (including a provider that does not work), 3 internal error.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.runtime.errors import EXIT_INTERNAL_ERROR, UserError
from pipeline.runtime.timing import speed_words
from pipeline.summary import size_text

# Wide enough for the tables when stderr is a file or a pipe (rich assumes 80 columns there).
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
# Click's plain help: whole option names at 80 columns (rich's panels cut them).
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise UserError(f"{flag} expects positive integers like 1,8,32, got '{text}'")
    return values


def _dims(texts: list[str] | None) -> dict[str, int]:
    dims = {}
    for text in texts or []:
        name, sep, size = text.partition("=")
        if not sep or not name or not size.strip().isdigit() or int(size) < 1:
            raise UserError(f"--dim expects SYMBOL=SIZE, got '{text}'")
        dims[name.strip()] = int(size)
    return dims


def _threads(threads: dict) -> str:
    given = threads.get("intra_op_threads")
    return f"{given} threads" if given else f"ORT default threads ({threads['usable_cores']} cores)"


def result_tables(result: dict) -> list[Table]:
    """Rich tables: one for the models, one per batch size (titled with the input shapes
    and threads it was measured at)."""
    models = Table(title="models (sizes in decimal units: 1 MB = 10^6 bytes)", header_style="bold")
    for column in ("model", "size", "session s", "peak RSS", "model RSS", "GPU memory"):
        models.add_column(column, justify="left" if column == "model" else "right")
    for model in result["models"]:
        models.add_row(
            model["label"],
            size_text(model["size_bytes"]),
            f"{model['session_seconds']:.3f}",
            size_text(model["peak_rss_bytes"]),
            size_text(model["model_rss_bytes"]),
            size_text(model["gpu_memory_bytes"]),
        )
    tables = [models]
    for batch in result["batches"]:
        shapes = ", ".join(
            f"{name}[{','.join(map(str, spec['shape']))}]"
            for name, spec in (batch.get("inputs") or {}).items()
        )
        table = Table(
            title=f"{batch['case']}: {shapes or 'batch ' + str(batch['batch'])}; "
            f"{_threads(result['threads'])}; {batch['runs_per_sample']} runs per sample",
            header_style="bold",
        )
        for column in ("model", "p50 ms", "p90 ms", "p99 ms", "items/s", "ratio", "verdict"):
            table.add_column(column, justify="left" if column in ("model", "verdict") else "right")
        versus = {c["model"]: c for c in batch["comparisons"]}
        for label, lat in batch["latency"].items():
            comp = versus.get(label)
            table.add_row(
                label,
                f"{lat['p50_ms']:.3f}",
                f"{lat['p90_ms']:.3f}",
                f"{lat['p99_ms']:.3f}",
                f"{lat['throughput_per_s']:.1f}",
                f"{comp['ratio']:.3f} ±{comp['noise']:.3f}" if comp else "baseline",
                speed_words(comp["ratio"], comp["noise"], comp["verdict"]) if comp else "",
            )
        table.caption = "ratio: model / baseline time per round (median), < 1 is faster"
        tables.append(table)
    return tables


@app.command()
def bench(
    models: Annotated[list[Path], typer.Argument(help="Models; the first is the baseline.")],
    provider: Annotated[
        str, typer.Option(help="cpu | cuda | tensorrt | auto, or an ordered list.")
    ] = "cpu",
    allow_fallback: Annotated[
        bool, typer.Option(help="Run on CPU when the requested provider does not work.")
    ] = False,
    provider_option: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE, e.g. io_binding=1, trt_fp16_enable=1 (repeatable)."),
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes, e.g. 1,8,32.")] = "1",
    rounds: Annotated[int, typer.Option(help="Interleaved rounds per batch size.")] = 20,
    warmup: Annotated[int, typer.Option(help="Warm-up runs per model per batch size.")] = 5,
    min_sample_ms: Annotated[
        float, typer.Option(help="A sample repeats runs until it lasts this long.")
    ] = 20.0,
    inputs: Annotated[
        Path | None, typer.Option(help="Real inputs (.npz or folder); batch sizes then ignored.")
    ] = None,
    dim: Annotated[
        list[str] | None,
        typer.Option(help="Size of a symbolic dim: SYMBOL=SIZE, e.g. sequence=64 (repeatable)."),
    ] = None,
    intra_op_threads: Annotated[
        int | None, typer.Option(help="ORT intra-op threads (default: ORT's).")
    ] = None,
    inter_op_threads: Annotated[
        int | None, typer.Option(help="ORT inter-op threads (default: ORT's).")
    ] = None,
    optimization: Annotated[
        str, typer.Option(help="ORT graph optimization: disable_all|basic|extended|all.")
    ] = "all",
    placement: Annotated[
        bool | None,
        typer.Option("--placement/--no-placement", help="Profile node placement (default: GPU)."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for generated inputs.")] = 0,
    debug: Annotated[bool, typer.Option(help="Show tracebacks and debug logs.")] = False,
) -> None:
    """Benchmark models side by side: interleaved rounds, p50/p90/p99, throughput, memory.

    Ratios are model / first model per round (median, 95% CI); a difference is only claimed
    when it exceeds the measured noise.
    """
    from pipeline.bench.harness import BenchConfig, run_bench, write_json
    from pipeline.providers import ProviderRequest, parse_provider_options
    from pipeline.runtime.sessions import OPT_LEVELS

    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s"
    )
    code = 0
    try:
        if optimization not in OPT_LEVELS:
            raise UserError(f"--optimization must be one of {', '.join(OPT_LEVELS)}")
        request = ProviderRequest(provider, allow_fallback, parse_provider_options(provider_option))
        request.names  # noqa: B018 - validates the provider list now
        config = BenchConfig(
            models=list(models),
            batch_sizes=_ints(batch_sizes, "--batch-sizes"),
            rounds=rounds,
            warmup=warmup,
            min_sample_seconds=min_sample_ms / 1e3,
            inputs_path=inputs,
            dims=_dims(dim),
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            optimization=optimization,
            provider=request,
            placement=placement,
            seed=seed,
        )
        result = run_bench(config, progress=lambda text: console.print(f"[cyan]>[/] {text}"))
        for table in result_tables(result):
            console.print(table)
        for note in result["notes"]:
            console.print(f"[yellow]note:[/] {note}")
        if json_out is not None:
            write_json(result, json_out)
            console.print(f"[green]wrote[/] {json_out}")
    except UserError as exc:
        if debug:
            console.print_exception()
        code = exc.exit_code
        console.print(f"[red]error:[/] {exc}", soft_wrap=True)
    except Exception as exc:
        if debug:
            console.print_exception()
        code = EXIT_INTERNAL_ERROR
        console.print(f"[red]internal error:[/] {type(exc).__name__}: {exc} (re-run with --debug)")
    raise typer.Exit(code)


def main(argv: list[str]) -> None:
    """Run ``bench`` with ``argv`` (the words after ``optimize.py bench``)."""
    app(args=argv, prog_name="optimize.py bench")
