"""Random valid ONNX graphs and a differential check of every pass on them.

``random_model(seed)`` builds an opset-17 model from a seeded generator, so the same seed is
the same graph in pytest (hypothesis drives the seed) and in ``scripts/fuzz_passes.py`` (a
plain loop over seeds). The graphs mix what our passes look for: elementwise ops, MatMul and
Gemm with constant weights, Conv + BatchNormalization, Reshape/Transpose/Concat/Slice/Gather/
Squeeze/Unsqueeze chains, Shape -> Gather -> Unsqueeze -> Concat -> Reshape subgraphs on
dynamic and static dims, constants as Constant nodes and initializers (some duplicated),
no-ops (Identity, Dropout, x*1, x+0, ...), duplicated subexpressions, and If nodes with a
constant condition whose branches read outer values. Dynamic dims are named.

``check_model(proto)`` applies each registered pass alone and the default recipe to a fixed
point, and returns one ``Failure`` per pass that crashed, broke the checker or ONNX Runtime,
or changed the outputs beyond rtol=1e-4 / atol=1e-5 on ``generate_input_sets`` inputs.
"""

from __future__ import annotations

import hashlib
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graph_passes.registry import REGISTRY, create_pass
from pipeline.runtime import inputs
from pipeline.runtime import sessions as runners
from pipeline.runtime.compare import Tolerance, compare

OPSET = 17
RTOL, ATOL = 1e-4, 1e-5
RECIPE = "default"

Dim = int | str | None  # static size, named dynamic dim, or unknown
Shape = tuple[Dim, ...]


