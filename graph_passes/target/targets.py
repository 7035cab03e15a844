"""Which fused ops a target can run, so a fusion never emits an op its runtime lacks.

A *target* is where the optimized model will run:

- ``cpu`` / ``cuda``: ONNX Runtime with that execution provider. Fusions may emit
  ``com.microsoft`` contrib ops, but only those that have a kernel there.
- ``portable``: any ONNX runtime, TensorRT's parser included. Standard-domain ops only,
  each at the opset it was introduced (each fusion declares those opsets); never a
  contrib op.

Why contrib kernels are probed rather than read from ORT's kernel registry: with the
``onnxruntime-gpu`` wheel on a machine without CUDA libraries,
``onnxruntime.capi._pybind_state.get_all_opkernel_def()`` tries to load the CUDA provider
and the process segfaults (seen with ORT 1.31.1). Instead, the exact node a fusion wants to
emit is put alone in a model (inputs with the node's types and known dims) and a CPU
session is created with every graph optimization off; any failure (no kernel, unregistered
op, input types the schema rejects) means the op is not used. Results are cached per probe
model. The verifier runs on CPU, so a ``cuda`` target
also needs the CPU kernel; which contrib ops ORT's CUDA provider has cannot be probed
without a GPU and is declared by each fusion (``Fusion.emits``, graph_passes/fusion.py).

Having a kernel is not the same as the kernel being faster: with ``time_kernels`` a ``cpu``
target also times each rewrite against the nodes it replaces (``rewrite_pays``,
graph_passes/target/kernel_timing.py) and the fusion is left out where it is slower.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import onnx
import onnx_ir as ir

from pipeline.runtime.sessions import open_session

logger = logging.getLogger(__name__)

TARGETS = ("cpu", "cuda", "portable")
CONTRIB_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Target:
    """Where the optimized model runs; fusions ask it before emitting an op."""

    name: str = "cpu"
    # Raise the model's default-domain opset up to this (0: never) when that lets a
    # standard fused op be used; the ``raise_opset`` pass does it before the fusions.
    raise_opset_to: int = 0
    # Time each contrib fusion against the nodes it replaces (graph_passes/target/kernel_timing.py)
    # and decline it where the fused kernel is slower. Only a ``cpu`` target is measured:
    # that is the provider this machine has. Off by default so that unit tests of a
    # fusion's pattern do not depend on timing; the pipeline turns it on.
    time_kernels: bool = False
    # With ``time_kernels``: measure again instead of using this machine's stored verdicts,
    # and replace them with the new clean ones (the CLI's ``--retime``).
    retime: bool = False
    # Every measurement this target made, in order, for the report (shared by the passes
    # of one run; not part of the target's identity).
    kernel_checks: list = field(default_factory=list, compare=False, hash=False, repr=False)
    # the matched patterns already in ``kernel_checks``, by the names of the values the
    # replaced nodes compute (unique in a graph, kept by copies; node names may be empty): a
    # pattern declined in one fixed-point iteration is matched again in the next
    _checked: set = field(default_factory=set, compare=False, hash=False, repr=False)

    KINDS: ClassVar[tuple[str, ...]] = TARGETS

    def __post_init__(self) -> None:
        if self.name not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.name!r}")

    @property
    def measures(self) -> bool:
        """Whether fusions are timed here before they are applied (``time_kernels`` on a
        ``cpu`` target: the only provider this machine is sure to have)."""
        return self.time_kernels and self.name == "cpu"

    @property
    def allows_contrib(self) -> bool:
        """Whether com.microsoft ops may be emitted at all."""
        return self.name != "portable"

    @property
    def zeroes_fully_masked_attention(self) -> bool:
        """Whether the standard ``Attention`` (opset 23) returns 0, not NaN, for a query row
        whose every key is masked, with a boolean or an additive ``-inf`` mask: then the NaN
        guard an SDPA export puts on such rows is an identity after it. Probed on ORT's CPU
        kernel for a ``cpu`` target (ORT 1.31: 0); not known elsewhere, so False."""
        return self.name == "cpu" and _attention_zeroes_fully_masked_rows()

    def supports(self, node: ir.Node) -> bool:
        """Whether this target can run ``node`` (a node a fusion is about to emit).

        Standard-domain nodes are accepted (the fusion checks the opset against its
        ``emits``); contrib nodes need ``allows_contrib`` and a CPU kernel. Which contrib ops
        ORT's CUDA provider has is a fact of each fusion (``Fusion.can_emit``).
        """
        if node.domain in ("", "ai.onnx"):
            return True
        if node.domain != CONTRIB_DOMAIN or not self.allows_contrib:
            return False
        key = (node.domain, node.op_type, tuple(_dtype_of(v) for v in node.inputs))
        return _has_cpu_kernel(key, _node_proto(node))

    def rewrite_pays(
        self,
        before: Sequence[ir.Node],
        before_outputs: Sequence[ir.Value],
        after: Sequence[ir.Node],
        after_outputs: Sequence[ir.Value],
        shapes=None,
        shadows: Sequence[str] = (),
    ) -> bool:
        """Whether to apply a rewrite of ``before`` into ``after`` (the fused nodes).

        False only when the target is measured and the fused nodes are slower beyond noise,
        or too noisy to tell (``undecided``: the unfused form is kept).
        """
        check = self.measure_rewrite(before, before_outputs, after, after_outputs, shapes, shadows)
        return check is None or not check.declined

    def measure_rewrite(
        self,
        before: Sequence[ir.Node],
        before_outputs: Sequence[ir.Value],
        after: Sequence[ir.Node],
        after_outputs: Sequence[ir.Value],
        shapes=None,
        shadows: Sequence[str] = (),
    ):  # -> KernelCheck | None
        """Time ``after`` against ``before`` on this target (``graph_passes/kernel_timing``).

        None when this target is not measured (``time_kernels`` off, or not ``cpu``: only
        the local CPU can be timed here). Each measurement is kept in ``kernel_checks``.
        ``shapes``: proven dims by ``id()`` of a value; ``shadows``: ORT transformers off on
        the unfused side (both as ``kernel_timing.check_rewrite``).
        """
        if not self.measures or not before:
            return None
        from graph_passes.target.kernel_timing import check_rewrite

        graph = before[0].graph
        opsets = dict(graph.opset_imports) if graph is not None else {}
        for node in after:
            opsets.setdefault(node.domain, 1)
        opsets.setdefault("", 17)
        check = check_rewrite(
            before,
            before_outputs,
            after,
            after_outputs,
            opsets,
            shapes=shapes,
            shadows=shadows,
            retime=self.retime,
        )
        pattern = (check.fused, tuple(v.name for node in before for v in node.outputs))
        if pattern not in self._checked:
            self._checked.add(pattern)
            self.kernel_checks.append(check)
            logger.info("kernel timing: %s", check.describe())
        return check


def _dtype_of(value: ir.Value | None) -> int:
    if value is None or value.dtype is None:
        return 0
    return int(value.dtype)


def _node_proto(node: ir.Node) -> bytes:
    """The node alone as a serialized ModelProto whose inputs have the node's input types."""
    inputs, names = [], []
    for i, value in enumerate(node.inputs):
        if value is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        dtype = _dtype_of(value) or onnx.TensorProto.FLOAT
        shape = (
            None
            if value.shape is None
            else [d if isinstance(d, int) else None for d in value.shape]
        )
        inputs.append(onnx.helper.make_tensor_value_info(name, dtype, shape))
    outputs = [f"out{i}" for i in range(len(node.outputs))]
    attributes = [ir.serde.serialize_attribute(a) for a in node.attributes.values()]
    proto = onnx.helper.make_node(node.op_type, names, outputs, domain=node.domain)
    proto.attribute.extend(attributes)
    graph = onnx.helper.make_graph(
        [proto],
        "probe",
        inputs,
        [onnx.helper.make_empty_tensor_value_info(o) for o in outputs],
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid(node.domain, 1)],
        ir_version=8,
    )
    return model.SerializeToString()


