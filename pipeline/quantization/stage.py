"""Precision tiers with an accuracy guard: the entry point of the quantization stage.

``quantize_model`` lowers an fp32 ONNX model to one of ``PRECISIONS`` with ONNX Runtime's own
tools (see ``pipeline.quantization``), scores the result against fp32 on the metric the user
chose (``metrics``) over the decision data (``data``), and when the budget (``max_drop``) is
missed, keeps the nodes whose measured effect on that metric is largest in float, as few as
hold the budget (``exclusions``). ``auto`` builds every tier that fits the device that way,
measures each one's latency against fp32 side by side, and returns the fastest within budget
(fp32 when none is faster); every candidate measured is reported. The final check scores the
result on the evaluation data, which no decision saw. Nothing here trusts a tier to be
accurate or fast: both are measured.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from pipeline.quantization import (
    calibration,
    data,
    exclusions,
    guard,
    metrics,
    preprocess,
    smooth,
    tiers,
)
from pipeline.quantization.isa import choose_int8_types
from pipeline.quantization.lm_guard import (
    LmBudget,
    LmEvaluator,
    has_causal_lm_interface,
    is_causal_lm,
)
from pipeline.runtime import progress
from pipeline.runtime.proto_size import message_tensor_bytes

logger = logging.getLogger(__name__)

PRECISIONS = (*tiers.TIERS, "auto")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
METRIC_AUTO = "auto"  # perplexity for a causal LM whose tokenizer is known, cosine otherwise
INT4_ALGORITHMS = ("affine", "rtn", "hqq", "gptq")
# The guard may keep at most this share of the quantized nodes in float: beyond it the tier
# is not worth having (it is mostly fp32 with conversion overhead), so it misses its budget.
MAX_EXCLUDED_FRACTION = 0.5
FP16_CPU_WARNING = (
    "fp16 on CPU is usually SLOWER than fp32: ONNX Runtime's CPU provider has few fp16 "
    "kernels and falls back through Cast nodes; fp16 pays off on GPUs"
)


@dataclass(frozen=True)
class QuantizeOptions:
    """What to lower to, and the budget the result must keep.

    Attributes:
        precision: One of ``PRECISIONS``.
        calibration: Real data (``data``): a folder of .npz/.npy input sets (``--inputs``
            layout), one .npz, or .txt files (one sample per line). Split by content hash
            into calibration/decision data and held-out evaluation data.
        evaluation: Held-out data given explicitly (then all of ``calibration`` calibrates).
        calibration_method: minmax | entropy | percentile (int8-static).
        per_channel: Per-channel weight scales (int8); raises the opset to 13 when needed.
        symmetric_weights: Symmetric weights (zero point 0); int8 and int4 RTN.
        activation_type: auto (from the CPU's instruction set, see ``isa``) | uint8 | int8.
        exclude_nodes: Node names never quantized.
        exclude_op_types: Op types never quantized (fp16: kept in fp32).
        metric: ``metrics.BUILT_IN``, a plug-in ``MODULE:FUNCTION``, or ``auto``.
        min_neighbour_agreement: pooled-cosine's floor on nearest-neighbour agreement.
        max_drop: Budget on the metric's drop (``1 - similarity``; perplexity: the relative
            increase; a plug-in: its loss). None: the tier's ``default_drop``
            (quantization/tiers.py), or ``lm_budget`` for perplexity.
        smooth_alpha: SmoothQuant strength for int8 tiers (``smooth``); None: no smoothing.
            Needs real calibration data (the channel maxima come from it).
        int4_block_size: MatMulNBits block size (power of two, >= 16).
        int4_algorithm: affine | rtn | hqq | gptq (gptq needs calibration data).
        fp16_keep_io_types: Keep float32 graph inputs/outputs (Casts at the edges).
        fp16_op_block_list: Extra op types kept in fp32.
        cache_dir: Calibration cache folder (keyed by model hash); None: per call only.
        quant_format: qdq | qoperator (int8-static).
        device: cpu | cuda: where the model will run; ``auto`` tries fp16 only on cuda.
        latency_rounds: Interleaved rounds per candidate in ``auto``.
        tokenizer: A ``tokenizer.json``: tokenizes text data, and for a causal LM lets the
            guard score perplexity and top-1 agreement on real text (``lm_guard``).
        lm_budget: The LM guard's budget (perplexity increase, top-1 agreement).
    """

    precision: str = "fp32"
    calibration: Path | None = None
    calibration_method: str = "minmax"
    per_channel: bool = True
    symmetric_weights: bool = True
    activation_type: str = "auto"
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    metric: str = METRIC_AUTO
    max_drop: float | None = None
    evaluation: Path | None = None
    min_neighbour_agreement: float = metrics.MIN_NEIGHBOUR_AGREEMENT
    smooth_alpha: float | None = None
    int4_block_size: int = 32
    int4_algorithm: str = "affine"
    fp16_keep_io_types: bool = True
    fp16_op_block_list: tuple[str, ...] = ()
    cache_dir: Path | None = None
    quant_format: str = "qdq"
    device: str = "cpu"
    latency_rounds: int = 9
    tokenizer: Path | None = None
    lm_budget: LmBudget = field(default_factory=LmBudget)

    def __post_init__(self) -> None:
        checks = (
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (
                self.calibration_method in CALIBRATION_METHODS,
                f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}",
            ),
            (self.activation_type in ("auto", "uint8", "int8"), "activation type: auto|uint8|int8"),
            (
                self.int4_algorithm in INT4_ALGORITHMS,
                f"int4 algorithm must be one of {', '.join(INT4_ALGORITHMS)}",
            ),
            (
                self.int4_block_size >= 16
                and self.int4_block_size & (self.int4_block_size - 1) == 0,
                f"int4 block size must be a power of two >= 16, got {self.int4_block_size}",
            ),
            (
                self.max_drop is None or 0 <= self.max_drop < 1,
                f"max drop must be in [0, 1), got {self.max_drop}",
            ),
            (self.quant_format in ("qdq", "qoperator"), "quant format must be qdq or qoperator"),
            (
                0 <= self.min_neighbour_agreement <= 1,
                f"min neighbour agreement must be in [0, 1], got {self.min_neighbour_agreement}",
            ),
            (
                self.smooth_alpha is None or 0 < self.smooth_alpha < 1,
                f"smooth alpha must be in (0, 1), got {self.smooth_alpha}",
            ),
            (self.device in ("cpu", "cuda"), "device must be cpu or cuda"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def budget(self, tier: tiers.Tier, metric: metrics.Metric) -> float:
        if self.max_drop is not None:
            return self.max_drop
        if not metric.from_feeds:
            return self.lm_budget.max_perplexity_increase
        return tier.default_drop

    def metric_for(self, inputs: list[str], outputs: list[str]) -> metrics.Metric:
        """The metric this run is judged by (``auto`` resolved for a model with these input
        and output names)."""
        name = self.metric
        lm_ready = self.tokenizer is not None and has_causal_lm_interface(inputs, outputs)
        if name == METRIC_AUTO:
            name = "perplexity" if lm_ready else "cosine"
        if name == "perplexity" and not lm_ready:
            raise ValueError(
                "--metric perplexity needs a causal LM (input_ids and past_* in, logits out) "
                "with its tokenizer.json beside it or given with --tokenizer"
            )
        return metrics.resolve(name, self.min_neighbour_agreement)

    def lm_budget_used(self) -> LmBudget:
        """The LM guard's budget; ``max_drop`` (when given) is its perplexity increase."""
        if self.max_drop is None:
            return self.lm_budget
        return dataclasses.replace(self.lm_budget, max_perplexity_increase=self.max_drop)


