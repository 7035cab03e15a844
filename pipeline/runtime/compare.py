"""Are two sets of model outputs the same within a budget? A pure, table-tested comparer.

Everything the pipeline promises about numerics rests on this module, so it is pure (numpy
only: no ONNX Runtime, no I/O) and strict by construction:

* Floats pass element by element when ``|cand - ref| <= atol + rtol * |ref|`` (the
  ``numpy.isclose`` rule, asymmetric on purpose: the reference is the truth). NaN equals NaN
  only at the same position; an infinity must be matched by the same infinity.
* 16-bit floats (float16, bfloat16) cannot meet an rtol finer than their own resolution
  (float16 carries ~3 decimal digits), so for them an element ALSO passes when it is within
  ``fp16_ulps`` units in the last place of the reference: ``|cand - ref| <= fp16_ulps *
  ulp(ref)``. The two rules are OR-ed: the ulp rule is a floor set by the format, atol/rtol
  stay the user's budget. Other floats (float32/64, the float8 types) use atol/rtol only.
* Integers, bools and strings must match exactly: a changed class id or token is a bug, not
  noise.
* A missing or extra output, a shape or dtype change, a sequence of a different length or a
  map with different keys fails outright; nothing is broadcast or cast to make it fit.
* No permissive defaults: a Tolerance with rtol >= 1, a negative, NaN or infinite value is
  rejected when it is built.

Sequence and map outputs (as ONNX Runtime returns them: lists and dicts, e.g. a
scikit-learn ZipMap gives a list of ``{label: probability}`` dicts) are walked recursively;
their leaves are then compared as one flat vector, so one output always yields one row of
statistics, and a mismatch is located by path (``[1]['cat']``).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

try:  # bfloat16 / float8 numpy types; a dependency of onnx and onnx-ir
    import ml_dtypes
except ImportError:  # pragma: no cover - onnx always brings it
    ml_dtypes = None

logger = logging.getLogger(__name__)

PASS = "pass"
FAIL = "fail"

# 128 ulps of bfloat16 (7 mantissa bits) is a 100% relative error: the ulp budget's rtol=1.
_MAX_ULPS = 128.0


@dataclass(frozen=True)
class Tolerance:
    """How far a candidate output may drift from the reference.

    Attributes:
        rtol: Relative tolerance, scaled by ``|reference|``. Must be in [0, 1).
        atol: Absolute tolerance. Must be finite and >= 0.
        fp16_ulps: For float16/bfloat16 outputs only: an element also passes when within
            this many units in the last place of the reference value. In [0, 128).
        min_cosine: When set, a float output also fails when the cosine similarity of the
            flattened outputs is below this. In [-1, 1].

    Raises:
        ValueError: on any invalid field (wrong type, negative, NaN, infinite, rtol >= 1).
    """

    rtol: float = 1e-4
    atol: float = 1e-5
    fp16_ulps: float = 4.0
    min_cosine: float | None = None

    def __post_init__(self) -> None:
        for name in ("rtol", "atol", "fp16_ulps"):
            _require_finite_number(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is negative")
        if self.rtol >= 1:
            raise ValueError(
                f"rtol={self.rtol} accepts a 100% relative error: rtol=1 is a bug, not a default"
            )
        if self.fp16_ulps >= _MAX_ULPS:
            raise ValueError(
                f"fp16_ulps={self.fp16_ulps} accepts a 100% relative error in bfloat16; "
                f"use less than {_MAX_ULPS:g}"
            )
        if self.min_cosine is not None:
            _require_finite_number("min_cosine", self.min_cosine)
            if not -1 <= self.min_cosine <= 1:
                raise ValueError(f"min_cosine={self.min_cosine} is outside [-1, 1]")

    def describe(self) -> str:
        """Short text for failure reasons, e.g. ``rtol=0.0001, atol=1e-05``."""
        return f"rtol={self.rtol:g}, atol={self.atol:g}"


def _require_finite_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} is not finite")


@dataclass(frozen=True)
class OutputComparison:
    """The verdict and error statistics for one output.

    Float statistics are None for exact-match types and for structural failures (missing
    output, shape/dtype mismatch). They are computed over the elements where both values are
    finite; a NaN/inf disagreement is counted in ``nonfinite_mismatches`` and makes
    ``max_abs_error`` and ``max_rel_error`` infinite, since no budget covers it.
    """

    name: str
    verdict: str  # pass | fail
    reason: str = ""  # one line; empty when passed
    kind: str = "tensor"  # tensor | sequence | map | missing (reference has none)
    dtype: str = ""  # reference element type
    shape: tuple[int, ...] | None = None  # reference shape (plain tensors only)
    candidate_dtype: str = ""
    candidate_shape: tuple[int, ...] | None = None
    elements: int = 0  # scalars compared
    mismatches: int = 0  # scalars outside tolerance (or differing, for exact types)
    first_mismatch: str = ""  # location of the first, e.g. "(0, 3)" or "[1]['cat']"
    nonfinite_mismatches: int = 0
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    p99_abs_error: float | None = None
    max_rel_error: float | None = None  # |cand - ref| / max(|ref|, tiny of the dtype)
    mean_rel_error: float | None = None
    cosine: float | None = None  # of the flattened outputs; two all-zero vectors give 1.0
    tolerance: Tolerance = field(default_factory=Tolerance)
    set_index: int | None = None  # compare_sets: the input set these details come from

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    def to_dict(self) -> dict:
        """JSON-able: Python scalars only; non-finite floats become "inf"/"-inf"/"nan"."""
        return to_jsonable(dataclasses.asdict(self))


@dataclass(frozen=True)
class Comparison:
    """All outputs of a reference vs. a candidate, over one or more input sets."""

    outputs: list[OutputComparison]
    sets: int = 1

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def failures(self) -> list[OutputComparison]:
        return [o for o in self.outputs if not o.passed]

    def worst(self) -> OutputComparison | None:
        """The failing output with the largest max_abs_error, None when all pass.

        Failures that no tolerance could fix (missing output, shape/dtype mismatch,
        exact-match types, NaN/inf disagreement) rank as infinitely bad; ties keep order.
        """
        failures = self.failures
        if not failures:
            return None
        return max(failures, key=_severity)

    def summary(self) -> str:
        """One line for logs and verification verdicts."""
        count = len(self.outputs)
        sets = f" over {self.sets} input sets" if self.sets > 1 else ""
        failures = self.failures
        if not failures:
            floats = [o for o in self.outputs if o.max_abs_error is not None]
            if not floats:
                return f"all {count} outputs match{sets}"
            top = max(floats, key=lambda o: o.max_abs_error)
            return (
                f"all {count} outputs within tolerance{sets}; "
                f"max abs error {top.max_abs_error:.3g} on '{top.name}'"
            )
        shown = "; ".join(f"'{o.name}': {o.reason}" for o in failures[:3])
        more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
        return f"{len(failures)} of {count} outputs fail{sets}: {shown}{more}"

    def to_dict(self) -> dict:
        """JSON-able (strict JSON: no NaN/inf literals, no numpy types)."""
        return {
            "passed": self.passed,
            "sets": self.sets,
            "summary": self.summary(),
            "outputs": [o.to_dict() for o in self.outputs],
        }


def _severity(output: OutputComparison) -> float:
    return math.inf if output.max_abs_error is None else output.max_abs_error


def to_jsonable(value: object) -> object:
    """Plain JSON types: numpy scalars unwrapped, non-finite floats as strings."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------