@functools.lru_cache(maxsize=256)
def _has_cpu_kernel(key: tuple, model_bytes: bytes) -> bool:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        open_session(model_bytes, options)
    except Exception as exc:  # noqa: BLE001 - no kernel, unknown op, or wrong input types
        logger.info("%s.%s with input types %s cannot run on CPU: %s", *key[:3], exc)
        return False
    return True


@functools.cache
def _attention_zeroes_fully_masked_rows() -> bool:
    """Run Attention-23 once per mask kind on a row with every key masked: all zeros?"""
    import numpy as np
    import onnxruntime as ort

    helper, tensor = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(0)
    qkv = {name: rng.standard_normal((1, 1, 2, 4)).astype(np.float32) for name in "qkv"}
    masks = {
        tensor.BOOL: np.array([[[[False, False], [True, True]]]]),
        tensor.FLOAT: np.array([[[[-np.inf, -np.inf], [0.0, 0.0]]]], np.float32),
    }
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for kind, mask in masks.items():
        graph = helper.make_graph(
            [helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"])],
            "probe",
            [helper.make_tensor_value_info(n, tensor.FLOAT, [1, 1, 2, 4]) for n in "qkv"]
            + [helper.make_tensor_value_info("mask", kind, [1, 1, 2, 2])],
            [helper.make_tensor_value_info("y", tensor.FLOAT, [1, 1, 2, 4])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
        try:
            session = open_session(model.SerializeToString(), options)
            (y,) = session.run(None, {**qkv, "mask": mask})
        except Exception as exc:  # noqa: BLE001 - no kernel: the guard stays
            logger.info("Attention-23 probe failed: %s", exc)
            return False
        if not np.array_equal(y[0, 0, 0], np.zeros(4, np.float32)):
            return False
    return True
