"""Inputs that find bugs: generated from the model's signature, or the user's own data.

Random inputs that ignore the model hide bugs. So: every dynamic dimension is tried at two
sizes (a pass that bakes one size in is caught), batch is > 1, integer ids stay inside the
embedding table they index, and attention masks come with right padding, left padding and
holes (a fused attention that assumes right padding is caught). Users can instead pass real
data (``.npz`` / ``.npy`` files) and pin shapes with ``name=1,3,224,224``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pipeline.runtime.errors import UserError

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
Dim = int | str | None

# Two sizes per kind of dynamic dimension; spatial sizes are multiples of 32 so that
# strided CNNs (detection, OCR) stay valid at both.
BATCH_SIZES = (2, 3)
SEQUENCE_SIZES = (8, 13)
SPATIAL_SIZES = (64, 96)
OTHER_SIZES = (2, 3)
DEFAULT_INT_HIGH = 4
_COMPARISONS = ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")

_SEQUENCE_HINT = re.compile(r"seq|len|token|time|step|past|total|context|width_text", re.I)
_BATCH_HINT = re.compile(r"batch|^n$|^b$|^N$", re.I)


@dataclass(frozen=True)
class InputSpec:
    """One graph input as the generator sees it."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None  # None when the rank is unknown


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs by old exporters are skipped)."""
    specs = []
    for value in model.graph.inputs:
        if value.const_value is not None or value.name in model.graph.initializers:
            continue
        if value.dtype is None:
            raise UserError(f"input '{value.name}' has no element type; pass --inputs data")
        shape = None
        if value.shape is not None:
            shape = tuple(_dim(d) for d in value.shape)
        specs.append(InputSpec(value.name, value.dtype.numpy(), shape))
    return specs


def _dim(d: object) -> Dim:
    if isinstance(d, int):
        # Paddle and some converters write -1 for "any size": dynamic, like a dim_param (as
        # ONNX Runtime reads it). 0 stays a size: an empty tensor, which ONNX Runtime enforces.
        return d if d >= 0 else None
    value = getattr(d, "value", None)
    return value if isinstance(value, (int, str)) and value != "" else None


def parse_shape_overrides(texts: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``name=1,3,224,224`` strings; malformed text is a UserError."""
    overrides: dict[str, tuple[int, ...]] = {}
    for text in texts or []:
        name, sep, dims = text.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
        except ValueError:
            shape = None
        if not sep or not name or shape is None or any(d < 0 for d in shape):
            raise UserError(f"--input-shape expects name=d0,d1,... with integers, got '{text}'")
        overrides[name] = shape
    return overrides


def _apply_overrides(
    specs: list[InputSpec], overrides: dict[str, tuple[int, ...]]
) -> list[InputSpec]:
    known = {s.name for s in specs}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(
            f"--input-shape names unknown input(s) {unknown}; model inputs are {sorted(known)}"
        )
    fixed = []
    for spec in specs:
        shape = overrides.get(spec.name)
        if shape is None:
            fixed.append(spec)
            continue
        if spec.shape is not None:
            if len(shape) != len(spec.shape):
                raise UserError(
                    f"--input-shape {spec.name} has rank {len(shape)}, "
                    f"the model says rank {len(spec.shape)}"
                )
            for axis, (want, have) in enumerate(zip(shape, spec.shape, strict=True)):
                if isinstance(have, int) and have != want:
                    raise UserError(
                        f"--input-shape {spec.name}: dimension {axis} is {want}, "
                        f"the model fixes it to {have}"
                    )
        fixed.append(InputSpec(spec.name, spec.dtype, shape))
    return fixed


def dynamic_dim_sizes(spec: InputSpec, axis: int, dim: Dim) -> tuple[str, tuple[int, int]]:
    """``(kind, two sizes)`` for a dynamic dimension, by what the dimension probably is."""
    name = dim if isinstance(dim, str) else ""
    rank = len(spec.shape or ())
    if _BATCH_HINT.search(name) or (not name and axis == 0):
        return "batch", BATCH_SIZES
    if _SEQUENCE_HINT.search(name):
        return "sequence", SEQUENCE_SIZES
    if np.issubdtype(spec.dtype, np.floating) and rank == 4 and axis >= 2:
        return "spatial", SPATIAL_SIZES
    if rank >= 2 and axis == 1 and not np.issubdtype(spec.dtype, np.floating):
        return "sequence", SEQUENCE_SIZES  # [batch, seq] integer ids with anonymous dims
    if rank == 3 and axis == 1:
        return "sequence", SEQUENCE_SIZES
    return "other", OTHER_SIZES


