"""Does a fused kernel beat the nodes it replaces? Timed where the model runs, side by side.

Why measure: ONNX Runtime's contrib kernels are not all faster than the standard ops they
replace. With ORT 1.31.1 on a 2-core AVX2 CPU, float ``SkipLayerNormalization`` is a scalar
per-row loop with a division per element; it ran 4.6x slower (1 thread) to 15x slower
(2 threads) than ``Add`` + ``LayerNormalization``, whose kernel is vectorised. On
all-MiniLM-L6-v2 its 12 instances cost about 5% of the model's latency, enough to make the
fused model slower than the unfused export. Whether a fused kernel pays depends on the
provider, the ORT version and the CPU, so a fusion that targets the local CPU asks this
module instead of assuming.

How: the matched nodes and the fused node(s) are each cut out into a small model. Inputs
keep their types and shapes; constants stay initializers (so kernels pre-pack weights as they
do in the real model); symbolic dims become concrete (a symbol first seen on axis 0 is 1,
the batch; any other is ``TOKENS``). Both run in ORT CPU sessions at ``ORT_ENABLE_ALL``
(what users run), interleaved A B / B A, each sample repeated to at least
``MIN_SAMPLE_SECONDS``; the evidence is the per-round ratio fused/original. The fused form
is called slower only when the median ratio is above ``1 + MARGIN`` and the noise of the
project's one timing rule (``pipeline.runtime.timing``: the median's confidence interval).
Near-ties keep the fusion: a kernel a few percent slower costs a fraction of a percent of a
whole model, while declining on a tie would make the output flip between
runs with the noise. A rewrite that cannot be cut out or run (unknown rank, a subgraph
attribute, shape inputs that random data breaks) is "unmeasured" and keeps the fusion as
before. Verdicts are kept per structure (op types, attributes, shapes, small constants) in
this machine's timing store (``timing_store``): identical layers cost one measurement, and
optimizing the same model again reuses the verdicts, so it writes the same file.

Only a clean measurement decides, and only a clean one is stored. A measurement is clean
when its noise (``ratio_stats``' ``noise``: the median's CI half-width or the block drift,
whichever is larger) is below ``MARGIN``, or when its verdict is ``faster`` or ``slower``
despite the noise: ``verdict`` says so only when the ratio is off 1 by more than both the
margin and the noise, so the whole confidence interval lies beyond the margin on one side,
and a quieter re-measurement would land there too (it narrows the interval, it does not move
it across). What noise can turn is a ``same``: with noise at or above the margin the interval
reaches past ``1 +- MARGIN``, so the fused kernel may well be slower (or faster) beyond the
margin, and such a ``same`` once stuck in the store for every later run (issue 15: two runs
started side by side decided differently). An unclean measurement is taken again, up to
``ATTEMPTS`` in all: a burst of load from another job usually passes within a second or two,
and more attempts on a machine that stays loaded only cost time (each is up to
``MAX_ROUNDS`` rounds of at least ``MIN_SAMPLE_SECONDS`` per side, per distinct structure)
without making the answer better. If none is clean the verdict is ``undecided``: the fusion
is not applied at that site (the unfused form is kept, the way a ``slower`` one is), nothing
is stored, and a later, quieter run measures again. Identical structures later in the same
process get the same ``undecided`` without measuring (one decision per structure per run).
``retime`` (the CLI's ``--retime``) ignores stored verdicts, measures each structure again
(once per process) and replaces the stored verdict with the new one when it is clean.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from graph_passes.target import timing_store
from pipeline.runtime.sessions import open_session
from pipeline.runtime.timing import interleaved_rounds, ratio_stats, runs_per_sample, verdict

logger = logging.getLogger(__name__)

TOKENS = 128  # size given to a symbolic dim that is not a batch (sequence, tokens)
BATCH = 1
MAX_INPUT_ELEMENTS = 2**24  # 64 MB of float: far above any activation at 1 x TOKENS
MARGIN = 0.10  # a fused form within 10% of the original is "same" and kept
MIN_SAMPLE_SECONDS = 0.01
MIN_ROUNDS = 9
MAX_ROUNDS = 21
DECISIVE = 0.15  # stop early once every round is this far on one side of 1
ATTEMPTS = 3  # measurements of one structure, in all, before it is called undecided
UNDECIDED = "undecided: timing too noisy"


@dataclass(frozen=True)
class KernelCheck:
    """One measured rewrite: the fused op against the ops it replaces."""

    fused: str  # "com.microsoft.SkipLayerNormalization"
    replaced: str  # "Add, LayerNormalization"
    shape: str  # the largest input's concrete shape, e.g. "1x128x384"
    ratio: float | None  # median fused/original time; None when unmeasured
    rounds: int
    verdict: str  # faster | same | slower | undecided | unmeasured
    reason: str = ""  # why unmeasured, or UNDECIDED
    stored: bool = False  # the verdict came from this machine's timing store, not measured now
    noise: float | None = None  # ratio_stats' noise of the measurement the verdict rests on
    attempts: int = 0  # measurements taken in this run (0: from the store, or unmeasured)

    @property
    def declined(self) -> bool:
        """The fusion should not be applied: the fused form is measured slower, or every
        attempt was too noisy to tell (``undecided``: the unfused form is kept)."""
        return self.verdict in ("slower", "undecided")

    def describe(self) -> str:
        if self.ratio is None:
            return f"{self.fused} vs {self.replaced}: unmeasured ({self.reason})"
        if self.verdict == "undecided":
            return (
                f"{self.fused} vs {self.replaced} at {self.shape}: {UNDECIDED} "
                f"(noise ±{self.noise:.2f} in each of {self.attempts} attempts, "
                f"{self.ratio:.2f}x the time in the quietest)"
            )
        source = ", from the timing store" if self.stored else ""
        return (
            f"{self.fused} vs {self.replaced} at {self.shape}: {self.ratio:.2f}x the time "
            f"({self.verdict}, {self.rounds} rounds{source})"
        )


def check_rewrite(
    before: Sequence[ir.Node],
    before_outputs: Sequence[ir.Value],
    after: Sequence[ir.Node],
    after_outputs: Sequence[ir.Value],
    opsets: dict[str, int],
    *,
    threads: int = 0,
    shapes: Mapping[int, tuple] | None = None,
    shadows: Sequence[str] = (),
    retime: bool = False,
) -> KernelCheck:
    """Time ``after`` (the fused nodes) against ``before`` (the nodes they replace).

    The output lists say which values each side must produce (same order). ``after`` may
    be detached nodes whose inputs are copies (``probe_node``); constants are recognised by
    ``const_value``. ``threads``: ORT intra-op threads (0: ORT's default, as users run).
    ``shapes``: dims a pass has proven beyond ONNX's inference (e.g. with ORT's symbolic
    inference), by ``id()`` of the value or of its probe copy. ``shadows``: ORT's graph
    transformers that would build the fused op themselves (the fusion's ``shadows``); they
    are off for the original side: the question is whether the fused kernel beats the nodes
    it replaces as they run unfused (in a cut-out model with concrete shapes ORT would fuse
    them itself, which it often cannot do in the real graph). ``retime``: measure again
    instead of using a stored verdict, and store the new one when it is clean.
    """
    fused = ", ".join(_op_name(n) for n in after if n not in before)
    replaced = ", ".join(sorted({n.op_type for n in before if n not in after}))
    before, after = _with_shape_sources(before), _with_shape_sources(after)
    outcome: tuple = (None, 0, "", None)
    stored, attempts = False, 0
    for broadcast_ones in (False, True):
        original = _cut(before, before_outputs, opsets, broadcast_ones, shapes or {})
        candidate = _cut(after, after_outputs, opsets, broadcast_ones, shapes or {})
        for side in (original, candidate):
            if isinstance(side, str):
                return KernelCheck(fused, replaced, "", None, 0, "unmeasured", side)
        outcome, stored, attempts = _remembered(original, candidate, threads, shadows, retime)
        if outcome[0] is not None:
            break
    ratio, rounds, verdict, noise = outcome
    if ratio is None:
        return KernelCheck(fused, replaced, candidate.shape, None, 0, "unmeasured", verdict)
    reason = UNDECIDED if verdict == "undecided" else ""
    return KernelCheck(
        fused, replaced, candidate.shape, ratio, rounds, verdict, reason, stored, noise, attempts
    )


def _op_name(node: ir.Node) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain else node.op_type


@dataclass(frozen=True)
class _Cut:
    """A few nodes as a model of their own, with feeds and a structural signature."""

    signature: str  # equal signatures time the same: the cache key
    model: bytes = field(compare=False)
    feeds: tuple[tuple[str, np.ndarray], ...] = field(compare=False)
    shape: str = field(compare=False)

    def feed_dict(self) -> dict[str, np.ndarray]:
        return dict(self.feeds)


def _cut(
    nodes: Sequence[ir.Node],
    outputs: Sequence[ir.Value],
    opsets: dict[str, int],
    broadcast_ones: bool,
    shapes: Mapping[int, tuple],
):
    """The nodes as a standalone model (a ``_Cut``), or a string saying why not.

    Anonymous dims (ONNX inference lost them) are ``TOKENS`` long; with
    ``broadcast_ones``, 1 for inputs that only feed broadcasting ops. The second is the
    retry when the first cannot run: an attention's ``[B, 1, S, S]`` mask bias is four
    anonymous dims after a computed ``Expand``, and 1 always broadcasts. It is not the
    first try because a value feeding only elementwise ops on one side (GELU's Div/Mul)
    may feed a fused op on the other, and both sides must see the same sizes. Before either,
    an anonymous dim takes the size another input of the same rank has on that axis (a
    residual Add's two operands, a SkipLayerNorm's input and skip).
    """
    builder = _CutBuilder(_topological(nodes), broadcast_ones, shapes)
    try:
        for node in builder.nodes:
            builder.add(node)
    except _Uncuttable as exc:
        return str(exc)
    if any(id(o) not in builder.produced for o in outputs):
        return "an output is not produced by the nodes"
    graph = onnx.helper.make_graph(
        builder.protos,
        "kernel_timing",
        builder.inputs,
        [onnx.helper.make_empty_tensor_value_info(builder.name(o)) for o in outputs],
        builder.initializers,
    )
    opset_ids = [onnx.helper.make_opsetid(d, v) for d, v in opsets.items()]
    model = onnx.helper.make_model(graph, opset_imports=opset_ids)
    model.ir_version = min(model.ir_version, 10)  # ORT 1.31 reads IR <= 13; opsets <= 22
    builder.signature.append(f"out{[builder.name(o) for o in outputs]}")
    signature = "|".join(builder.signature)
    return _Cut(signature, model.SerializeToString(), tuple(builder.feeds), builder.shape)


class _Uncuttable(Exception):
    """The nodes cannot stand alone (the message says why)."""


class _CutBuilder:
    """Collects the protos, inputs, initializers, feeds and signature of a cut."""

    def __init__(
        self, nodes: list[ir.Node], broadcast_ones: bool, shapes: Mapping[int, tuple]
    ) -> None:
        self.nodes = nodes
        self.broadcast_ones = broadcast_ones
        self.shapes = shapes
        self.produced = {id(o) for n in nodes for o in n.outputs}
        self.names: dict[int, str] = {}
        self.symbols: dict[str, int] = {}
        self.rng = np.random.default_rng(0)
        self.inputs: list = []
        self.initializers: list = []
        self.protos: list = []
        self.feeds: list[tuple[str, np.ndarray]] = []
        self.signature: list[str] = []
        self.shape, self.largest = "", -1  # the largest generated input, for the report
        self.axis_hints = self._axis_hints()

    def dims(self, value: ir.Value) -> tuple | None:
        """ONNX's dims, anonymous ones filled from the pass's proven shapes."""
        own, proven = _dims(value), self.shapes.get(id(value))
        if proven is None or (own is not None and len(own) != len(proven)):
            return own
        if own is None:
            return tuple(_symbol(d) if not isinstance(d, int) else d for d in proven)
        return tuple(
            a if a is not None else (b if isinstance(b, int) else _symbol(b))
            for a, b in zip(own, proven, strict=True)
        )

    def _hinted(self, value: ir.Value, dims: tuple) -> tuple:
        """Anonymous dims take the hint; a symbol takes a static hint (and keeps it)."""
        hints = self.axis_hints.get(id(value), {})
        hinted = []
        for axis, dim in enumerate(dims):
            hint = hints.get(axis)
            if dim is None:
                dim = hint
            elif isinstance(dim, str) and isinstance(hint, int):
                dim = self.symbols.setdefault(dim, hint)
            hinted.append(dim)
        return tuple(hinted)

    def _axis_hints(self) -> dict[int, dict[int, int | str]]:
        """id(input) -> {axis: the size another input of the same node and rank has there}
        (constants included, ints before symbols, broadcast 1s ignored), for nodes whose
        inputs line up axis by axis (``ALIGNED_OPS``): ViT's class-token Concat is
        ``[?, ?, 768]`` but the position embedding it is added to is ``[1, 197, 768]``.
        Only a node's own operands count: an unrelated weight of the same rank elsewhere in
        the cut says nothing about this input (taking it once made a 384 x 1152 packed
        weight set the batch to 384 and the sequence to 1152)."""
        hints: dict[int, dict[int, int | str]] = {}
        for node in self.nodes:
            if node.op_type not in ALIGNED_OPS:
                continue
            operands = [(v, self._known_dims(v)) for v in node.inputs if v is not None]
            for value, dims in operands:
                if id(value) in self.produced or dims is None:
                    continue
                own = hints.setdefault(id(value), {})
                for other, other_dims in operands:
                    if other is value or other_dims is None or len(other_dims) != len(dims):
                        continue
                    for axis, dim in enumerate(other_dims):
                        if dim is not None and dim != 1 and not isinstance(own.get(axis), int):
                            own[axis] = dim
        return hints

    def _known_dims(self, value: ir.Value) -> tuple | None:
        tensor = _constant(value)
        return tuple(tensor.shape) if tensor is not None else self.dims(value)

    def name(self, value: ir.Value) -> str:
        return self.names.setdefault(id(value), f"v{len(self.names)}")

    def add(self, node: ir.Node) -> None:
        graphs = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        if any(a.type in graphs for a in node.attributes.values()):
            raise _Uncuttable(f"{node.op_type} has a subgraph")
        in_names = [self._input(value) for value in node.inputs]
        out_names = [self.name(o) for o in node.outputs]
        proto = onnx.helper.make_node(node.op_type, in_names, out_names, domain=node.domain)
        attributes = [ir.serde.serialize_attribute(a) for a in node.attributes.values()]
        proto.attribute.extend(attributes)
        self.protos.append(proto)
        text = sorted(str(a).replace("\n", " ") for a in attributes)
        self.signature.append(f"{_op_name(node)}{text}")

    def _input(self, value: ir.Value | None) -> str:
        """The input's name in the cut; a first-seen outside value becomes an initializer
        (a constant) or a graph input with generated data."""
        if value is None:
            self.signature.append("-")
            return ""
        seen = id(value) in self.names
        name = self.name(value)
        if seen or id(value) in self.produced:
            self.signature.append(f"@{name}")
            return name
        tensor = _constant(value)
        if tensor is not None:
            proto = ir.serde.serialize_tensor(tensor)
            proto.name = name
            self.initializers.append(proto)
            self.signature.append(_constant_signature(tensor))
            return name
        ones = self.broadcast_ones and _broadcast_only(value, self.nodes)
        anonymous = 1 if ones else TOKENS
        dims = self.dims(value)
        if dims is not None:
            dims = self._hinted(value, dims)
        shape = _concrete(dims, self.symbols, value.name, anonymous)
        data = _random(value.dtype, shape, self.rng)
        if data is None:
            raise _Uncuttable(f"input of type {value.dtype} cannot be generated")
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise _Uncuttable(f"a generated input of {shape} is too large to time")
        if math.prod(shape) > self.largest:
            self.largest, self.shape = math.prod(shape), "x".join(map(str, shape))
        self.inputs.append(onnx.helper.make_tensor_value_info(name, int(value.dtype), shape))
        self.feeds.append((name, data))
        self.signature.append(f"in{value.dtype}{shape}")
        return name


SHAPE_OPS = frozenset(
    {
        "Shape",
        "Size",
        "Gather",
        "Concat",
        "Unsqueeze",
        "Squeeze",
        "Slice",
        "Cast",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Equal",
        "Where",
        "Max",
        "Min",
        "Reshape",
        "Range",
        "Constant",
    }
)
INTEGER_TYPES = (ir.DataType.INT64, ir.DataType.INT32)
BROADCASTING_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Max", "Min"})
# ops whose (same-rank) inputs have equal sizes axis by axis, up to broadcast 1s
ALIGNED_OPS = BROADCASTING_OPS | {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}
MAX_SHAPE_NODES = 64


def _with_shape_sources(nodes: Sequence[ir.Node]) -> list[ir.Node]:
    """``nodes`` plus the integer shape arithmetic that computes their integer inputs.

    A Reshape whose target shape is computed from ``Shape(x)`` outside the pattern would get
    random data for it and fail; with the computation included, the shape follows from the
    concrete input shapes. Only standard shape ops on int32/int64 values are followed.
    """
    result = list(nodes)
    inside = set(result)
    stack = [v for n in nodes for v in n.inputs if v is not None]
    while stack and len(result) < len(nodes) + MAX_SHAPE_NODES:
        value = stack.pop()
        node = value.producer()
        if (
            node is None
            or node in inside
            or value.dtype not in INTEGER_TYPES
            or value.const_value is not None
            or node.domain not in ("", "ai.onnx")
            or node.op_type not in SHAPE_OPS
        ):
            continue
        inside.add(node)
        result.append(node)
        stack.extend(v for v in node.inputs if v is not None)
    return result


def _topological(nodes: Sequence[ir.Node]) -> list[ir.Node]:
    """The nodes with every producer before its consumers (patterns list them root last or
    in match order)."""
    pending, ordered, done = list(nodes), [], set()
    inside = {id(o) for n in nodes for o in n.outputs}
    while pending:
        ready = [
            n
            for n in pending
            if all(v is None or id(v) not in inside or id(v) in done for v in n.inputs)
        ]
        if not ready:  # a cycle cannot happen in a valid graph; keep the given order
            return ordered + pending
        for node in ready:
            ordered.append(node)
            pending.remove(node)
            done.update(id(o) for o in node.outputs)
    return ordered


def _constant(value: ir.Value) -> ir.TensorProtocol | None:
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and not producer.domain:
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor()
    return None


def _constant_signature(tensor: ir.TensorProtocol) -> str:
    """Shape and dtype; small constants (shapes, axes, scales) also by value."""
    shape = tuple(tensor.shape)
    if math.prod(shape) <= 16:
        return f"c{tensor.dtype}{shape}{tensor.numpy().tolist()}"
    return f"c{tensor.dtype}{shape}"


def _dims(value: ir.Value) -> tuple | None:
    """The value's dims: ints, symbol names, None for an anonymous dim."""
    if value.shape is None:
        return None
    return tuple(
        d if isinstance(d, int) else _symbol(getattr(d, "value", None)) for d in value.shape
    )


def _symbol(name: str | None) -> str | None:
    """A named dim, or None for an anonymous one (``unk__N`` is fresh per inference)."""
    return None if not name or name.startswith("unk__") else name


def _broadcast_only(value: ir.Value, nodes: Sequence[ir.Node]) -> bool:
    """Whether every use of ``value`` in the cut is a broadcasting elementwise op."""
    uses = [u for u in value.uses() if u.node in nodes]
    return bool(uses) and all(u.node.op_type in BROADCASTING_OPS for u in uses)


def _concrete(
    dims: tuple | None, symbols: dict[str, int], name: str | None, anonymous: int
) -> list[int]:
    """Sizes for timing: a named symbol keeps one size (1 on axis 0, else ``TOKENS``);
    an anonymous dim past axis 0 gets ``anonymous`` (see ``_cut``)."""
    if dims is None:
        raise _Uncuttable(f"{name or 'an input'} has no known rank")
    shape = []
    for axis, dim in enumerate(dims):
        if isinstance(dim, int):
            shape.append(dim)
        elif axis == 0:
            shape.append(BATCH if dim is None else symbols.setdefault(dim, BATCH))
        else:
            shape.append(anonymous if dim is None else symbols.setdefault(dim, TOKENS))
    return shape


def _random(dtype: ir.DataType | None, shape: list[int], rng: np.random.Generator):
    """Data for timing: values do not matter, only that kernels accept them (masks: ones)."""
    if dtype is None:
        return None
    np_type = dtype.numpy()
    if np.issubdtype(np_type, np.floating):
        return rng.standard_normal(shape).astype(np_type)
    if np.issubdtype(np_type, np.integer) or np_type == np.bool_:
        return np.ones(shape, dtype=np_type)
    return None


def _remembered(
    original: _Cut, candidate: _Cut, threads: int, shadows: Sequence[str], retime: bool = False
) -> tuple[tuple, bool, int]:
    """((ratio, rounds, verdict, noise), whether it came from the store, attempts made): this
    machine's timing store answers when it holds the same structures (``timing_store``: the
    same model optimized twice gets the same verdicts), unless ``retime`` and this process
    has not measured them yet. Otherwise ``_clean_measurement``; only a clean verdict is
    stored (with ``retime`` replacing the stored one). An unmeasured cut is tried again next
    time, an undecided one in the next process."""
    store = timing_store.open_store()
    entry_key = timing_store.key(original.signature, candidate.signature, threads)
    if entry_key in store.undecided:
        return store.undecided[entry_key], False, 0
    known = store.get(entry_key)
    if known is not None and not (retime and entry_key not in store.measured_here):
        return known, entry_key not in store.measured_here, 0
    outcome, attempts = _clean_measurement(original, candidate, threads, shadows)
    if outcome[0] is None:
        return outcome, False, attempts
    if outcome[2] == "undecided":
        store.undecided[entry_key] = outcome
        return outcome, False, attempts
    kept = store.remember(entry_key, outcome, replace=retime)
    return kept, kept != outcome, attempts


def _clean_measurement(
    original: _Cut, candidate: _Cut, threads: int, shadows: Sequence[str]
) -> tuple[tuple, int]:
    """(the first clean measurement, attempts), or (the quietest one with the verdict
    ``undecided``, ``ATTEMPTS``) when none of them is clean (see the module doc)."""
    quietest = None
    for attempt in range(1, ATTEMPTS + 1):
        outcome = _measure(original, candidate, threads, shadows)
        ratio, _, verdict, noise = outcome
        if ratio is None or _clean(verdict, noise):
            return outcome, attempt
        logger.info(
            "kernel timing: attempt %d of %d too noisy (%.2fx ±%.2f, %s)",
            attempt, ATTEMPTS, ratio, noise, verdict,
        )  # fmt: skip
        if quietest is None or noise < quietest[3]:
            quietest = outcome
    return (*quietest[:2], "undecided", quietest[3]), ATTEMPTS


def _clean(verdict: str, noise: float) -> bool:
    """Noise below the margin, or a verdict decisive despite it (the module doc says why)."""
    return noise < MARGIN or verdict in ("faster", "slower")


def _measure(original: _Cut, candidate: _Cut, threads: int, shadows: Sequence[str]):
    """(median ratio, rounds, verdict, noise) or (None, 0, reason, None)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # a guessed shape a kernel rejects is not an error
    # Two sessions side by side on few cores: a worker that spins after its run would steal
    # the other session's CPU (seen: ratios swinging 0.65x-1.7x on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = []
    try:
        for cut, disabled in ((original, list(shadows)), (candidate, [])):
            session = open_session(cut.model, options, disabled_optimizers=disabled)
            feeds = cut.feed_dict()
            single = min(_seconds(session, feeds, 1) for _ in range(3))
            sessions.append((session, feeds, single))
    except Exception as exc:  # noqa: BLE001 - guessed shapes or data the nodes reject
        return None, 0, f"cannot run: {str(exc).splitlines()[0][:160]}", None
    runs = runs_per_sample(min(single for *_, single in sessions), MIN_SAMPLE_SECONDS)
    samplers = [lambda n, s=session, f=feeds: _seconds(s, f, n) for session, feeds, _ in sessions]
    original_times, fused_times = interleaved_rounds(samplers, MAX_ROUNDS, runs, done=_decisive)
    ratios = np.asarray(fused_times) / np.asarray(original_times)
    stats = _stats(ratios)
    return float(np.median(ratios)), len(ratios), verdict(stats, MARGIN), stats.noise


def _seconds(session, feeds: dict, runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feeds)
    return time.perf_counter() - start


def _decisive(samples: list[list[float]]) -> bool:
    """Stop early: enough rounds, and every one of them far on the same side of 1."""
    original, fused = samples
    if len(fused) < MIN_ROUNDS:
        return False
    ratios = np.asarray(fused) / np.asarray(original)
    return bool(np.all(ratios > 1 + DECISIVE) or np.all(ratios < 1 - DECISIVE))


def _verdict(ratios: Sequence[float]) -> str:
    """The project's one noise rule (``runtime.timing``) with this module's margin: slower
    or faster only when the median ratio is off 1 by more than ``MARGIN`` and the noise."""
    return verdict(_stats(ratios), MARGIN)


def _stats(ratios: Sequence[float]):
    """``ratio_stats`` of per-round fused/original ratios."""
    return ratio_stats(np.ones(len(ratios)), np.asarray(ratios, dtype=float))