# Public entry points


def compare(
    reference: Mapping[str, object],
    candidate: Mapping[str, object],
    tolerance: Tolerance,
    overrides: Mapping[str, Tolerance] | None = None,
) -> Comparison:
    """Compare every output of ``candidate`` with ``reference``.

    Args:
        reference: Output name -> numpy array, or list/dict for sequence and map outputs.
        candidate: The same for the model under test.
        tolerance: The budget for every output without an override.
        overrides: Output name -> Tolerance for that output only.

    Raises:
        ValueError: ``reference`` is empty, or an override names no reference output.
    """
    overrides = _check_arguments([reference], tolerance, overrides)
    return _compare_one(reference, candidate, tolerance, overrides)


def compare_sets(
    reference_sets: Sequence[Mapping[str, object]],
    candidate_sets: Sequence[Mapping[str, object]],
    tolerance: Tolerance,
    overrides: Mapping[str, Tolerance] | None = None,
) -> Comparison:
    """Compare outputs over several input sets; one row per output, the worst across sets.

    Per output: max of each error statistic, min cosine, summed element and mismatch counts;
    the output fails when any set fails, and its reason names the failing sets (0-based) and
    quotes the first one. Shapes, dtypes and locations come from that set (or, when all pass,
    from the set with the largest error), recorded in ``set_index``.

    Raises:
        ValueError: no sets, a different number of reference and candidate sets, an empty
            reference set, or an override that names no reference output.
    """
    if len(reference_sets) != len(candidate_sets):
        raise ValueError(
            f"{len(reference_sets)} reference output sets but {len(candidate_sets)} candidate sets"
        )
    if not reference_sets:
        raise ValueError("no output sets to compare")
    overrides = _check_arguments(reference_sets, tolerance, overrides)
    per_set = [
        _compare_one(ref, cand, tolerance, overrides)
        for ref, cand in zip(reference_sets, candidate_sets, strict=True)
    ]
    names: dict[str, list[tuple[int, OutputComparison]]] = {}
    for index, comparison in enumerate(per_set):
        for output in comparison.outputs:
            names.setdefault(output.name, []).append((index, output))
    merged = [_merge(rows, len(per_set)) for rows in names.values()]
    return Comparison(merged, sets=len(per_set))


