"""The prune stage: structured pruning of the verified fp32 model, held to the metric.

It runs after the verified graph passes and before quantization (``pipeline/run.py``), so it
sees the fused graph (``BiasGelu``, packed gate/up + ``Split``) and quantization sees the
pruned one. Parity cannot hold after pruning, so the model is held instead to the user's
accuracy budget, measured exactly as quantization measures it (``quantization.metrics`` and
``lm_guard``, on the data roles of ``quantization.data``):

1. find the blocks of each target by structure (``ffn``: feed-forward channels; ``heads``:
   heads of the fused Attention op; ``layers``: whole residual layers); a model with none
   is the user's error, in one line;
2. ``layers=N``: cut each layer alone and score it on the decision data (its influence),
   and cut the ``N`` of least influence (``layers``); the shares below apply to the rest;
3. run the model once over the calibration data and keep each block's activation moments
   (``moments``); a causal LM scored on perplexity is calibrated on windows of its
   calibration text;
4. score channels (a head: its channels' sum) and share them out between blocks
   (``importance``), refit each down projection on what is kept (``reconstruct``, unless
   turned off);
5. ``ffn=F`` / ``heads=F`` prune those shares; ``auto`` scores candidates on the decision
   data and keeps the largest ``ffn`` share on a grid of ``STEP`` within the budget,
   doubling then bisecting as the quantization guard does (``largest_within``);
6. ``sparse=2:4`` last, on what the targets above left: the 2:4 pattern on every eligible
   MatMul/Gemm weight, chosen by the input-channel norms on the calibration data
   (``sparse``), and checked on the saved model;
7. check that the pruned model runs on every verification input set with the same outputs
   (names, shapes, types), time it against the unpruned model (interleaved, the one A/B
   timer), and score it on the held-out evaluation data, which no decision saw: the final
   check that fails the run when the budget is missed.

The budget (``max_drop``) is on the drop against the UNPRUNED model; a quantization after
it is held to its own budget against the pruned model, so the two drops add up.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from graph_passes.match import all_names
from pipeline import lm_quality
from pipeline.pruning import ffn, heads, importance, layers, moments, reconstruct, sparse
from pipeline.pruning.graph import Rewrite
from pipeline.pruning.spec import PruneSpec
from pipeline.quantization import data
from pipeline.quantization import stage as quantize_stage
from pipeline.quantization.exclusions import budget_row, first_flip
from pipeline.quantization.lm_guard import LENGTH
from pipeline.runtime.errors import UserError, VerificationFailed
from pipeline.runtime.sessions import create_session, delete_saved, save_self_contained
from pipeline.runtime.timing import compare_latency

logger = logging.getLogger(__name__)

DEFAULT_MAX_DROP = 0.03
STEP = 0.05  # ``auto`` tries shares of the FFN channels on this grid ...
MAX_AUTO_FRACTION = 0.9  # ... up to this share
CALIBRATION_WINDOWS = 16  # a causal LM's moments: windows of LENGTH tokens of its text


@dataclass(frozen=True)
class PruneOptions:
    """What to prune and the budget the result must keep.

    Attributes:
        spec: The targets (``spec.parse``): ``layers=N``, ``ffn=F``, ``heads=F``, any of
            them together, or ``auto``.
        max_drop: Budget on the metric's drop against the unpruned model (``1 - similarity``;
            for perplexity, the relative increase, with the top-1 floor of the LM budget).
        reconstruct: Refit each down projection by least squares (``reconstruct``).
        latency_rounds: Interleaved rounds timing the pruned model against the unpruned one.
    """

    spec: PruneSpec
    max_drop: float = DEFAULT_MAX_DROP
    reconstruct: bool = True
    latency_rounds: int = 15

    def __post_init__(self) -> None:
        if not 0 <= self.max_drop < 10:
            raise ValueError(f"prune max drop must be in [0, 10), got {self.max_drop}")


@dataclass
class Point:
    """One candidate measured: ``fraction`` of the FFN channels asked to go, and its score."""

    fraction: float
    score: object  # metrics.Score or lm_guard.LmAccuracy

    def to_dict(self, budget: float) -> dict:
        return {"fraction": self.fraction, **budget_row(self.score, budget)}


FINDERS = {"ffn": ffn, "heads": heads}  # target -> module with find_blocks and prune
NOT_FOUND = {
    "ffn": "no feed-forward block found in this model (MatMul with a constant weight -> "
    "activation -> MatMul with a constant weight); nothing can be pruned",
    "heads": "no prunable attention found (ONNX Runtime's fused Attention op with constant "
    "packed Q/K/V weights, read by one MatMul; see pipeline/pruning/heads.py)",
    "layers": "no residual layer found (a MatMul with a constant weight whose output is "
    "added to the residual stream; see pipeline/pruning/layers.py)",
    "sparse": "no weight takes the 2:4 pattern (a MatMul or Gemm with a constant 2-D float "
    "weight, reduction dimension a multiple of 4, not producing a graph output; see "
    "pipeline/pruning/sparse.py)",
}


def find_blocks(model: ir.Model, targets) -> list[tuple[str, object]]:
    """(target, block) for every block of the ``targets``, target by target in graph order."""
    return [(target, block) for target in targets for block in FINDERS[target].find_blocks(model)]


def check(
    model: ir.Model, accuracy: quantize_stage.QuantizeOptions, spec: PruneSpec, fused: bool
) -> None:
    """Before any work: the model has blocks of each target to prune, and there is real data
    to measure importance on (a causal LM scored on perplexity has its text). Attention
    heads are found on the fused graph only: before the passes (``fused`` False) only the
    feed-forward blocks and the layers are looked for. ``layers=N`` must leave a layer."""
    for target in spec.shares:
        if (fused or target == "ffn") and not FINDERS[target].find_blocks(model):
            raise UserError(f"--prune {target}: {NOT_FOUND[target]}")
    if spec.layers:
        count = len(layers.find_layers(model))
        if not count:
            raise UserError(f"--prune layers: {NOT_FOUND['layers']}")
        if spec.layers >= count:
            raise UserError(
                f"--prune layers={spec.layers}: the model has {count} layer(s); at most "
                f"{count - 1} can be removed"
            )
    if spec.sparse and not sparse.find_weights(model)[0]:
        raise UserError(f"--prune sparse: {NOT_FOUND['sparse']}")
    names = [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]
    try:
        metric = accuracy.metric_for(*names)
    except ValueError as exc:
        raise UserError(f"--prune: --metric {accuracy.metric}: {exc}") from exc
    if metric.from_feeds and accuracy.calibration is None:
        raise UserError(
            "--prune needs real data (--calibration DIR): channel importance is measured "
            "on activations, and random inputs say nothing about real ones"
        )


def largest_within(
    limit: int, measure: Callable[[int], Point], budget: float
) -> tuple[Point | None, list[Point]]:
    """The largest level in 1..``limit`` whose candidate is within ``budget``, and every
    point measured (None when level 1 misses): the quantization guard's doubling and
    bisection (``exclusions.first_flip``) for the first level that misses, assuming accuracy
    only falls as the level rises, up to measurement noise."""
    points: dict[int, Point] = {}

    def misses(level: int) -> bool:
        points[level] = measure(level)
        return not points[level].score.within(budget)

    missed = first_flip(limit, misses)
    chosen = limit if missed is None else missed - 1
    return points.get(chosen), [points[k] for k in sorted(points)]


class _Pruner:
    """The unpruned model, its blocks and their moments: builds a candidate per share."""

    def __init__(self, model: ir.Model, blocks, stats: moments.Moments, refit: bool) -> None:
        self.model, self.blocks, self.stats, self.reconstruct = model, blocks, stats, refit
        self.scores = [  # per unit: a channel (ffn) or the sum over a head's channels
            importance.channel_scores(gram, block.down_weight(), centered=refit)
            .reshape(block.units, -1)
            .sum(axis=1)
            for gram, (_, block) in zip(stats.grams, blocks, strict=True)
        ]

    def build(self, shares: dict[str, float]) -> tuple[ir.Model, list[dict]]:
        """The model with each target's share of its units removed, and one row per block."""
        keeps: list[np.ndarray] = [np.empty(0)] * len(self.blocks)
        for target, share in shares.items():
            mine = [i for i, (t, _) in enumerate(self.blocks) if t == target]
            scores = [self.scores[i] for i in mine]
            chosen = importance.allocate(scores, self.stats.residual[mine], share)
            for i, keep in zip(mine, chosen, strict=True):
                keeps[i] = keep
        pruned = self.model.clone()
        rewrite = Rewrite(pruned.graph, all_names(pruned))
        rows = []
        blocks = find_blocks(pruned, shares)
        for (target, block), gram, units in zip(blocks, self.stats.grams, keeps, strict=True):
            keep, weight = block.channels(units), block.down_weight()
            row = {
                "target": target,
                "block": block.name,
                "activation": block.activation,
                "units": block.units,
                "kept": len(units),
                "removed": block.units - len(units),
                "block_error_removed": reconstruct.relative_error(
                    gram, weight, keep, weight[keep], None
                ),
            }
            new_weight, intercept = weight[keep], None
            if self.reconstruct:
                new_weight, intercept = reconstruct.refit(gram, weight, keep)
                row["block_error_refit"] = reconstruct.relative_error(
                    gram, weight, keep, new_weight, intercept
                )
            FINDERS[target].prune(rewrite, block, units, new_weight, intercept)
            rows.append(row)
        rewrite.finish()
        return pruned, rows