def _symbol_key(spec: InputSpec, axis: int, dim: Dim) -> str:
    # Anonymous dims at the same axis of same-rank inputs usually mean the same thing
    # (input_ids and attention_mask from an old exporter); share a size between them.
    if isinstance(dim, str):
        return dim
    return f"?rank{len(spec.shape or ())}_axis{axis}"


def _integer_bounds(model: ir.Model) -> dict[str, int]:
    """Upper bound for integer inputs used as Gather indices into a constant table."""
    bounds: dict[str, int] = {}
    for graph in model.graphs():
        for node in graph:
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
                continue
            if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
                continue
            table, indices = node.inputs[0], node.inputs[1]
            const = ir.convenience.get_const_tensor(table)
            shape = const.shape if const is not None else table.shape
            if not indices.is_graph_input() or shape is None:
                continue
            axis = node.attributes.get_int("axis", 0)
            size = shape[axis] if -len(shape) <= axis < len(shape) else None
            if isinstance(size, int) and size > 0:
                name = indices.name or ""
                bounds[name] = min(bounds.get(name, size), size)
    return bounds


def _compared_constants(model: ir.Model) -> dict[str, list]:
    """Values a single-element input is compared with (``Equal``, ``Less``, ``Greater``...
    against a constant): a sample rate checked against 16000 and 8000, a mode flag. A model
    branches on such an input (``If``) and often has no valid branch for any other value,
    so these are the values it is fed. Only single-element inputs: a mask compared with 0
    must not become all zeros."""
    found: dict[str, list] = {}
    for graph in model.graphs():
        for node in graph:
            if node.op_type not in _COMPARISONS or node.domain not in ("", "ai.onnx"):
                continue
            operands = [v for v in node.inputs if v is not None]
            if len(operands) != 2:
                continue
            for value, other in (operands, operands[::-1]):
                const = ir.convenience.get_const_tensor(other)
                if not value.is_graph_input() or const is None or const.size != 1:
                    continue
                shape = value.shape
                if shape is not None and any(d != 1 for d in shape):
                    continue
                number = const.numpy().reshape(()).item()
                values = found.setdefault(value.name or "", [])
                if number not in values:
                    values.append(number)
    return found


