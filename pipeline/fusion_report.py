"""Expected vs. achieved fusions for known model families, so a missed fusion is loud.

A fusion pass that silently stops matching (a new exporter version, an attention written
another way) costs speed and nothing else fails, so nobody notices. This module looks at the
*original* model, recognises its family from the graph, counts the patterns that family's
fusions should fuse, counts the fused ops in the *optimized* model, and says where they
differ::

    family        how it is recognised                       rows
    decoder       an input named past_key_values* / past*    attention, layernorm, gelu
    vit           an input named pixel_values (+ Softmax)    attention, layernorm, gelu
    encoder       Softmax + a Gather reading input_ids       attention, layernorm, gelu
    cnn           Conv nodes                                 batchnorm (folded)

Expected counts: attention = Softmax nodes of the original (one per layer); layernorm =
LayerNorm patterns (standard, contrib or decomposed, matched with fuse_layer_norm's matcher);
skip_layernorm = those fed by an Add that is not an embedding sum (contrib targets only);
gelu = erf/tanh GELU patterns (fuse_gelu's matcher) plus GELU ops already fused; rmsnorm
when there are any; batchnorm = BatchNormalization nodes (all expected folded). A shortfall
gets a note such as "attention not fused in 6 of 6 layers: 6 Softmax remain".
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir

from graph_passes.cleanup.remove_noops import RemoveNoops
from graph_passes.fusions._layer_norm_match import LayerNormMatcher
from graph_passes.fusions.gelu import match_gelu
from graph_passes.fusions.rms_norm import FuseRMSNorm
from graph_passes.match import opset_of
from graph_passes.registry import fusions_counting_towards
from graph_passes.shapes import infer_shapes
from graph_passes.target.kernel_timing import KernelCheck
from graph_passes.target.targets import Target

logger = logging.getLogger(__name__)


def _row_ops(row: str) -> frozenset[str]:
    """The fused ops that count as achieved in ``row``: what its fusions declare."""
    return frozenset().union(*(cls.expected.fused_ops for cls in fusions_counting_towards(row)))


ATTENTION_OPS = _row_ops("attention")
LAYER_NORM_OPS = _row_ops("layernorm")
RMS_NORM_OPS = _row_ops("rmsnorm")
GELU_OPS = _row_ops("gelu")
TRANSFORMER_FAMILIES = ("decoder", "vit", "encoder")


@dataclass
class FusionRow:
    """One line of the expected-fusion table."""

    fusion: str
    expected: int
    achieved: int
    note: str = ""
    # Left unfused on purpose: the fused kernel was measured slower on the target, or too
    # noisy to tell ("undecided: timing too noisy"; graph_passes/target/kernel_timing.py).
    # Not a shortfall.
    declined: int = 0

    @property
    def shortfall(self) -> int:
        return max(0, self.expected - self.achieved)

    @property
    def unexplained(self) -> int:
        """Missing fusions that no measurement explains: the ones worth a warning."""
        return max(0, self.shortfall - self.declined)


def _ops(model: ir.Model) -> Counter[str]:
    return Counter(node.op_type for graph in model.graphs() for node in graph)


def detect_family(model: ir.Model) -> str:
    """decoder | vit | encoder | cnn | unknown, from inputs and ops (see the module doc)."""
    names = [v.name or "" for v in model.graph.inputs]
    ops = _ops(model)
    if any(n.startswith("past") or "past_key_values" in n for n in names):
        return "decoder"
    if "pixel_values" in names and ops["Softmax"]:
        return "vit"
    if ops["Softmax"] and _gathers_input_ids(model):
        return "encoder"
    if ops["Conv"]:
        return "cnn"
    return "unknown"


def _gathers_input_ids(model: ir.Model) -> bool:
    ids = [v for v in model.graph.inputs if v.name == "input_ids"]
    if not ids:
        return False
    return any(use.node.op_type == "Gather" for use in ids[0].uses())


@dataclass
class _Patterns:
    layer_norm: int = 0
    skip_layer_norm: int = 0
    rms_norm: int = 0
    gelu: int = 0


def _count_patterns(model: ir.Model) -> _Patterns:
    """Unfused and fused LayerNorm / RMSNorm / GELU patterns in ``model`` (not modified).

    Counted after no-op removal, as the fusions see the graph: Llama exports wrap every
    RMSNorm in float->float Casts that would otherwise hide it from the matcher.
    """
    work = model.clone()
    RemoveNoops()(work)
    infer_shapes(work)
    opset = opset_of(work)
    found = _Patterns()
    layer_norm, rms = LayerNormMatcher(opset), FuseRMSNorm()
    rms._opset = opset  # the matcher reads ReduceMean's axes by opset
    claimed: set[ir.Node] = set()
    for graph in work.graphs():
        for node in reversed(list(graph)):
            if node in claimed:
                continue
            if node.op_type in LAYER_NORM_OPS or node.op_type in RMS_NORM_OPS:
                fed_by_add = node.inputs[0] is not None and _made_by(node.inputs[0], "Add")
                if node.op_type in RMS_NORM_OPS:
                    found.rms_norm += 1
                else:
                    found.layer_norm += 1
                    skip = node.op_type == "SkipLayerNormalization" or (
                        fed_by_add and not _embedding_sum(node.inputs[0])
                    )
                    found.skip_layer_norm += int(skip)
                continue
            if node.op_type in GELU_OPS:
                found.gelu += 1
                continue
            ln = layer_norm.match(node)
            if ln is not None:
                claimed.update(ln[-1])
                found.layer_norm += 1
                found.skip_layer_norm += int(_made_by(ln[0], "Add") and not _embedding_sum(ln[0]))
                continue
            rms_match = rms.match(node)
            if rms_match is not None:
                claimed.update(rms_match[-1])
                found.rms_norm += 1
                continue
            gelu = match_gelu(node)
            if gelu is not None:
                found.gelu += 1
    return found


def _embedding_sum(value: ir.Value, depth: int = 3) -> bool:
    """A sum of embedding lookups only (word + position + token type Gathers, constants).

    Its LayerNorm is the embedding LayerNorm, whose position-embedding operand ORT's kernel
    accepts only when its shape is provably [1, S, C]: it may become a SkipLN, but is not
    expected to.
    """
    node = value.producer()
    if node is None or node.op_type != "Add" or depth == 0:
        return False
    return all(v is not None and _embedding_operand(v, depth - 1) for v in node.inputs)


def _embedding_operand(value: ir.Value, depth: int) -> bool:
    node = value.producer()
    if node is None:
        return value.const_value is not None  # an initializer (a learned position table)
    return node.op_type == "Gather" or _embedding_sum(value, depth)


def _made_by(value: ir.Value, op: str) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == op


def _row(
    fusion: str,
    expected: int,
    achieved: int,
    unit: str,
    why: str = "",
    slower: list[KernelCheck] = (),
) -> FusionRow:
    """The row; ``slower``: this row's fusions the target declined, measured slower or
    ``undecided`` (too noisy to tell: the unfused form is kept). Both are explained, not a
    shortfall."""
    note = ""
    declined = min(len(slower), max(0, expected - achieved))
    if achieved < expected:
        note = f"{fusion} not fused in {expected - achieved} of {expected} {unit}"
        if declined:
            measured = [c for c in slower if c.verdict != "undecided"]
            noisy = [c for c in slower if c.verdict == "undecided"]
            why = [c[0].describe() for c in (measured, noisy) if c]
            note += f": {declined} left out on purpose, {'; '.join(why)}"
        elif why:
            note += f": {why}"
        if declined < expected - achieved:
            logger.warning("expected-fusion check: %s", note)
    return FusionRow(fusion, expected, achieved, note, declined)


def _declined(target: Target, ops: frozenset[str]) -> list[KernelCheck]:
    """The target's declined measurements (slower or undecided) whose fused op is one of
    ``ops``."""
    return [c for c in target.kernel_checks if c.declined and c.fused.split(".")[-1] in ops]


def kernel_timing_rows(checks: list[KernelCheck]) -> list[dict]:
    """The report's ``kernel_timing`` section: each distinct measurement once, with how
    many matched patterns it decided."""
    rows: dict[tuple, dict] = {}
    for check in checks:
        key = (check.fused, check.replaced, check.shape, check.ratio, check.verdict)
        row = rows.setdefault(key, {**dataclasses.asdict(check), "patterns": 0})
        row["patterns"] += 1
    return list(rows.values())


def expected_fusions(
    original: ir.Model, optimized: ir.Model, target: Target | None = None
) -> list[FusionRow]:
    """Expected vs. achieved fusion counts for ``original`` -> ``optimized``.

    Rows only for the fusions the detected family should get (and, for an unknown family,
    for any pattern found); a shortfall has a loud ``note``.
    """
    target = target or Target()
    family = detect_family(original)
    before, after = _ops(original), _ops(optimized)
    rows: list[FusionRow] = []
    if family == "cnn" or (family == "unknown" and before["BatchNormalization"]):
        expected = before["BatchNormalization"]
        left = after["BatchNormalization"]
        rows.append(
            _row(
                "batchnorm",
                expected,
                expected - left,
                "BatchNormalization nodes",
                f"{left} BatchNormalization remain",
            )
        )
    if family == "cnn":
        return rows
    patterns = _count_patterns(original)
    remaining = _count_patterns(optimized)
    opset = opset_of(optimized)
    attention = sum(after[op] for op in ATTENTION_OPS)
    if family in TRANSFORMER_FAMILIES or before["Softmax"]:
        rows.append(
            _row(
                "attention",
                before["Softmax"],
                attention,
                "layers",
                f"{after['Softmax']} Softmax remain",
                _declined(target, ATTENTION_OPS),
            )
        )
    layer_norm = sum(after[op] for op in LAYER_NORM_OPS)
    if family in TRANSFORMER_FAMILIES or patterns.layer_norm:
        why = f"{max(0, remaining.layer_norm - layer_norm)} LayerNorm patterns left decomposed"
        if opset < 17:
            why += f" (opset {opset} < 17 has no LayerNormalization: raise_opset to 17)"
        rows.append(_row("layernorm", patterns.layer_norm, layer_norm, "LayerNorms", why))
    if target.allows_contrib and patterns.skip_layer_norm:
        skip = after["SkipLayerNormalization"]
        slower = _declined(target, frozenset({"SkipLayerNormalization"}))
        rows.append(
            _row(
                "skip_layernorm",
                patterns.skip_layer_norm,
                skip,
                "residual LayerNorms",
                slower=slower,
            )
        )
    if patterns.rms_norm:
        rms = sum(after[op] for op in RMS_NORM_OPS)
        why = f"opset {opset} < 23 and no residual Add" if opset < 23 else ""
        slower = _declined(target, RMS_NORM_OPS)
        rows.append(_row("rmsnorm", patterns.rms_norm, rms, "RMSNorms", why, slower))
    gelu = sum(after[op] for op in GELU_OPS)
    if family in TRANSFORMER_FAMILIES or patterns.gelu:
        why = ""
        if opset < 20 and not target.allows_contrib:
            why = f"opset {opset} < 20 has no standard Gelu: raise_opset to 20"
        rows.append(_row("gelu", patterns.gelu, gelu, "GELUs", why, _declined(target, GELU_OPS)))
    return rows
