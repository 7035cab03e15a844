"""What every graph pass is: an in-place onnx-ir pass that counts its rewrites.

A pass has a registry ``name``, one ``call(model) -> PassResult`` with an honest ``modified``
flag, and sets ``self.matches`` to the number of rewrites it made in that call so the pass
manager can report it. Passes must never mutate a tensor object in place (replace the value's
``const_value`` instead): the pass manager snapshots models with ``Model.clone()``, which
shares tensors, to roll a bad pass back cheaply.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.target.targets import Target


class GraphPass(ir.passes.InPlacePass):
    """Base class of our passes; subclasses implement ``call`` and set ``matches``."""

    name: ClassVar[str] = ""
    # Passes that must come before this one when a recipe has both (recipes are checked
    # against these on load): e.g. remove_dead collects what the others left behind.
    runs_after: ClassVar[tuple[str, ...]] = ()
    # Runs only once the other passes of the recipe have stopped changing the model (and
    # from then on in every iteration): for a rewrite that would hide the patterns other
    # fusions match, such as packing q/k/v before attention is fused.
    after_fixed_point: ClassVar[bool] = False

    def __init__(self, target: Target | None = None) -> None:
        super().__init__()
        self.matches = 0
        # Where the model will run; fusions ask it which ops they may emit.
        self.target = target or Target()

    def result(self, model: ir.Model) -> ir.passes.PassResult:
        """The PassResult for this call, modified exactly when something was rewritten."""
        return ir.passes.PassResult(model, modified=self.matches > 0)


def is_graph_output(value: ir.Value) -> bool:
    """True when the value is an output of the graph that produces it (so it keeps its name)."""
    return value.is_graph_output()


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Redirect every use of ``old`` to ``new``, keeping the graph's signature stable.

    When ``old`` is a graph output, ``new`` takes its place, its name and its declared type
    and shape (the declared output shape is a contract with the caller; a simplifier that
    turned ``[32, 1, 8210]`` into ``[1, 262720]`` broke exactly that). Check ``can_replace``
    first.
    """
    if old.is_graph_output():
        name, type_, shape = old.name, old.type, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = None
        new.name = name
        if type_ is not None:
            new.type = type_
        if shape is not None:
            new.shape = shape
    else:
        old.replace_all_uses_with(new)


def take_over(old: ir.Value, new: ir.Value) -> None:
    """``new`` (a fused node's output) replaces ``old`` everywhere, with its type, shape and
    name, so the graph reads the same to anyone who looks values up by name."""
    new.type, new.shape = old.type, old.shape
    name = old.name
    replace_value(old, new)
    new.name = name


def can_replace(old: ir.Value, new: ir.Value) -> bool:
    """Whether ``replace_value(old, new)`` keeps the graph valid."""
    if not old.is_graph_output():
        return True
    if new.is_graph_input() or new.is_graph_output() or new.is_initializer():
        return False
    # An outer-scope value cannot become a subgraph's output by renaming.
    return new.graph is old.graph


STANDARD_DOMAINS = ("", "ai.onnx")

# Ops whose every call draws fresh random numbers, in any domain (com.microsoft has the
# dropout variants; a custom op with one of these names is assumed random too).
NON_DETERMINISTIC_OPS = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "BiasDropout",
        "BitmaskDropout",
        "BitmaskBiasDropout",
    }
)


def is_standard(node: ir.Node) -> bool:
    """True for nodes of the default ONNX operator set (not ai.onnx.ml, not custom ops)."""
    return node.domain in STANDARD_DOMAINS


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The value's tensor when it is a true constant, else None.

    A true constant is an initializer that is NOT also a graph input (old exporters list
    weights as inputs, which makes them overridable at run time, so they are not constants)
    or the output of a standard ``Constant`` node with a ``value`` attribute.
    """
    if value is None:
        return None
    if value.is_graph_input():
        return None
    if value.const_value is not None and value.is_initializer():
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and is_standard(producer):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor()
        if value.const_value is not None:
            return value.const_value
    return None


def constant_array(value: ir.Value | None):  # -> np.ndarray | None
    """``constant_tensor(value)`` as a numpy array (None when not a true constant)."""
    tensor = constant_tensor(value)
    return None if tensor is None else tensor.numpy()


REDUCE_AXES_INPUT_OPSET = 18  # ReduceMean & co. took ``axes`` as an input from opset 18


def reduces_last_axis(node: ir.Node, rank: int | None, opset: int) -> bool:
    """A Reduce* node over the last axis alone with keepdims=1 (axes as attribute or input)."""
    if node.attributes.get_int("keepdims", 1) != 1:
        return False
    if (node.version or opset) < REDUCE_AXES_INPUT_OPSET:
        axes = node.attributes.get_ints("axes", None)
    else:
        axes = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if axes is None or np.asarray(axes).size != 1:
        return False
    axis = int(np.asarray(axes).reshape(-1)[0])
    return axis == -1 or (rank is not None and axis == rank - 1)


def outside_use(nodes: list[ir.Node]) -> str | None:
    """Why a pattern (its nodes, root last) cannot be replaced: the first intermediate
    that is a graph output or feeds a node outside the pattern; None when all are private."""
    inside = set(nodes)
    for node in nodes[:-1]:
        out = node.outputs[0]
        if out.is_graph_output() or any(use.node not in inside for use in out.uses()):
            return f"intermediate {out.name} is used outside the pattern"
    return None