@dataclass
class QuantizeResult:
    """What the stage produced and proved.

    ``metric`` names what ``accuracy`` (flat figures: per output for cosine, else the metric's
    own) and ``accuracy_details`` measure, on the decision data; ``max_drop`` is the budget
    on its drop. ``sensitivity`` is (node, measured drop with only that node quantized; None
    where not measured), worst first, empty when the budget held at once; ``guard_path`` the
    counts of worst nodes kept float that were tried, with their scores. ``candidates``
    (auto) has one dict per tier tried: precision, accuracy, within_budget, latency_ratio,
    noise, verdict. ``data`` says which data served calibration, decisions and evaluation.
    """

    model_path: Path
    precision: str
    excluded_nodes: list[str]
    sensitivity: list[tuple[str, float | None]]
    accuracy: dict[str, float]
    notes: list[str]
    candidates: list[dict]
    metric: str = "cosine"
    drop: float = 0.0
    max_drop: float = 0.0
    within_budget: bool = True
    summary: str = ""
    accuracy_details: dict = field(default_factory=dict)
    isa: str = ""
    quantized_nodes: int = 0
    guard_path: list[dict] = field(default_factory=list)
    data: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["model_path"] = str(self.model_path)
        data["sensitivity"] = [
            [n, None if v is None else round(v, 6)] for n, v in self.sensitivity[:10]
        ]
        return data