def compare_output(
    name: str, reference: object, candidate: object, tolerance: Tolerance
) -> OutputComparison:
    """Compare one output (array, or nested lists/dicts of arrays and scalars)."""
    kind = _kind(reference)
    leaves: list[tuple[str, np.ndarray, np.ndarray]] = []
    problem = _collect_leaves(reference, candidate, "", leaves)
    base = OutputComparison(name=name, verdict=FAIL, kind=kind, tolerance=tolerance)
    if kind == "tensor":
        ref_array = np.asarray(reference)
        base = dataclasses.replace(
            base, dtype=_dtype_name(ref_array.dtype), shape=tuple(ref_array.shape)
        )
        if _kind(candidate) == "tensor":
            cand_array = np.asarray(candidate)
            base = dataclasses.replace(
                base,
                candidate_dtype=_dtype_name(cand_array.dtype),
                candidate_shape=tuple(cand_array.shape),
            )
    elif leaves:
        base = dataclasses.replace(
            base,
            dtype=_dtype_name(leaves[0][1].dtype),
            candidate_dtype=_dtype_name(leaves[0][2].dtype),
        )
    if problem:
        return dataclasses.replace(base, reason=problem)
    if not leaves:  # empty sequence/map on both sides
        return dataclasses.replace(base, verdict=PASS)
    dtypes = {_dtype_key(ref.dtype) for _, ref, _ in leaves}
    if len(dtypes) > 1:
        found = ", ".join(sorted(str(d) for d in dtypes))
        return dataclasses.replace(base, reason=f"reference mixes element types ({found})")

    locate = _Locator(leaves, plain_tensor=kind == "tensor")
    ref = np.concatenate([r.reshape(-1) for _, r, _ in leaves])
    cand = np.concatenate([c.reshape(-1) for _, _, c in leaves])
    category = _category(ref.dtype)
    if category == "exact":
        return _compare_exact(base, ref, cand, locate)
    if category == "complex":  # real and imaginary parts as interleaved float pairs
        ref = ref.astype(np.complex128).view(np.float64)
        cand = cand.astype(np.complex128).view(np.float64)
        locate = locate.scaled(2)
    return _compare_float(base, ref, cand, tolerance, locate)


# ---------------------------------------------------------------------------------------------
# Structure: outputs, nesting, dtypes


def _check_arguments(
    reference_sets: Sequence[Mapping[str, object]],
    tolerance: Tolerance,
    overrides: Mapping[str, Tolerance] | None,
) -> dict[str, Tolerance]:
    if not isinstance(tolerance, Tolerance):
        raise ValueError(f"tolerance must be a Tolerance, got {type(tolerance).__name__}")
    overrides = dict(overrides or {})
    for name, value in overrides.items():
        if not isinstance(value, Tolerance):
            raise ValueError(f"override for '{name}' must be a Tolerance, got {value!r}")
    known: dict[str, None] = {}
    for reference in reference_sets:
        if not reference:
            raise ValueError("reference has no outputs: nothing to compare")
        known.update(dict.fromkeys(reference))
    unknown = [name for name in overrides if name not in known]
    if unknown:
        raise ValueError(
            f"tolerance override for {', '.join(map(repr, unknown))}: no such output "
            f"(outputs: {', '.join(map(repr, known))})"
        )
    return overrides