@dataclass
class Calibration:
    """The calibration data in two halves: ``auto`` fits moments on ``fit`` and decides on
    ``decide`` (samples whose decision data is the other half: a refit scored on the tokens
    it was fitted to looks far better than it is); the model kept is fitted on both."""

    groups_for: Callable  # session -> [fit feeds, other-half feeds]
    decide: data.Samples
    described: str
    split: bool  # False: too little data for two halves, decisions see the fitting data


def _calibration(options, metric, samples: data.Samples) -> Calibration:
    """The decision input sets in halves (alternate sets), or for a causal LM scored on
    perplexity, its calibration text in halves (first and second half of the lines), each
    cut into prefill windows of ``LENGTH`` tokens."""
    if metric.from_feeds:
        sets = samples.decision
        if len(sets) < 2:
            return Calibration(lambda _s: [sets, []], samples, samples.roles["calibration"], False)
        fit, other = sets[0::2], sets[1::2]
        return Calibration(
            lambda _s: [fit, other],
            dataclasses.replace(samples, decision=other),
            samples.roles["calibration"],
            True,
        )
    user = samples.text is not None
    text = samples.text[0] if user else lm_quality.bundled_text("calibration")
    lines = text.splitlines()
    halves = ["\n".join(lines[: len(lines) // 2]), "\n".join(lines[len(lines) // 2 :])]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(options.tokenizer))
    windows = [
        lm_quality.token_windows(
            np.asarray(tokenizer.encode(half).ids), LENGTH, CALIBRATION_WINDOWS // 2
        )
        for half in halves
    ]
    where = "the user's calibration text" if user else "the bundled calibration text"
    return Calibration(
        lambda session: [[lm_quality.prefill_feeds(session, w) for w in ws] for ws in windows],
        dataclasses.replace(samples, text=(halves[1], "")),
        f"{sum(map(len, windows))} windows of {LENGTH} tokens of {where}",
        True,
    )


def least_influential(scores: list, count: int, budget: float) -> set[int]:
    """The indices of the ``count`` smallest drops, those within ``budget`` first (a cut
    that alone misses it, an LM's top-1 floor included, is worse than any that keeps it)."""
    ranked = sorted(
        range(len(scores)), key=lambda i: (not scores[i].within(budget), scores[i].drop)
    )
    return set(ranked[:count])


def _cut_layers(
    model: ir.Model, count: int, calibration: Calibration, evaluator, folder: Path, budget: float
) -> tuple[ir.Model, list[dict]]:
    """The model without its ``count`` layers of least influence, and one row per layer.

    A layer's influence is the metric's drop against the unpruned model, on the decision
    data, when that layer alone is cut: the end-to-end effect the budget is on, at the
    cost of one scoring per layer. A proxy inside the model (ShortGPT's ``1 - cos`` of the
    residual stream across the layer) needs one run only, but says nothing of what later
    layers and the norms do with the change (a post-LN encoder renormalizes the stream after
    every sublayer). The layers are scored one at a time and the ``count`` lowest cut
    together (``least_influential``), whose joint effect the final check measures. A cut uses
    the contributions' means on the fitting half of the calibration data (decisions score
    the other half); the model kept, their means on all of it (``layers``).
    """
    found = layers.find_layers(model)
    contributions = [s.contribution for layer in found for s in layer.sublayers]
    fit, other = moments.means(model, contributions, calibration.groups_for)
    scores = []
    path = folder / "without-one-layer.onnx"  # one at a time: a copy per layer fills disks
    for layer in found:
        save_self_contained(layers.remove(model, [layer.index], fit.values), path)
        scores.append(evaluator.measure(path))
        delete_saved(path)
        logger.info("prune: %s alone cut -> %s", layer.name, scores[-1].summary(budget))
    chosen = least_influential(scores, count, budget)
    pruned = layers.remove(model, sorted(chosen), (fit + other).values)
    rows = [
        {
            "target": "layers",
            "block": layer.name,
            "sublayers": [sublayer.name for sublayer in layer.sublayers],
            "units": 1,
            "kept": int(layer.index not in chosen),
            "removed": int(layer.index in chosen),
            "influence": score.drop,
            "influence_summary": score.summary(budget),
        }
        for layer, score in zip(found, scores, strict=True)
    ]
    return pruned, rows


def _influence_data(calibration: Calibration) -> str:
    """Where the layers' influence was measured (the report's ``data.influence``)."""
    if calibration.split:
        return (
            "the metric's drop with each layer alone cut, its contributions' means from one "
            "half of the calibration data, scored on the other"
        )
    return (
        "the metric's drop with each layer alone cut, means and scores on the same "
        "calibration data (one set only)"
    )


def check_interface(pruned: ir.Model, sets: list[dict], reference: list[dict]) -> None:
    """The pruned model runs on every verification set with the outputs the original had."""
    session = create_session(pruned, optimization="disable_all")
    for feeds, expected in zip(sets, reference, strict=True):
        got = session.run(feeds)
        for name, value in expected.items():
            other = got.get(name)
            if other is None or np.shape(other) != np.shape(value):
                raise VerificationFailed(
                    f"prune: output {name!r} changed shape ({np.shape(value)} -> "
                    f"{None if other is None else np.shape(other)})"
                )
            if getattr(other, "dtype", None) != getattr(value, "dtype", None):
                raise VerificationFailed(f"prune: output {name!r} changed type")


def run_stage(
    optimized: ir.Model,
    options: PruneOptions,
    accuracy: quantize_stage.QuantizeOptions,
    sets: list[dict],
    reference: list[dict] | None,
) -> tuple[ir.Model, dict]:
    """Prune the verified fp32 model; returns the model and the report's ``pruning`` section.

    ``accuracy`` supplies the metric and the data (``--metric``, ``--calibration``,
    ``--evaluation``, ``--tokenizer``, the LM budget's top-1 floor); the budget is
    ``options.max_drop``. The section's ``final_check.passed`` is False when the held-out
    score misses it; the caller fails the run with ``stage_failure(section)``.

    Raises:
        UserError: nothing to prune, nothing to run or measure on, or a metric that does not
            fit the model.
    """
    if reference is None:
        raise UserError("--prune needs a model ONNX Runtime can run: accuracy is measured")
    check(optimized, accuracy, options.spec, fused=True)
    budget = options.max_drop
    lm_budget = dataclasses.replace(accuracy.lm_budget, max_perplexity_increase=budget)
    accuracy = dataclasses.replace(accuracy, max_drop=None, lm_budget=lm_budget)
    with tempfile.TemporaryDirectory(prefix="ovo-prune-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        save_self_contained(optimized, fp32_path)
        fp32 = onnx.load(str(fp32_path), load_external_data=False)
        try:
            metric = accuracy.metric_for(*quantize_stage.io_names(fp32))
            samples = quantize_stage.samples_for(fp32, fp32_path, accuracy, metric, sets, None)
        except ValueError as exc:
            raise UserError(f"--prune: {exc}") from exc
        notes: list[str] = []
        calibration = _calibration(accuracy, metric, samples)
        base, layer_rows = optimized, []
        if options.spec.layers:
            evaluator = quantize_stage.decision_evaluator(
                fp32_path, accuracy, metric, calibration.decide, []
            )
            base, layer_rows = _cut_layers(
                optimized, options.spec.layers, calibration, evaluator, Path(tmp), budget
            )
        shares = options.spec.shares
        blocks = find_blocks(base, shares)
        if blocks:
            fit, other = moments.collect(base, [b for _, b in blocks], calibration.groups_for)
        else:  # layers alone: no channel is scored
            fit = other = moments.Moments([], np.zeros(0))
        search: list[Point] = []
        if options.spec.auto:
            if not calibration.split:
                notes.append(
                    "prune auto: one calibration set only; decisions are scored on the data "
                    "the moments come from, which flatters the refit"
                )
            pruner = _Pruner(base, blocks, fit, options.reconstruct)
            evaluator = quantize_stage.decision_evaluator(
                fp32_path, accuracy, metric, calibration.decide, []
            )
            counter = iter(range(1_000_000))

            def measure(level: int) -> Point:
                path = Path(tmp) / f"candidate-{next(counter)}.onnx"
                share = round(level * STEP, 6)
                save_self_contained(pruner.build({"ffn": share})[0], path)
                point = Point(share, evaluator.measure(path))
                delete_saved(path)  # a large model's candidates would fill the disk otherwise
                logger.info("prune ffn=%g -> %s", point.fraction, point.score.summary(budget))
                return point

            chosen, search = largest_within(round(MAX_AUTO_FRACTION / STEP), measure, budget)
            shares = None if chosen is None else {"ffn": chosen.fraction}
        stats = fit + other
        del fit, other
        if not np.all(np.isfinite(stats.residual)):
            notes.append(
                "prune: the residual stream of some feed-forward block was not found; every "
                "block loses the same share of its channels"
            )
        section = {
            "targets": options.spec.text,
            "reconstruction": options.reconstruct,
            "metric": metric.name,
            "max_drop": budget,
            "data": {
                **samples.roles,
                # A causal LM's moments come from windows of text, not from its input sets.
                **({} if metric.from_feeds else {"calibration": calibration.described}),
                **(
                    {"importance": f"{calibration.described} ({stats.tokens} tokens)"}
                    if blocks
                    else {}
                ),
                **({"influence": _influence_data(calibration)} if layer_rows else {}),
                **({"auto": "moments on one half of it, decisions on the other"} if search else {}),
            },
            "search": [point.to_dict(budget) for point in search],
            "notes": notes,
        }
        if shares is None:
            notes.append(
                f"prune auto: removing even {STEP:.0%} of the FFN channels misses the budget "
                f"({search[0].score.summary(budget)}); nothing pruned"
            )
            section.update(pruned=False, final_check={"passed": True, "summary": "unpruned"})
            return optimized, section
        pruned, rows = _Pruner(base, blocks, stats, options.reconstruct).build(shares)
        rows = layer_rows + rows
        sparse_rows: list[dict] = []
        if options.spec.sparse:
            sparse_rows, dense = sparse.apply(pruned, calibration.groups_for)
        check_interface(pruned, sets, reference)
        out_path = Path(tmp) / "pruned.onnx"
        save_self_contained(pruned, out_path)
        if options.spec.sparse:
            pattern = sparse.check_saved(ir.load(out_path), sparse_rows)
            if not pattern["passed"]:
                raise VerificationFailed(
                    f"prune sparse: the saved model breaks the 2:4 pattern in "
                    f"{', '.join(pattern['violations'])}"
                )
            section["data"]["sparsity"] = (
                f"input-channel norms at each weight's MatMul on {calibration.described}"
            )
            section["sparsity"] = _sparsity_section(sparse_rows, dense, pattern)
        final, against = quantize_stage.final_check(
            fp32_path, out_path, accuracy, metric, samples, sets, reference
        )
        latency = compare_latency(
            optimized, pruned, samples.decision[0], rounds=options.latency_rounds
        )
    totals = {}
    for target in options.spec.targets:
        if target == "sparse":
            totals[target] = section["sparsity"]["totals"]
            continue
        before = sum(row["units"] for row in rows if row["target"] == target)
        after = sum(row["kept"] for row in rows if row["target"] == target)
        totals[target] = {"before": before, "after": after, "removed_fraction": 1 - after / before}
    section.update(
        pruned=True,
        fractions=shares,
        totals=totals,
        layers=rows,
        layers_removed=[row["block"] for row in layer_rows if row["removed"]],
        latency=latency.to_dict(),
        final_check=quantize_stage.final_check_section(final, against, metric, budget),
    )
    return pruned, section


def _sparsity_section(rows: list[dict], dense: list[dict], pattern: dict) -> dict:
    """The report's ``pruning.sparsity``: per weight and in total, the weights zeroed, the
    weights left dense and why, and the pattern as checked on the saved model."""
    before = sum(row["nonzero_before"] for row in rows)
    after = sum(row["nonzero_after"] for row in rows)
    size = sum(int(np.prod(row["shape"])) for row in rows)
    return {
        "pattern": "2:4",
        "weights": rows,
        "dense": dense,
        "totals": {
            "weights": len(rows),
            "before": before,
            "after": after,
            "removed_fraction": 1 - after / before if before else 0.0,
            "zero_share": 1 - after / size if size else 0.0,
        },
        "pattern_check": pattern,
    }


def stage_failure(section: dict) -> str | None:
    """The one-line failure of a prune stage, or None when its final check passed."""
    check_ = section.get("final_check") or {}
    if check_.get("passed", False):
        return None
    return f"prune {section.get('targets')}: {check_.get('summary', 'not verified')}"