def quantize_model(
    fp32_path: Path,
    out_path: Path,
    options: QuantizeOptions,
    *,
    reference_feeds: list[dict[str, np.ndarray]],
    calibration_feeds: list[dict[str, np.ndarray]] | None = None,
    samples: data.Samples | None = None,
) -> QuantizeResult:
    """Lower ``fp32_path`` to ``options.precision`` and write it to ``out_path``.

    ``samples`` gives the data of each role (``data.load``); without it, ``options.calibration``
    is loaded and split, or else ``calibration_feeds`` calibrate (generated sets when None)
    and ``reference_feeds`` serve decisions and evaluation.

    The result is written even when it misses the budget (``within_budget`` False, and
    ``summary`` says by how much): the caller decides whether that fails the run.

    Raises:
        ValueError: an option the model cannot satisfy (gptq without data, opset that cannot
            be raised, a metric that does not fit the model).
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not reference_feeds:
        raise ValueError("quantize_model needs at least one reference input set")
    model = onnx.load(str(fp32_path), load_external_data=False)
    metric = options.metric_for(*io_names(model))
    if samples is None:
        samples = samples_for(model, fp32_path, options, metric, reference_feeds, calibration_feeds)
    if not metric.from_feeds and samples.text is None:
        samples.roles.update(
            decision="the bundled calibration text (Python reference manual topics)",
            evaluation="the bundled evaluation text (held-out topics)",
        )
    if options.precision == "auto":
        return _auto(fp32_path, out_path, options, metric, samples)
    with tempfile.TemporaryDirectory(prefix="ovo-quant-") as tmp:
        return _quantize_tier(
            fp32_path, out_path, options, options.precision, metric, samples, Path(tmp)
        )


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def samples_for(
    model, fp32_path, options, metric, reference_feeds, calibration_feeds
) -> data.Samples:
    if options.calibration is not None:
        return data.load(
            model,
            fp32_path,
            options.calibration,
            options.evaluation,
            options.tokenizer,
            reference_feeds,
            causal_lm=is_causal_lm(model) and not metric.from_feeds,
        )
    samples = data.load(model, fp32_path, None, None, None, reference_feeds)
    if calibration_feeds:
        samples.calibration, samples.generated = list(calibration_feeds), False
        samples.roles["calibration"] = f"{len(calibration_feeds)} given input set(s)"
    return samples


# Above this a model the stage writes goes with its tensors in a data file beside it, one
# tensor at a time: onnx.save would first serialize the whole proto, one more copy of the
# weights in memory (540 MB for SmolLM2-135M).
EXTERNAL_DATA_ABOVE = 256 * 2**20


def _write(model: onnx.ModelProto, path: Path) -> bool:
    """Atomic save; whether ``model`` was large (``EXTERNAL_DATA_ABOVE``): then its tensors
    went to ``NAME.data`` beside it and their bytes OUT of ``model`` (read it again from
    ``path`` to use its weights)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-quant-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    large = message_tensor_bytes(model) > EXTERNAL_DATA_ABOVE
    if large:
        (path.parent / f"{path.name}.data").unlink(missing_ok=True)  # onnx.save appends
        onnx.save(
            model, tmp, save_as_external_data=True, location=f"{path.name}.data", size_threshold=0
        )
    else:
        onnx.save(model, tmp)
    os.replace(tmp, path)
    return large