def _compare_one(
    reference: Mapping[str, object],
    candidate: Mapping[str, object],
    tolerance: Tolerance,
    overrides: dict[str, Tolerance],
) -> Comparison:
    outputs = []
    for name, ref in reference.items():
        tol = overrides.get(name, tolerance)
        if name not in candidate:
            outputs.append(_one_sided(name, ref, tol, "missing from the candidate"))
        else:
            outputs.append(compare_output(name, ref, candidate[name], tol))
    for name, cand in candidate.items():
        if name not in reference:
            reason = "extra output, not in the reference"
            outputs.append(_one_sided(name, cand, tolerance, reason, extra=True))
    for output in outputs:
        if not output.passed:
            logger.debug("output %s fails: %s", output.name, output.reason)
    return Comparison(outputs)


def _one_sided(
    name: str, value: object, tolerance: Tolerance, reason: str, *, extra: bool = False
) -> OutputComparison:
    """A row for an output that only one side has (``extra``: only the candidate)."""
    array = value if isinstance(value, np.ndarray) else None
    dtype = _dtype_name(array.dtype) if array is not None else ""
    shape = tuple(array.shape) if array is not None else None
    if extra:
        return OutputComparison(
            name=name,
            verdict=FAIL,
            reason=reason,
            kind="missing",
            candidate_dtype=dtype,
            candidate_shape=shape,
            tolerance=tolerance,
        )
    return OutputComparison(
        name=name,
        verdict=FAIL,
        reason=reason,
        kind=_kind(value),
        dtype=dtype,
        shape=shape,
        tolerance=tolerance,
    )


def _kind(value: object) -> str:
    if isinstance(value, Mapping):
        return "map"
    if isinstance(value, (list, tuple)):
        return "sequence"
    return "tensor"


def _collect_leaves(
    ref: object, cand: object, path: str, leaves: list[tuple[str, np.ndarray, np.ndarray]]
) -> str:
    """Walk ``ref`` and ``cand`` together; append matching leaves; return a problem or ""."""
    where = f" at {path}" if path else ""
    if _kind(ref) != _kind(cand):
        return f"type mismatch{where}: reference is a {_kind(ref)}, candidate a {_kind(cand)}"
    if isinstance(ref, Mapping):
        missing = [k for k in ref if k not in cand]
        extra = [k for k in cand if k not in ref]
        if missing or extra:
            return (
                f"map keys differ{where}: missing in candidate {_few(missing)}, "
                f"extra in candidate {_few(extra)}"
            )
        for key in ref:
            problem = _collect_leaves(ref[key], cand[key], f"{path}[{key!r}]", leaves)
            if problem:
                return problem
        return ""
    if isinstance(ref, (list, tuple)):
        if len(ref) != len(cand):
            return f"sequence length mismatch{where}: reference {len(ref)}, candidate {len(cand)}"
        for index, (r, c) in enumerate(zip(ref, cand, strict=True)):
            problem = _collect_leaves(r, c, f"{path}[{index}]", leaves)
            if problem:
                return problem
        return ""
    ref_array, cand_array = np.asarray(ref), np.asarray(cand)
    if _dtype_key(ref_array.dtype) != _dtype_key(cand_array.dtype):
        return (
            f"dtype mismatch{where}: reference {_dtype_name(ref_array.dtype)}, "
            f"candidate {_dtype_name(cand_array.dtype)}"
        )
    if ref_array.shape != cand_array.shape:
        return (
            f"shape mismatch{where}: reference {tuple(ref_array.shape)}, "
            f"candidate {tuple(cand_array.shape)}"
        )
    leaves.append((path, ref_array, cand_array))
    return ""