class _Builder:
    """Accumulates nodes, initializers and the float values (with shapes) built so far."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.values: list[tuple[str, Shape]] = []  # usable float values
        self.inputs: set[str] = set()
        self.arrays: list[np.ndarray] = []  # constants made so far (to duplicate some)
        self.simple: list[onnx.NodeProto] = []  # single-output nodes worth duplicating
        self.shapes: dict[str, Shape] = {}
        self.count = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def pick(self, items: list):
        return items[int(self.rng.integers(len(items)))]

    def const(self, array: np.ndarray, nodes: list[onnx.NodeProto] | None = None) -> str:
        """A constant, as an initializer or a Constant node (``nodes``: inside a branch)."""
        self.arrays.append(array)
        name = self.fresh("c")
        if nodes is None and self.chance(0.5):
            self.initializers.append(numpy_helper.from_array(array, name))
        else:
            tensor = numpy_helper.from_array(array, name + "_value")
            (self.nodes if nodes is None else nodes).append(
                helper.make_node("Constant", [], [name], value=tensor)
            )
        return name

    def floats(self, shape: tuple[int, ...], low: float = 0.0) -> np.ndarray:
        values = self.rng.uniform(-1.0, 1.0, size=shape)
        if low > 0:
            values = np.sign(values + 1e-9) * (low + np.abs(values))
        return values.astype(np.float32)

    def node(self, op: str, inputs: list[str], shape: Shape, simple: bool = False, **attrs):
        out = self.fresh(op.lower())
        node = helper.make_node(op, inputs, [out], **attrs)
        self.nodes.append(node)
        self.values.append((out, shape))
        self.shapes[out] = shape
        if simple:
            self.simple.append(node)
        return out

    def value(self, want: Callable[[Shape], bool] = lambda s: True) -> tuple[str, Shape] | None:
        fits = [v for v in self.values if want(v[1])]
        if not fits:
            return None
        # Prefer recent values so chains grow deep, but reach back sometimes.
        if self.chance(0.6):
            return fits[-1]
        return self.pick(fits)


def _static(dim: Dim) -> bool:
    return isinstance(dim, int)


def _product(dims: Shape) -> Dim:
    if all(_static(d) for d in dims):
        return int(np.prod(dims, dtype=np.int64)) if dims else 1
    return None


# -- the operations ------------------------------------------------------------------------


def _unary(b: _Builder) -> bool:
    x, shape = b.value()
    op = b.pick(["Relu", "Neg", "Sigmoid", "Tanh", "Abs", "Identity", "Dropout", "Relu"])
    b.node(op, [x], shape, simple=op != "Dropout")
    return True


def _binary_const(b: _Builder) -> bool:
    x, shape = b.value()
    op = b.pick(["Add", "Mul", "Sub", "Div"])
    last = shape[-1] if shape else None
    cshape = b.pick([(), (1,)] + ([(last,)] if _static(last) else []))
    if b.chance(0.25):  # a no-op: x + 0, x - 0, x * 1, x / 1
        array = np.full(cshape, 0.0 if op in ("Add", "Sub") else 1.0, np.float32)
    else:
        array = b.floats(cshape, low=0.5 if op == "Div" else 0.0)
        earlier = [a for a in b.arrays if a.dtype == np.float32 and a.shape == cshape]
        if earlier and op != "Div" and b.chance(0.3):  # the same weights twice
            array = b.pick(earlier)
    c = b.const(array)
    if b.chance(0.2) and op != "Div":  # a constant subexpression to fold first
        c = b.node("Add", [c, b.const(b.floats(cshape))], cshape)
        b.values.pop()  # keep constant-only values out of the pool
    if len(cshape) > len(shape):
        shape = cshape
    operands = [c, x] if op in ("Add", "Mul") and b.chance(0.3) else [x, c]
    b.node(op, operands, shape, simple=True)
    return True


def _binary_values(b: _Builder) -> bool:
    x, shape = b.value()
    same = [v for v in b.values if v[1] == shape and None not in shape] or [(x, shape)]
    y, _ = b.pick(same)
    b.node(b.pick(["Add", "Mul", "Sub"]), [x, y], shape, simple=True)
    return True


def _matmul(b: _Builder) -> bool:
    found = b.value(lambda s: len(s) >= 1 and _static(s[-1]))
    if found is None:
        return False
    x, shape = found
    m = int(b.rng.integers(1, 6))
    w = b.const(b.floats((shape[-1], m)))
    b.node("MatMul", [x, w], shape[:-1] + (m,), simple=True)
    return True


def _gemm(b: _Builder) -> bool:
    found = b.value(lambda s: len(s) == 2 and _static(s[-1]))
    if found is None:
        return False
    x, (rows, k) = found
    m = int(b.rng.integers(1, 6))
    trans_b = int(b.chance(0.5))
    weight = b.const(b.floats((m, k) if trans_b else (k, m)))
    operands = [x, weight] + ([b.const(b.floats((m,)))] if b.chance(0.7) else [])
    attrs = {"transB": trans_b}
    if b.chance(0.3):
        attrs["alpha"] = float(b.rng.uniform(0.5, 2.0))
    if b.chance(0.3) and len(operands) == 3:
        attrs["beta"] = float(b.rng.uniform(0.5, 2.0))
    b.node("Gemm", operands, (rows, m), **attrs)
    return True


def _conv_bn(b: _Builder) -> bool:
    found = b.value(lambda s: len(s) == 4 and all(_static(d) for d in s[1:]))
    if found is None:
        return False
    x, (n, c, h, w) = found
    out = int(b.rng.integers(1, 5))
    k = b.pick([1, 3])
    operands = [x, b.const(b.floats((out, c, k, k)))]
    if b.chance(0.5):
        operands.append(b.const(b.floats((out,))))
    pads = [k // 2] * 4
    y = b.node("Conv", operands, (n, out, h, w), pads=pads, kernel_shape=[k, k])
    if b.chance(0.8):
        params = [
            b.const(b.floats((out,))),
            b.const(b.floats((out,))),
            b.const(b.floats((out,))),
            b.const((b.rng.uniform(0.5, 2.0, size=(out,))).astype(np.float32)),
        ]
        b.node("BatchNormalization", [y, *params], (n, out, h, w), epsilon=1e-5)
    return True


def _reshape(b: _Builder) -> bool:
    found = b.value(lambda s: len(s) >= 2)
    if found is None:
        return False
    x, shape = found
    style = b.pick(["const", "dynamic", "static"])
    if style == "const":
        target = b.const(np.array([0, -1], np.int64))
        new: Shape = (shape[0], _product(shape[1:]))
    elif style == "dynamic":  # [dim0, -1] read at run time from Shape
        sh = b.node("Shape", [x], (len(shape),))
        b.values.pop()
        first = b.node("Gather", [sh, b.const(np.array(0, np.int64))], ())
        b.values.pop()
        first = b.node("Unsqueeze", [first, b.const(np.array([0], np.int64))], (1,))
        b.values.pop()
        target = b.node("Concat", [first, b.const(np.array([-1], np.int64))], (2,), axis=0)
        b.values.pop()
        new = (shape[0], _product(shape[1:]))
    else:  # [-1, last] with last read from Shape (a static dim: fold_shapes folds it)
        if not _static(shape[-1]):
            return False
        sh = b.node("Shape", [x], (len(shape),))
        b.values.pop()
        last = b.node("Gather", [sh, b.const(np.array([len(shape) - 1], np.int64))], (1,))
        b.values.pop()
        target = b.node("Concat", [b.const(np.array([-1], np.int64)), last], (2,), axis=0)
        b.values.pop()
        new = (_product(shape[:-1]), shape[-1])
    b.node("Reshape", [x, target], new)
    return True


def _transpose(b: _Builder) -> bool:
    found = b.value(lambda s: len(s) >= 2)
    if found is None:
        return False
    x, shape = found
    perm = [int(p) for p in b.rng.permutation(len(shape))]
    y = b.node("Transpose", [x], tuple(shape[p] for p in perm), simple=True, perm=perm)
    if b.chance(0.3):  # a chain for collapse_chains
        perm2 = [int(p) for p in b.rng.permutation(len(shape))]
        mid = b.shapes[y]
        b.node("Transpose", [y], tuple(mid[p] for p in perm2), perm=perm2)
    return True


def _concat(b: _Builder) -> bool:
    found = b.value(lambda s: len(s) >= 1)
    if found is None:
        return False
    x, shape = found
    same = [v for v in b.values if v[1] == shape and None not in shape] or [(x, shape)]
    y, _ = b.pick(same)
    axis = int(b.rng.integers(len(shape)))
    dim = shape[axis]
    new = list(shape)
    new[axis] = 2 * dim if _static(dim) else None
    b.node("Concat", [x, y], tuple(new), axis=axis - len(shape) * int(b.chance(0.3)))
    return True


def _slice(b: _Builder) -> bool:
    found = b.value(lambda s: any(_static(d) and d >= 2 for d in s))
    if found is None:
        return False
    x, shape = found
    axis = b.pick([a for a, d in enumerate(shape) if _static(d) and d >= 2])
    size = shape[axis]
    start = int(b.rng.integers(0, size - 1))
    end = b.pick([int(b.rng.integers(start + 1, size + 1)), 2**62])
    new = list(shape)
    new[axis] = min(end, size) - start
    operands = [
        x,
        b.const(np.array([start], np.int64)),
        b.const(np.array([end], np.int64)),
        b.const(np.array([axis], np.int64)),
    ]
    if b.chance(0.5):
        operands.append(b.const(np.array([1], np.int64)))
    if new[axis] == size:  # a whole-axis (no-op) slice; the draw keeps recorded seeds stable
        b.chance(0.5)
    b.node("Slice", operands, tuple(new))
    return True


def _gather(b: _Builder) -> bool:
    found = b.value(lambda s: any(_static(d) for d in s))
    if found is None:
        return False
    x, shape = found
    axis = b.pick([a for a, d in enumerate(shape) if _static(d)])
    size = shape[axis]
    if b.chance(0.3):
        index = np.array(int(b.rng.integers(-size, size)), np.int64)
        new = shape[:axis] + shape[axis + 1 :]
    else:
        count = int(b.rng.integers(1, 4))
        index = b.rng.integers(-size, size, size=(count,)).astype(np.int64)
        new = shape[:axis] + (count,) + shape[axis + 1 :]
    b.node("Gather", [x, b.const(index)], new, axis=axis)
    return True


def _unsqueeze(b: _Builder) -> bool:
    found = b.value(lambda s: len(s) <= 4)
    if found is None:
        return False
    x, shape = found
    axis = int(b.rng.integers(0, len(shape) + 1))
    new = shape[:axis] + (1,) + shape[axis:]
    y = b.node("Unsqueeze", [x, b.const(np.array([axis], np.int64))], new)
    if b.chance(0.6):
        b.node("Squeeze", [y, b.const(np.array([axis], np.int64))], shape)
    return True


def _squeeze(b: _Builder) -> bool:
    found = b.value(lambda s: 1 in s)
    if found is None:
        return False
    x, shape = found
    axis = b.pick([a for a, d in enumerate(shape) if d == 1])
    b.node("Squeeze", [x, b.const(np.array([axis], np.int64))], shape[:axis] + shape[axis + 1 :])
    return True


def _duplicate(b: _Builder) -> bool:
    if not b.simple:
        return False
    node = b.pick(b.simple)
    out = b.fresh(node.op_type.lower())
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.output[0] = out
    b.nodes.append(copy)
    b.values.append((out, b.shapes[node.output[0]]))
    b.shapes[out] = b.shapes[node.output[0]]
    return True


def _if(b: _Builder) -> bool:
    x, shape = b.value()
    cond = b.const(np.array(b.chance(0.5)))
    branches = []
    for tag in ("then", "else"):
        nodes: list[onnx.NodeProto] = []
        out = b.fresh(tag)
        op = b.pick(["Relu", "Neg", "Add", "Mul", "Identity"])
        if op in ("Add", "Mul"):
            other = b.const(b.floats(()), nodes=nodes if b.chance(0.5) else None)
            nodes.append(helper.make_node(op, [x, other], [out]))
        else:
            nodes.append(helper.make_node(op, [x], [out]))
        info = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
        branches.append(helper.make_graph(nodes, b.fresh(tag + "_graph"), [], [info]))
    b.node("If", [cond], shape, then_branch=branches[0], else_branch=branches[1])
    return True


OPERATIONS: list[tuple[Callable[[_Builder], bool], float]] = [
    (_unary, 3),
    (_binary_const, 4),
    (_binary_values, 2),
    (_matmul, 2),
    (_gemm, 1.5),
    (_conv_bn, 2),
    (_reshape, 2),
    (_transpose, 1.5),
    (_concat, 1),
    (_slice, 1.5),
    (_gather, 1),
    (_unsqueeze, 1),
    (_squeeze, 0.5),
    (_duplicate, 1.5),
    (_if, 1),
]


def random_model(
    seed: int, *, steps: int | None = None, final_add: bool = False, batch: int | None = None
) -> onnx.ModelProto:
    """A random opset-17 model; the same seed always gives the same model.

    ``final_add`` ends the first output with ``Add(v, c)``, c nonzero (a wrong pass that
    flips Add into Sub must change that output). ``batch`` fixes the batch dim to that size
    (fully static graphs, where every Shape folds), without changing the other draws.
    """
    rng = np.random.default_rng(seed)
    b = _Builder(rng)
    kind = b.pick(["2d", "3d", "image"])
    shape: Shape
    if kind == "2d":
        shape = ("batch", int(rng.integers(1, 6)))
    elif kind == "3d":
        shape = ("batch", "seq", int(rng.integers(1, 6)))
    else:
        shape = ("batch", int(rng.integers(1, 4)), int(rng.integers(2, 6)), int(rng.integers(2, 6)))
    if batch is not None:
        shape = (batch, *shape[1:])
    graph_inputs = []
    for i in range(1 + int(b.chance(0.4))):
        name = f"x{i}"
        graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        b.values.append((name, shape))
        b.inputs.add(name)
    weights = [w for _, w in OPERATIONS]
    probs = np.array(weights) / sum(weights)
    for _ in range(steps if steps is not None else int(rng.integers(3, 14))):
        for _attempt in range(5):
            op = OPERATIONS[int(rng.choice(len(OPERATIONS), p=probs))][0]
            if op(b):
                break
    produced = [v for v in b.values if v[0] not in b.inputs]
    if not produced:
        _unary(b)
        produced = [v for v in b.values if v[0] not in b.inputs]
    chosen = [produced[-1]]
    for value in produced[:-1]:
        if b.chance(0.15):
            chosen.append(value)
    if final_add:
        x, shape = chosen[0]
        c = b.const(b.floats((), low=0.5))
        out = b.node("Add", [x, c], shape)
        chosen[0] = (out, shape)
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
        for name, shape in chosen
    ]
    graph = helper.make_graph(
        b.nodes, f"fuzz_{seed}", graph_inputs, outputs, initializer=b.initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


# -- the differential check ----------------------------------------------------------------


@dataclass
class Failure:
    """One pass (or the recipe, named ``default``) that broke one model."""

    pass_name: str
    stage: str  # raised | checker | load | run | parity
    reason: str


def is_valid(proto: onnx.ModelProto) -> bool:
    """Whether the model passes the full checker and runs in ONNX Runtime on its inputs, with
    finite outputs of the declared shapes (a wrong declaration is the model's bug, not a
    pass's: passes keep declared output shapes, and the checker then sees the conflict)."""
    try:
        onnx.checker.check_model(proto, full_check=True)
        model = ir.from_proto(proto)
        session = runners.create_session(model)
        declared = {v.name: v.shape for v in model.graph.outputs}
        for feeds in inputs.generate_input_sets(model):
            for name, value in session.run(feeds).items():
                if not np.all(np.isfinite(value)):
                    return False
                if not _fits(np.shape(value), declared[name]):
                    return False
    except Exception:
        return False
    return True


def _fits(actual: tuple[int, ...], declared: ir.Shape | None) -> bool:
    """Whether a run's output shape agrees with the declared one (rank and static dims)."""
    if declared is None:
        return True
    if len(actual) != len(declared):
        return False
    return all(not isinstance(d, int) or d == a for a, d in zip(actual, declared, strict=True))


def apply_recipe(model: ir.Model, pass_names: list[str], max_iterations: int = 8) -> None:
    """Apply passes in order until none modifies the model (as the pass manager does)."""
    for _ in range(max_iterations):
        modified = False
        for name in pass_names:
            modified |= create_pass(name)(model).modified
            for graph in model.graphs():
                graph.sort()
        if not modified:
            return


def _check_one(
    proto: onnx.ModelProto, names: list[str], sets: list, expected: list, unchanged: bytes
) -> tuple[str, str] | None:
    model = ir.from_proto(proto)
    try:
        apply_recipe(model, names)
    except Exception:
        return "raised", traceback.format_exc(limit=4)
    try:
        candidate = ir.to_proto(model)
        if candidate.SerializeToString(deterministic=True) == unchanged:
            return None  # nothing rewritten (a dishonest ``modified`` flag is still seen)
        onnx.checker.check_model(candidate, full_check=True)
    except Exception as exc:
        return "checker", str(exc)
    try:
        session = runners.create_session(model)
    except Exception as exc:
        return "load", str(exc)
    if session.output_names != [o.name for o in proto.graph.output]:
        return "load", f"outputs changed to {session.output_names}"
    for feeds, reference in zip(sets, expected, strict=True):
        try:
            actual = session.run(feeds)
        except Exception as exc:
            return "run", str(exc)
        comparison = compare(reference, actual, Tolerance(rtol=RTOL, atol=ATOL))
        if not comparison.passed:
            return "parity", comparison.summary()
    return None


def targets(recipe_passes: Sequence[str]) -> dict[str, list[str]]:
    """What is checked: every registered pass alone, then ``recipe_passes`` (the default
    recipe's, supplied by the caller: graph_passes does not reach up into pipeline)."""
    return {**{name: [name] for name in REGISTRY}, RECIPE: list(recipe_passes)}


def check_model(
    proto: onnx.ModelProto, recipe_passes: Sequence[str], names: list[str] | None = None
) -> list[Failure]:
    """Failures of each target (all of ``targets(recipe_passes)`` unless ``names`` picks
    some)."""
    model = ir.from_proto(proto)
    sets = inputs.generate_input_sets(model)
    session = runners.create_session(model)
    expected = [
        {k: np.asarray(v) for k, v in out.items()} for out in runners.run_all(session, sets)
    ]
    unchanged = ir.to_proto(ir.from_proto(proto)).SerializeToString(deterministic=True)
    failures = []
    for target, passes in targets(recipe_passes).items():
        if names is not None and target not in names:
            continue
        problem = _check_one(proto, passes, sets, expected, unchanged)
        if problem is not None:
            failures.append(Failure(target, *problem))
    return failures


def save_failure(failure: Failure, data: bytes, folder: Path) -> Path:
    """Write the failing graph once per (pass, graph) as ``<pass>-<hash>.onnx``."""
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()[:12]
    path = folder / f"{failure.pass_name}-{digest}.onnx"
    path.write_bytes(data)
    return path