def _name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node a unique name (ORT's exclusion lists work by name)."""
    taken = {n.name for n in model.graph.node if n.name}
    count = 0
    for index, node in enumerate(model.graph.node):
        if node.name:
            continue
        name = f"{node.op_type}_{index}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
        count += 1
    return count


def _prepare(model: onnx.ModelProto, tier: tiers.Tier, options: QuantizeOptions, notes: list[str]):
    model, lifted = preprocess.lift_constants(model)
    if lifted:
        notes.append(
            f"{lifted} Constant node(s) lifted to initializers (ORT's quantizer finds weights "
            "and biases only among initializers)"
        )
    if tier.weight_only_bits is not None:
        model, lowered = preprocess.lower_gemm_to_matmul(model)
        if lowered:
            notes.append(
                f"{lowered} Gemm node(s) lowered to MatMul + Add so int4 can quantize their "
                "weights (MatMulNBits replaces MatMul only)"
            )
    if _name_nodes(model):
        notes.append("unnamed nodes were given names so they can be excluded by name")
    if tier.int8:
        try:
            model, note = preprocess.raise_opset(model)
        except ValueError:
            if options.per_channel or tier.calibrated:
                raise
            note = ""
        if note:
            notes.append(note)
    if tier.int8:
        model, note = preprocess.infer_shapes(model)
        if note:
            notes.append(note)
    return model


def _calibration_sources(samples: data.Samples, notes: list[str]) -> list[calibration.Source]:
    if samples.generated or not samples.calibration:
        notes.append(calibration.GENERATED_NOTE)
        logger.warning(calibration.GENERATED_NOTE)
    return list(samples.calibration)


def _quantize_tier(
    fp32_path: Path,
    out_path: Path,
    options: QuantizeOptions,
    tier_name: str,
    metric: metrics.Metric,
    samples: data.Samples,
    tmp: Path,
) -> QuantizeResult:
    notes: list[str] = []
    tier = tiers.TIERS[tier_name]
    budget = options.budget(tier, metric)
    if not tier.lowers:
        model = onnx.load(str(fp32_path))
        _write(model, out_path)
        return QuantizeResult(
            out_path,
            "fp32",
            [],
            [],
            {o.name: 1.0 for o in model.graph.output},
            notes,
            [],
            metric=metric.name,
            max_drop=0.0,
            summary="fp32: unchanged",
            data=dict(samples.roles),
        )
    # Not kept beside the prepared copy: on a large model that would be one more full copy
    # of the weights for the whole stage.
    model = _prepare(onnx.load(str(fp32_path)), tier, options, notes)
    if tier.int8 and options.smooth_alpha is not None:
        model = _smoothed(model, options.smooth_alpha, samples, notes)
    prepared = tmp / "prepared.onnx"
    if _write(model, prepared):
        # a fresh message frees the old one's memory (clearing fields does not); only static
        # calibration reads the weights through ``model`` (the proxy ranking reloads them)
        model = onnx.load(str(prepared), load_external_data=tier.calibrated)
    isa = choose_int8_types()
    activation_type = (
        isa.activation_type if options.activation_type == "auto" else options.activation_type
    )
    reduce_range = isa.reduce_range if options.activation_type == "auto" else False
    if tier.int8:
        notes.append(
            f"int8 types from the CPU ({isa.isa}): activations {activation_type}, weights int8"
            + (" with 7-bit range" if reduce_range else "")
            + f" ({isa.reason})"
        )
    if tier.slow_on_cpu and options.device == "cpu":
        notes.append(FP16_CPU_WARNING)
        logger.warning(FP16_CPU_WARNING)
    static = tier.calibrated
    op_types = tiers.default_op_types(model, static, options.exclude_op_types)
    if tier.weight_only_bits is not None:
        op_types = ["MatMul"]  # MatMulNBits replaces MatMul only
    scheme = guard.Scheme(
        tier=tier,
        per_channel=options.per_channel,
        reduce_range=reduce_range,
        symmetric_weights=options.symmetric_weights,
        block_size=options.int4_block_size,
    )

    reader_factory = None
    cache_path = None
    gptq = tier.weight_only_bits is not None and options.int4_algorithm == "gptq"
    if static or gptq:
        sources = _calibration_sources(samples, notes)
        dtypes = calibration.input_dtypes(model)

        def reader_factory(label: str | None = "calibrating") -> calibration.FeedsReader:
            return calibration.FeedsReader(sources, dtypes, label)

        if static:
            cache_path = _calibrate(
                model, prepared, options, op_types, sources, reader_factory, tmp, notes
            )

    counter = iter(range(100_000))
    # Nodes of a quantized op type the tier must leave alone: ONNX's own Attention-23 (the
    # dynamic tier quantizes ORT's com.microsoft Attention only) and, for static QDQ,
    # activation x activation MatMuls.
    if tier.calibrated:
        never_quantized = tiers.activation_matmuls(model)
    else:
        never_quantized = [
            n.name
            for n in model.graph.node
            if n.op_type == "Attention" and not tiers.is_contrib_attention(n)
        ]

    def make(excluded: list[str]) -> Path:
        # beside ``prepared``: a weight-only candidate still reads the weights it left alone
        # from prepared's data file
        target = tmp / f"candidate-{next(counter)}.onnx"
        if tier.int8 and not tier.calibrated:
            tiers.int8_dynamic(
                prepared,
                target,
                op_types=op_types,
                per_channel=options.per_channel,
                reduce_range=reduce_range,
                symmetric_weights=options.symmetric_weights,
                exclude_nodes=excluded + never_quantized,
            )
        elif tier.calibrated:
            tiers.int8_static(
                prepared,
                target,
                cache_path=cache_path,
                method=options.calibration_method,
                op_types=op_types,
                per_channel=options.per_channel,
                reduce_range=reduce_range,
                activation_type=activation_type,
                symmetric_weights=options.symmetric_weights,
                exclude_nodes=excluded + never_quantized,
                quant_format=options.quant_format,
            )
        elif tier.half:
            converted, removed = tiers.fp16(
                onnx.load(str(prepared)),
                keep_io_types=options.fp16_keep_io_types,
                op_block_list=[*options.fp16_op_block_list, *options.exclude_op_types],
                node_block_list=excluded,
            )
            if removed and not any("Cast pair" in n for n in notes):
                notes.append(f"removed {removed} redundant Cast pair(s) (fp16 -> fp32 -> fp16)")
            _write(converted, target)
        elif tier.weight_only_bits == 4:
            reader = reader_factory(None) if reader_factory is not None else None
            lowered = tiers.int4(
                onnx.load(str(prepared), load_external_data=False),
                block_size=options.int4_block_size,
                algorithm=options.int4_algorithm,
                symmetric=options.symmetric_weights,
                exclude_nodes=excluded,
                reader=reader,
                weights_dir=prepared.parent,
            )
            _write(lowered, target)
        elif tier.weight_only_bits == 8:
            lowered = tiers.int8_weight_only(
                onnx.load(str(prepared), load_external_data=False),
                block_size=options.int4_block_size,
                exclude_nodes=excluded,
                weights_dir=prepared.parent,
            )
            _write(lowered, target)
        else:  # pragma: no cover - validated in QuantizeOptions
            raise ValueError(tier.name)
        return target

    evaluator = decision_evaluator(prepared, options, metric, samples, notes)
    excluded = list(options.exclude_nodes)
    try:
        candidate = make(excluded)
        score = evaluator.measure(candidate)
    except Exception as exc:  # ORT's QAttention takes fewer mask forms than Attention
        if "Attention" not in op_types:
            raise
        op_types.remove("Attention")
        notes.append(
            "fused Attention kept float: its QAttention could not be built or run here "
            f"({' '.join(str(exc).split())[:160]})"
        )
        candidate = make(excluded)
        score = evaluator.measure(candidate)
    lowered = onnx.load(str(candidate), load_external_data=False)
    if tier.half:
        quantized = [
            n.name
            for n in model.graph.node
            if n.name not in excluded and n.op_type not in options.exclude_op_types
        ]
    else:
        quantized = guard.quantized_nodes(model, lowered, set(op_types))
    if tier.weight_only_bits is not None:
        matmuls = sum(1 for n in model.graph.node if n.op_type == "MatMul")
        notes.append(
            f"{tier.name}: {len(quantized)} of {matmuls} MatMul node(s) became MatMulNBits"
        )
    full = exclusions.Point(0, score, candidate)
    ranking: list[tuple[str, float | None]] = []
    auto_excluded: list[str] = []
    path = [full]
    if not score.within(budget) and quantized:

        def only(node: str) -> float:
            alone = make(excluded + [n for n in quantized if n != node])
            return evaluator.measure(alone).drop

        def proxy() -> list[tuple[str, float]]:
            lowered_full = onnx.load(str(full.path)) if static else None
            fp32 = onnx.load(str(prepared))
            return guard.sensitivity(fp32, lowered_full, quantized, samples.decision, scheme)

        ranking, how = exclusions.measured_ranking(quantized, only, proxy)
        limit = max(1, int(len(ranking) * MAX_EXCLUDED_FRACTION))

        def measure(count: int) -> exclusions.Point:
            names = [name for name, _ in ranking[:count]]
            built = make(excluded + names)
            point = exclusions.Point(count, evaluator.measure(built), built)
            logger.info("guard: %d node(s) kept float -> %s", count, point.score.summary(budget))
            return point

        chosen, path = exclusions.fewest_within(limit, measure, budget, full)
        candidate, score = chosen.path, chosen.score
        auto_excluded = [name for name, _ in ranking[: chosen.kept_float]]
        notes.append(
            f"accuracy guard ({metric.name}): {full.score.summary(budget)} with every node "
            f"quantized; {how}; kept {len(auto_excluded)} of {len(quantized)} quantized "
            f"node(s) in float (largest measured effect first, fewest within budget) -> "
            f"{score.summary(budget)}"
        )
        if not score.within(budget):
            notes.append(
                f"accuracy guard gave up: keeping more than {MAX_EXCLUDED_FRACTION:.0%} of "
                "the quantized nodes in float would make the tier pointless"
            )
    final = onnx.load(str(candidate))
    _write(final, out_path)
    return QuantizeResult(
        model_path=out_path,
        precision=tier.name,
        excluded_nodes=excluded + auto_excluded,
        sensitivity=ranking,
        accuracy=score.flat(),
        notes=notes,
        candidates=[],
        metric=metric.name,
        drop=score.drop,
        max_drop=budget,
        within_budget=score.within(budget),
        summary=f"{tier.name}: {score.summary(budget)}",
        accuracy_details=score.to_dict(),
        isa=isa.isa,
        quantized_nodes=len(quantized) - len(auto_excluded),
        guard_path=[point.to_dict(budget) for point in path],
        data=dict(samples.roles),
    )


def _smoothed(model, alpha: float, samples: data.Samples, notes: list[str]):
    if samples.generated:
        notes.append("SmoothQuant skipped: it needs real calibration data (--calibration)")
        return model
    feeds = [calibration.read_source(s) for s in samples.calibration]
    model, count = smooth.smooth(model, feeds, alpha)
    notes.append(
        f"SmoothQuant (alpha {alpha}): {count} normalization output(s) divided per channel, "
        "the weights that read them multiplied back (exact in float)"
    )
    return model


def _calibrate(model, prepared, options, op_types, sources, reader_factory, tmp, notes) -> Path:
    """ORT's calibration ranges for the static tier, from the cache when they are there."""
    cache_path = calibration.cache_file(
        options.cache_dir or tmp,
        calibration.model_digest(model),
        options.calibration_method,
        calibration.digest(sources),
        ",".join(op_types),
    )
    if cache_path.exists():
        notes.append(f"calibration ranges from cache {cache_path.name}")
        return cache_path
    calib_model = prepared
    if options.calibration_method in ("entropy", "percentile"):
        clamped, names = preprocess.clamp_mask_constants(model)
        if names:
            calib_model = tmp / "calibration.onnx"
            _write(clamped, calib_model)
            notes.append(
                f"{len(names)} mask constant(s) (+-inf / |x| >= 1e30: "
                f"{', '.join(names[:3])}) clamped to +-1e4 for histogram "
                "calibration only; the model keeps its constants"
            )
    tiers.calibrate(
        calib_model,
        cache_path,
        reader_factory(),
        method=options.calibration_method,
        op_types=op_types,
    )
    return cache_path


def decision_evaluator(prepared: Path, options, metric: metrics.Metric, samples, notes):
    """The LM guard for ``perplexity``, else the metric over the decision data."""
    if not metric.from_feeds:
        text = samples.text[0] if samples.text else None
        notes.append(
            "LM guard: perplexity and top-1 agreement against the fp32 model on "
            + ("the user's calibration text" if text else "the bundled calibration text")
            + " decide; the evaluation text (never seen by a decision) is reported in the "
            "final check"
        )
        return LmEvaluator(
            prepared, options.tokenizer, options.lm_budget_used(), "calibration", text
        )
    return metrics.Evaluator(prepared, samples.decision, metric)


def _auto_tiers(
    options: QuantizeOptions, calibrated: bool, smoothable: bool
) -> list[tuple[str, QuantizeOptions]]:
    """The candidates ``auto`` builds, each measured for accuracy and latency against fp32.

    With real calibration data the int8 tiers are also tried with SmoothQuant (``smooth``):
    on MiniLM it halved the nodes the guard must keep float, at the cost of a Mul per norm.
    """
    tried = []
    for tier in tiers.TIERS.values():
        if not tier.lowers or not (tier.auto_on_cpu or options.device == "cuda"):
            continue
        if not tier.calibrated:
            tried.append((tier.name, dataclasses.replace(options, precision=tier.name)))
        elif calibrated:
            for fmt in ("qdq", "qoperator"):
                label = f"{tier.name}-{fmt}"
                tried.append(
                    (label, dataclasses.replace(options, precision=tier.name, quant_format=fmt))
                )
        if tier.int8 and calibrated and smoothable and options.smooth_alpha is None:
            label = tier.name + ("-qdq" if tier.calibrated else "") + "+smooth"
            smoothed = dataclasses.replace(
                options, precision=tier.name, quant_format="qdq", smooth_alpha=smooth.ALPHA
            )
            tried.append((label, smoothed))
    return tried


def _auto(fp32_path, out_path, options, metric, samples: data.Samples) -> QuantizeResult:
    """Build each tier that fits the device; keep the fastest within budget (fp32 otherwise).

    Every candidate that could be built is measured twice against fp32: accuracy on the
    decision data (with its own guard, so each tier reaches the budget with the fewest
    float nodes it can) and latency, interleaved with fp32 (``compare_latency``) on the
    first decision input set. ``candidates`` records for each: precision, accuracy,
    within_budget, kept_float, latency_ratio (candidate / fp32 time), noise and verdict
    ("faster", "same", "slower", or "over budget" / "failed"); the fp32 baseline is listed
    first with ratio 1.0. Among the within-budget candidates measured "faster" (beyond the
    measurement noise), those whose ratio is within the fastest one's noise are tied on
    speed, and the most accurate of them (smallest drop) is chosen: a lower median inside
    the noise is no evidence of speed, while the accuracy margin carries over to unseen data
    (on MiniLM, two candidates 0.44x and 0.46x +-0.09 apart held nearest-neighbour agreement
    0.926 and 0.984 on held-out sentences). fp32 when none is faster. The chosen entry has
    ``chosen: True``.
    """
    import onnx_ir as ir

    from pipeline.runtime.timing import compare_latency

    calibrated = not samples.generated
    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    tried = _auto_tiers(options, calibrated, bool(smooth.targets(fp32)))
    notes = [] if calibrated else ["auto: int8-static not tried (no calibration data)"]
    timing_feeds = samples.decision[0] if samples.decision else None
    shape = (
        ", ".join(f"{k} {'x'.join(map(str, np.shape(v)))}" for k, v in timing_feeds.items())
        if timing_feeds
        else "n/a"
    )
    candidates: list[dict] = [
        {"precision": "fp32", "within_budget": True, "latency_ratio": 1.0, "verdict": "baseline"}
    ]
    eligible: list[tuple[QuantizeResult, Path, dict]] = []
    fp32_ir = ir.load(fp32_path)
    with tempfile.TemporaryDirectory(prefix="ovo-quant-auto-") as tmp_root:
        for index, (label, tier_options) in enumerate(tried):
            progress.advance(f"candidate {label}", index + 1, len(tried))
            work = Path(tmp_root) / str(index)
            work.mkdir()
            path = work / "model.onnx"
            entry: dict = {"precision": label}
            try:
                result = _quantize_tier(
                    fp32_path, path, tier_options, tier_options.precision, metric, samples, work
                )
                entry.update(
                    accuracy=result.accuracy,
                    within_budget=result.within_budget,
                    drop=result.drop,
                    max_drop=result.max_drop,
                    kept_float=len(result.excluded_nodes),
                    quantized_nodes=result.quantized_nodes,
                    summary=result.summary,
                    guard_path=result.guard_path,
                )
                if result.quantized_nodes == 0:
                    entry.update(verdict="nothing quantized")
                    candidates.append(entry)
                    continue
                latency = compare_latency(
                    fp32_ir, ir.load(path), timing_feeds, rounds=options.latency_rounds
                )
            except Exception as exc:  # a tier that cannot be built is a candidate that lost
                entry.update(verdict="failed", reason=" ".join(str(exc).split())[:300])
                candidates.append(entry)
                continue
            entry.update(latency_ratio=latency.ratio, noise=latency.noise)
            entry["verdict"] = latency.verdict if result.within_budget else "over budget"
            if result.within_budget and latency.verdict == "faster":
                # its folder is its own until the end, data file included (a copy of the
                # .onnx alone would lose a large model's weights)
                eligible.append((result, path, entry))
            candidates.append(entry)
        if not eligible:
            chosen = _quantize_tier(
                fp32_path, out_path, options, "fp32", metric, samples, Path(tmp_root)
            )
            chosen.notes.append("auto: no candidate was both within budget and faster; fp32 kept")
            candidates[0]["chosen"] = True
        else:
            chosen, keep, entry = _pick(eligible)
            _write(onnx.load(str(keep)), out_path)
            chosen.model_path = out_path
            tied = [e["precision"] for _, _, e in eligible if e.get("tied") and e is not entry]
            chosen.notes.append(
                f"auto: chose {entry['precision']} ({entry['latency_ratio']:.2f}x fp32 latency"
                + (
                    f"; tied on speed with {', '.join(tied)}, it is the most accurate)"
                    if tied
                    else ")"
                )
            )
            entry["chosen"] = True
    notes.append(f"auto: latency measured on {shape} (the first decision input set)")
    chosen.notes[:0] = notes
    chosen.candidates = candidates
    return chosen


def _pick(eligible: list[tuple]) -> tuple:
    """The most accurate of the candidates within the fastest one's latency noise."""
    fastest = min(eligible, key=lambda item: item[2]["latency_ratio"])[2]
    ceiling = fastest["latency_ratio"] + fastest["noise"]
    tied = [item for item in eligible if item[2]["latency_ratio"] <= ceiling]
    for _, _, entry in tied:
        entry["tied"] = True
    return min(tied, key=lambda item: (item[0].drop, item[2]["latency_ratio"]))


def run_stage(
    optimized, options: QuantizeOptions, sets: list[dict], reference: list[dict] | None
) -> tuple[object, dict]:
    """The pipeline's quantize stage: lower the verified fp32 model, then the final check.

    Decisions use the decision data (``data``: the user's calibration split, or the
    verification sets when no data is given). The final check scores the lowered model on
    the evaluation data, which no decision saw: against the verified fp32 model on the
    held-out split when the user gave data (the LM guard's evaluation text for perplexity),
    else against the ORIGINAL model's reference outputs on the verification sets.

    Args:
        optimized: The fp32 ``onnx_ir.Model`` after the verified graph passes.
        options: The quantization options (precision != fp32).
        sets: The verification input sets.
        reference: The original model's outputs on ``sets``.

    Returns:
        The lowered ``onnx_ir.Model`` and the report's ``quantization`` section; its
        ``final_check.passed`` is False when the budget is missed, and the caller fails the
        run with ``stage_failure(section)``.

    Raises:
        UserError: the model cannot be run (nothing to measure the budget on) or an option
            does not fit the model.
    """
    import onnx_ir as ir

    from pipeline.runtime.errors import UserError
    from pipeline.runtime.sessions import save_self_contained

    if reference is None:
        raise UserError(
            f"--precision {options.precision} needs a model ONNX Runtime can run: the budget "
            "is measured, never assumed"
        )
    with tempfile.TemporaryDirectory(prefix="ovo-quant-stage-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        out_path = Path(tmp) / "quantized.onnx"
        # A model whose weights are on disk (a large one) stays so: its tensors are written
        # to the stage's own data file, streamed, never gathered into one protobuf.
        save_self_contained(optimized, fp32_path)
        fp32 = onnx.load(str(fp32_path), load_external_data=False)
        try:
            metric = options.metric_for(*io_names(fp32))
            samples = samples_for(fp32, fp32_path, options, metric, sets, None)
            result = quantize_model(
                fp32_path, out_path, options, reference_feeds=sets, samples=samples
            )
        except ValueError as exc:
            raise UserError(f"quantize {options.precision}: {exc}") from exc
        section = result.to_dict()
        section.pop("model_path", None)
        lowered = ir.load(out_path)
        # Materialize the weights before the temporary folder goes away.
        for graph in lowered.graphs():
            for value in graph.initializers.values():
                if value.const_value is not None and not isinstance(value.const_value, ir.Tensor):
                    value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
        budget = result.max_drop
        final, against = final_check(fp32_path, out_path, options, metric, samples, sets, reference)
    section["final_check"] = final_check_section(final, against, metric, budget)
    return lowered, section


def final_check_section(final, against: str, metric: metrics.Metric, budget: float) -> dict:
    """The report's ``final_check``: the held-out score against ``budget`` (a stage fails its
    run when ``passed`` is False)."""
    return {
        "against": against,
        "metric": metric.name,
        "max_drop": budget,
        "passed": final.within(budget),
        "summary": final.summary(budget),
        "outputs": final.to_dict(),
    }


def final_check(fp32_path, out_path, options, metric, samples: data.Samples, sets, reference):
    """(score, what it was measured against) on the evaluation data."""
    if not metric.from_feeds:
        text = samples.text[1] if samples.text else None
        held_out = LmEvaluator(
            fp32_path, options.tokenizer, options.lm_budget_used(), "evaluation", text
        )
        return held_out.measure(out_path), (
            "the verified fp32 model on held-out text (LM guard: "
            + ("the user's evaluation split)" if text else "the bundled evaluation text)")
        )
    if samples.held_out:
        score = metrics.Evaluator(fp32_path, samples.evaluation, metric).measure(out_path)
        return (
            score,
            "the verified fp32 model on the held-out evaluation data "
            f"({samples.roles['evaluation']})",
        )
    sess = guard.session(str(out_path), "all")
    outputs = [guard.run(sess, feeds) for feeds in sets]
    return metric.score(reference, outputs, sets), "original model (reference outputs)"


def stage_failure(section: dict) -> str | None:
    """The one-line failure of a quantize stage ("quantize int8-dynamic: mean cosine 0.981
    < 0.995 on 'out'"), or None when its final check passed."""
    check = section.get("final_check") or {}
    if check.get("passed", False):
        return None
    return f"quantize {section.get('precision')}: {check.get('summary', 'not verified')}"