def _few(items: list[object], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"


def _dtype_name(dtype: np.dtype) -> str:
    return "str" if dtype.kind in "OUS" else str(dtype)


def _dtype_key(dtype: np.dtype) -> object:
    """Equal for dtypes that must compare equal: all string-like arrays are one type."""
    return "str" if dtype.kind in "OUS" else dtype


def _float_info(dtype: np.dtype) -> np.finfo | None:
    if dtype.kind == "f":
        return np.finfo(dtype)
    if dtype.kind == "V" and ml_dtypes is not None:
        try:
            return ml_dtypes.finfo(dtype)
        except ValueError:  # int4 and other non-float extension types
            return None
    return None


def _category(dtype: np.dtype) -> str:
    if dtype.kind == "c":
        return "complex"
    return "float" if _float_info(dtype) is not None else "exact"


class _Locator:
    """Maps an index into the flattened output back to a readable location."""

    def __init__(
        self, leaves: list[tuple[str, np.ndarray, np.ndarray]], *, plain_tensor: bool
    ) -> None:
        self.paths = [path for path, _, _ in leaves]
        self.shapes = [ref.shape for _, ref, _ in leaves]
        self.starts = list(np.cumsum([0] + [ref.size for _, ref, _ in leaves[:-1]]))
        self.plain_tensor = plain_tensor
        self.scale = 1

    def scaled(self, factor: int) -> _Locator:
        self.scale = factor
        return self

    def __call__(self, flat_index: int) -> str:
        flat_index //= self.scale
        leaf = bisect.bisect_right(self.starts, flat_index) - 1
        index = np.unravel_index(flat_index - int(self.starts[leaf]), self.shapes[leaf])
        index = tuple(int(i) for i in index)
        if self.plain_tensor:
            return str(index)
        return self.paths[leaf] + (str(index) if index else "")


# ---------------------------------------------------------------------------------------------
# Element-wise comparison


def _compare_exact(
    base: OutputComparison, ref: np.ndarray, cand: np.ndarray, locate: Callable[[int], str]
) -> OutputComparison:
    if ref.dtype.kind in "OUS":
        differ = np.fromiter(
            (not _same_object(r, c) for r, c in zip(ref, cand, strict=True)), bool, ref.size
        )
    else:
        differ = np.asarray(ref != cand, dtype=bool)
    mismatches = int(differ.sum())
    result = dataclasses.replace(base, elements=int(ref.size), mismatches=mismatches)
    if not mismatches:
        return dataclasses.replace(result, verdict=PASS)
    first = int(np.flatnonzero(differ)[0])
    where = locate(first)
    reason = (
        f"{mismatches} of {ref.size} elements differ ({base.dtype} must match exactly); "
        f"first at {where}: reference {_fmt(ref[first])}, candidate {_fmt(cand[first])}"
    )
    return dataclasses.replace(result, first_mismatch=where, reason=reason)


def _same_object(ref: object, cand: object) -> bool:
    if isinstance(ref, np.ndarray) or isinstance(cand, np.ndarray):
        return bool(np.array_equal(ref, cand))
    try:
        return bool(ref == cand)
    except (TypeError, ValueError):
        return False


def _ulp(values: np.ndarray, info: np.finfo) -> np.ndarray:
    """Spacing of the format at each value: 2**(exponent - mantissa bits), floored at the
    subnormal spacing. Values are float64 copies of numbers representable in the format."""
    _, exponent = np.frexp(values)  # |v| = m * 2**exponent with m in [0.5, 1)
    exponent = np.where(values == 0, info.minexp, np.maximum(exponent - 1, info.minexp))
    return np.ldexp(1.0, exponent - int(info.nmant))


def _compare_float(
    base: OutputComparison,
    ref: np.ndarray,
    cand: np.ndarray,
    tolerance: Tolerance,
    locate: Callable[[int], str],
) -> OutputComparison:
    info = _float_info(ref.dtype) or np.finfo(np.float64)
    a = ref.astype(np.float64)
    b = cand.astype(np.float64)
    with np.errstate(all="ignore"):
        finite = np.isfinite(a) & np.isfinite(b)
        nonfinite_bad = ~finite & ~((np.isnan(a) & np.isnan(b)) | (a == b))
        diff = np.abs(b - a)
        within = diff <= tolerance.atol + tolerance.rtol * np.abs(a)
        use_ulps = ref.dtype.itemsize == 2
        if use_ulps:
            within |= diff <= tolerance.fp16_ulps * _ulp(a, info)
        finite_bad = finite & ~within
        d = diff[finite]
        rel = d / np.maximum(np.abs(a[finite]), float(info.tiny))

    nonfinite_count = int(nonfinite_bad.sum())
    bad = finite_bad | nonfinite_bad
    mismatches = int(bad.sum())
    stats = {
        "max_abs_error": float(d.max()) if d.size else 0.0,
        "mean_abs_error": float(d.mean()) if d.size else 0.0,
        "p99_abs_error": float(np.percentile(d, 99)) if d.size else 0.0,
        "max_rel_error": float(rel.max()) if rel.size else 0.0,
        "mean_rel_error": float(rel.mean()) if rel.size else 0.0,
        "cosine": _cosine(a[finite], b[finite]),
    }
    if nonfinite_count:
        stats["max_abs_error"] = stats["max_rel_error"] = math.inf
    result = dataclasses.replace(
        base,
        elements=int(a.size),
        mismatches=mismatches,
        nonfinite_mismatches=nonfinite_count,
        **stats,
    )

    reasons = []
    if nonfinite_count:
        i = int(np.flatnonzero(nonfinite_bad)[0])
        reasons.append(
            f"{nonfinite_count} of {a.size} elements disagree on NaN/inf; first at {locate(i)}: "
            f"reference {_fmt(a[i])}, candidate {_fmt(b[i])}"
        )
    finite_count = mismatches - nonfinite_count
    if finite_count:
        offenders = np.flatnonzero(finite_bad)
        i = int(offenders[np.argmax(diff[offenders])])
        budget = tolerance.describe()
        if use_ulps:
            budget += f", or {tolerance.fp16_ulps:g} ulps"
        reasons.append(
            f"{finite_count} of {a.size} elements outside tolerance ({budget}); "
            f"worst at {locate(i)}: reference {_fmt(a[i])}, candidate {_fmt(b[i])} "
            f"(abs error {diff[i]:.3g})"
        )
    cosine = stats["cosine"]
    if tolerance.min_cosine is not None and cosine < tolerance.min_cosine:
        reasons.append(f"cosine similarity {cosine:.6f} below min_cosine {tolerance.min_cosine:g}")
    if not reasons:
        return dataclasses.replace(result, verdict=PASS)
    first = locate(int(np.flatnonzero(bad)[0])) if mismatches else ""
    return dataclasses.replace(result, first_mismatch=first, reason="; ".join(reasons))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flat vectors; 1.0 for two all-zero (or empty) vectors, 0.0
    when only one is all zero. Each is scaled by its largest magnitude first, so squares of
    large values cannot overflow."""
    if np.array_equal(a, b):  # also covers two empty or two all-zero vectors
        return 1.0
    scale_a = float(np.max(np.abs(a)))
    scale_b = float(np.max(np.abs(b)))
    if scale_a == 0 or scale_b == 0:
        return 0.0
    a = a / scale_a
    b = b / scale_b
    value = float(np.dot(a, b)) / math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return min(1.0, max(-1.0, value))


def _fmt(value: object) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


# ---------------------------------------------------------------------------------------------
# Aggregation over input sets


def _merge(rows: list[tuple[int, OutputComparison]], total: int) -> OutputComparison:
    failing = [(i, o) for i, o in rows if not o.passed]
    if failing:
        index, base = failing[0]
        which = ", ".join(str(i) for i, _ in failing)
        reason = f"fails in set{'s' if len(failing) > 1 else ''} {which} of {total}; "
        reason += f"set {index}: {base.reason}"
    else:
        index, base = max(rows, key=lambda row: row[1].max_abs_error or 0.0)
        reason = ""

    def worst(attribute: str, pick: Callable[..., float]) -> float | None:
        values = [getattr(o, attribute) for _, o in rows if getattr(o, attribute) is not None]
        return pick(values) if values else None

    return dataclasses.replace(
        base,
        verdict=FAIL if failing else PASS,
        reason=reason,
        set_index=index,
        elements=sum(o.elements for _, o in rows),
        mismatches=sum(o.mismatches for _, o in rows),
        nonfinite_mismatches=sum(o.nonfinite_mismatches for _, o in rows),
        max_abs_error=worst("max_abs_error", max),
        mean_abs_error=worst("mean_abs_error", max),
        p99_abs_error=worst("p99_abs_error", max),
        max_rel_error=worst("max_rel_error", max),
        mean_rel_error=worst("mean_rel_error", max),
        cosine=worst("cosine", min),
    )