def _mask_rows(batch: int, seq: int, start: int) -> np.ndarray:
    """Rows cycling through right padding, left padding, holes and no padding."""
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(batch):
        pattern = (row + start) % 4
        pad = max(1, seq // 3)
        if pattern == 0:
            mask[row, seq - pad :] = 0
        elif pattern == 1:
            mask[row, :pad] = 0
        elif pattern == 2:
            mask[row, 1::3] = 0
    return mask


def _fill(
    spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator, high: int, set_index: int
) -> np.ndarray:
    lname = spec.name.lower()
    dtype = spec.dtype
    if dtype.kind in "OUS":
        return np.array(rng.choice(["a", "b", "hello"], size=shape), dtype=object)
    if dtype == np.bool_:
        if "mask" in lname and len(shape) == 2:
            return _mask_rows(*shape, start=set_index).astype(bool)
        return rng.random(shape) > 0.5
    if "mask" in lname and len(shape) == 2:
        return _mask_rows(*shape, start=set_index).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        if "position" in lname and len(shape) >= 1:
            return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        if "token_type" in lname:
            high = min(high, 2)
        low = 0
        if np.issubdtype(dtype, np.unsignedinteger) or high <= 1:
            return rng.integers(low, max(high, 1), size=shape).astype(dtype)
        return rng.integers(low, high, size=shape).astype(dtype)
    values = rng.standard_normal(shape).astype(np.float32)
    return values.astype(dtype)


def _sum_terms(symbol: str) -> list[str]:
    """The terms of a dim named like ``past_sequence_length + sequence_length``, else []."""
    terms = [t.strip() for t in symbol.split("+")]
    return terms if len(terms) > 1 and all(t.isidentifier() or t.isdigit() for t in terms) else []


def _dim_size(symbol: str, chosen: dict[str, int]) -> int:
    """Size of a dynamic dim: its chosen size, or the sum of its terms' sizes (optimum names
    a decoder's mask length ``past_sequence_length + sequence_length``; a mask of any other
    length makes the model fail). Unknown symbols are 1.
    """
    terms = _sum_terms(symbol)
    if not terms:
        return chosen.get(symbol, 1)
    return sum(int(t) if t.isdigit() else chosen.get(t, 1) for t in terms)


def _mask_spans_past(specs: list[InputSpec], chosen: dict[str, int]) -> None:
    """Size a 2-D mask's own length symbol as past + new tokens (a decoder with past whose
    exporter named the mask's length apart from both, so no sum in the name says so)."""
    ids = next((s for s in specs if "input_ids" in s.name and len(s.shape or ()) == 2), None)
    past = next((s for s in specs if "past" in s.name.lower() and len(s.shape or ()) == 4), None)
    if ids is None or past is None:
        return
    total = sum(
        chosen.get(_symbol_key(spec, axis, spec.shape[axis]), 1)
        if not isinstance(spec.shape[axis], int)
        else spec.shape[axis]
        for spec, axis in ((ids, 1), (past, 2))
    )
    for spec in specs:
        if "mask" in spec.name.lower() and len(spec.shape or ()) == 2:
            dim = spec.shape[1]
            if not isinstance(dim, int) and not _sum_terms(_symbol_key(spec, 1, dim)):
                chosen[_symbol_key(spec, 1, dim)] = total


def _feed(
    spec: InputSpec,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    bounds: dict[str, int],
    compared: dict[str, list],
    set_index: int,
) -> np.ndarray:
    """One input's array: a single-element input the graph compares with constants takes
    those values in turn (``_compared_constants``), anything else is filled (``_fill``)."""
    values = compared.get(spec.name)
    if values and int(np.prod(shape)) == 1:
        return np.full(shape, values[set_index % len(values)], dtype=spec.dtype)
    high = bounds.get(spec.name, DEFAULT_INT_HIGH)
    return np.asarray(_fill(spec, shape, rng, high, set_index=set_index))


def generate_input_sets(
    model: ir.Model,
    overrides: dict[str, tuple[int, ...]] | None = None,
    *,
    seed: int = 0,
    num_sets: int = 2,
    scale: int = 1,
    mask_spans_past: bool = False,
) -> list[Feeds]:
    """Input sets for ``model``: set ``k`` takes the ``k``-th size of every dynamic dim.

    ``scale`` multiplies the sizes of dynamic dims other than batch and image sides (for a
    model that needs longer inputs than the defaults: a reflect pad, a strided audio front
    end); ``mask_spans_past`` sizes a decoder's mask as past + new tokens."""
    specs = _apply_overrides(input_specs(model), overrides or {})
    bounds = _integer_bounds(model)
    compared = _compared_constants(model)
    rng = np.random.default_rng(seed)
    sizes: dict[str, tuple[int, int]] = {}
    for spec in specs:
        for axis, dim in enumerate(spec.shape or ()):
            key = _symbol_key(spec, axis, dim)
            if isinstance(dim, int) or key in sizes or _sum_terms(key):
                continue
            kind, pair = dynamic_dim_sizes(spec, axis, dim)
            # Distinct spatial symbols take the sizes in alternating order, so H and W differ
            # within a set (a pass that confuses them is caught). Not batch or sequence:
            # anonymous ones on different inputs often must agree.
            if kind == "spatial" and sum(p in (pair, pair[::-1]) for p in sizes.values()) % 2:
                pair = pair[::-1]
            if kind in ("sequence", "other"):
                pair = (pair[0] * scale, pair[1] * scale)
            sizes[key] = pair
    sets = []
    for k in range(num_sets):
        feeds: Feeds = {}
        for spec in specs:
            if spec.shape is None:
                shape: tuple[int, ...] = (BATCH_SIZES[k % 2],)
            else:
                chosen = {key: pair[k % 2] for key, pair in sizes.items()}
                if mask_spans_past:
                    _mask_spans_past(specs, chosen)
                shape = tuple(
                    d if isinstance(d, int) else _dim_size(_symbol_key(spec, a, d), chosen)
                    for a, d in enumerate(spec.shape)
                )
            feeds[spec.name] = _feed(spec, shape, rng, bounds, compared, set_index=k)
        sets.append(feeds)
    return sets


def minimal_input_set(
    model: ir.Model,
    overrides: dict[str, tuple[int, ...]] | None = None,
    *,
    seed: int = 0,
    grow: tuple[str, int] | None = None,
) -> Feeds:
    """One input set with every dynamic dim at 1: the fallback when the varied sets fail.

    ``grow`` (a symbol of ``growable_symbols``, a size) sets that one dim long and keeps the
    rest at 1: a model that needs one long axis (audio samples under a reflect pad and a
    strided STFT) and batch 1 (its recurrent state squeezed) runs on nothing else."""
    specs = _apply_overrides(input_specs(model), overrides or {})
    bounds, compared = _integer_bounds(model), _compared_constants(model)
    chosen = dict([grow]) if grow else {}
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for spec in specs:
        dims = (1,) if spec.shape is None else spec.shape  # () is a scalar, not unknown
        shape = tuple(
            d if isinstance(d, int) else _dim_size(_symbol_key(spec, a, d), chosen)
            for a, d in enumerate(dims)
        )
        feeds[spec.name] = _feed(spec, shape, rng, bounds, compared, set_index=0)
    return feeds


def symbol_text(key: str) -> str:
    """A dim's ``_symbol_key`` in words: ``'samples'``, or ``axis 1 of the rank-2 inputs``."""
    anonymous = re.fullmatch(r"\?rank(\d+)_axis(\d+)", key)
    if anonymous:
        return f"axis {anonymous.group(2)} of the rank-{anonymous.group(1)} inputs"
    return repr(key)


def growable_symbols(model: ir.Model, overrides: dict[str, tuple[int, ...]] | None = None):
    """The dynamic dims other than batch, each once (by ``_symbol_key``), in input order."""
    symbols: list[str] = []
    for spec in _apply_overrides(input_specs(model), overrides or {}):
        for axis, dim in enumerate(spec.shape or ()):
            key = _symbol_key(spec, axis, dim)
            if isinstance(dim, int) or key in symbols or _sum_terms(key):
                continue
            if dynamic_dim_sizes(spec, axis, dim)[0] != "batch":
                symbols.append(key)
    return symbols


def load_user_inputs(path: str | Path) -> list[Feeds]:
    """Read real input data: one ``.npz`` (one set), or a folder of ``.npz`` / ``.npy`` files.

    In a folder, each ``.npz`` file is one input set; ``.npy`` files are one set together,
    each named after the input it feeds (``input_ids.npy``).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"--inputs path not found: {path}")
    try:
        if path.is_file():
            return [_read_npz(path)]
        sets = [_read_npz(p) for p in sorted(path.glob("*.npz"))]
        npy = sorted(path.glob("*.npy"))
        if npy:
            sets.append({p.stem: np.load(p, allow_pickle=False) for p in npy})
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read --inputs data from {path}: {exc}") from exc
    if not sets:
        raise UserError(f"--inputs folder holds no .npz or .npy files: {path}")
    return sets


def _read_npz(path: Path) -> Feeds:
    if path.suffix == ".npy":
        raise UserError(f"a single .npy file has no input name; put it in a folder: {path}")
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def check_user_inputs(model: ir.Model, sets: list[Feeds]) -> None:
    """Every model input must be present in every user set, with a matching rank."""
    for index, feeds in enumerate(sets):
        for spec in input_specs(model):
            if spec.name not in feeds:
                raise UserError(f"--inputs set {index} lacks model input '{spec.name}'")
            array = feeds[spec.name]
            if spec.shape is not None and array.ndim != len(spec.shape):
                raise UserError(
                    f"--inputs set {index}: '{spec.name}' has rank {array.ndim}, "
                    f"the model expects {len(spec.shape)}"
                )
            if array.dtype != spec.dtype:
                feeds[spec.name] = array.astype(spec.dtype)
