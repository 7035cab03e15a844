"""Table tests for pipeline.runtime.compare with hand-computed expected values.

Every number asserted here was worked out by hand (the arithmetic is in the comments), not
read back from the implementation.
"""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.runtime.compare import (
    Comparison,
    Tolerance,
    _ulp,
    compare,
    compare_output,
    compare_sets,
)

EXACT = Tolerance(rtol=0.0, atol=0.0, fp16_ulps=0.0)
# ref [1, 2, 3, 4] . cand [1, 2, 3, 4.5] = 1 + 4 + 9 + 18 = 32; |ref|^2 = 30;
# |cand|^2 = 1 + 4 + 9 + 20.25 = 34.25
COS_1234 = 32 / math.sqrt(30 * 34.25)


def f64(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def one(ref: object, cand: object, tolerance: Tolerance = EXACT, **overrides: Tolerance):
    comparison = compare({"y": ref}, {"y": cand}, tolerance, overrides or None)
    assert len(comparison.outputs) == 1
    return comparison.outputs[0]


# --------------------------------------------------------------------------------------------
# Floats: statistics


def test_float_statistics_hand_computed() -> None:
    out = one(f64(1, 2, 3, 4), f64(1, 2, 3, 4.5), Tolerance())
    assert out.verdict == "fail"
    assert out.max_abs_error == 0.5
    assert out.mean_abs_error == 0.125  # (0 + 0 + 0 + 0.5) / 4
    # np.percentile linear: position 0.99 * 3 = 2.97 -> 0 + 0.97 * (0.5 - 0)
    assert out.p99_abs_error == pytest.approx(0.485, rel=1e-12)
    assert out.max_rel_error == 0.125  # 0.5 / 4
    assert out.mean_rel_error == 0.03125  # 0.125 / 4
    assert out.cosine == pytest.approx(COS_1234, rel=1e-12)
    assert out.cosine == pytest.approx(0.998295384, abs=1e-9)
    assert (out.elements, out.mismatches, out.first_mismatch) == (4, 1, "(3,)")
    assert out.dtype == out.candidate_dtype == "float64"
    assert out.shape == out.candidate_shape == (4,)
    assert "1 of 4 elements outside tolerance" in out.reason
    assert "(3,)" in out.reason and "reference 4, candidate 4.5" in out.reason
    assert "\n" not in out.reason


def test_relative_error_uses_tiny_of_dtype_when_reference_is_zero() -> None:
    out = one(f64(0.0, 1.0), f64(1e-6, 1.0), Tolerance(atol=1e-5))
    assert out.verdict == "pass"
    assert out.max_rel_error == pytest.approx(1e-6 / np.finfo(np.float64).tiny)
    assert out.max_abs_error == 1e-6


@pytest.mark.parametrize(
    ("ref", "cand", "tolerance", "verdict", "mismatches", "first"),
    [
        # identical
        (f64(1, 2), f64(1, 2), EXACT, "pass", 0, ""),
        # atol boundary is inclusive: |4.5 - 4| = 0.5 <= 0.5
        (f64(1, 2, 3, 4), f64(1, 2, 3, 4.5), Tolerance(rtol=0, atol=0.5), "pass", 0, ""),
        (f64(1, 2, 3, 4), f64(1, 2, 3, 4.5), Tolerance(rtol=0, atol=0.49), "fail", 1, "(3,)"),
        # rtol boundary: |101 - 100| = 1 <= 0.01 * 100
        (f64(100), f64(101), Tolerance(rtol=0.01, atol=0), "pass", 0, ""),
        (f64(100), f64(101.5), Tolerance(rtol=0.01, atol=0), "fail", 1, "(0,)"),
        # asymmetric on the reference: |1 - 2| <= 0.5 * |2| but not <= 0.5 * |1|
        (f64(2), f64(1), Tolerance(rtol=0.5, atol=0), "pass", 0, ""),
        (f64(1), f64(2), Tolerance(rtol=0.5, atol=0), "fail", 1, "(0,)"),
        # rtol alone cannot cover a zero reference
        (f64(0), f64(1e-3), Tolerance(rtol=0.5, atol=0), "fail", 1, "(0,)"),
        # a tiny error still fails an exact budget
        (f64(1), f64(np.nextafter(1.0, 2.0)), EXACT, "fail", 1, "(0,)"),
        # 2-D: first mismatch in C order is (1, 0)
        (
            np.zeros((2, 3)),
            np.array([[0, 0, 0], [1, 0, 2.0]]),
            Tolerance(),
            "fail",
            2,
            "(1, 0)",
        ),
    ],
)
def test_float_elementwise_criterion(ref, cand, tolerance, verdict, mismatches, first) -> None:
    out = one(ref, cand, tolerance)
    assert out.verdict == verdict
    assert out.mismatches == mismatches
    assert out.first_mismatch == first
    assert (out.reason == "") == (verdict == "pass")


def test_reason_names_the_worst_element_not_the_first() -> None:
    out = one(np.zeros((2, 3)), np.array([[0, 0, 0], [1, 0, 2.0]]), Tolerance())
    assert out.first_mismatch == "(1, 0)"
    assert "worst at (1, 2): reference 0, candidate 2" in out.reason


@pytest.mark.parametrize(
    ("ref", "cand", "verdict", "mismatches", "nonfinite", "max_abs"),
    [
        (f64(1, np.nan, 3), f64(1, np.nan, 3), "pass", 0, 0, 0.0),
        (f64(1, np.nan, 3), f64(1, 2, 3), "fail", 1, 1, math.inf),
        (f64(1, 2, 3), f64(1, np.nan, 3), "fail", 1, 1, math.inf),
        (f64(1, np.nan), f64(np.nan, 1), "fail", 2, 2, math.inf),
        (f64(np.inf, -np.inf, 1), f64(np.inf, -np.inf, 1), "pass", 0, 0, 0.0),
        (f64(np.inf, 1), f64(-np.inf, 1), "fail", 1, 1, math.inf),
        (f64(np.inf), f64(1e300), "fail", 1, 1, math.inf),
        (f64(np.inf), f64(np.nan), "fail", 1, 1, math.inf),
        (f64(np.nan, np.nan), f64(np.nan, np.nan), "pass", 0, 0, 0.0),
    ],
)
def test_nan_and_inf(ref, cand, verdict, mismatches, nonfinite, max_abs) -> None:
    out = one(ref, cand, Tolerance())
    assert out.verdict == verdict
    assert (out.mismatches, out.nonfinite_mismatches) == (mismatches, nonfinite)
    assert out.max_abs_error == max_abs
    if verdict == "fail":
        assert "NaN/inf" in out.reason


def test_nan_stats_cover_finite_pairs_only() -> None:
    out = one(f64(np.nan, 2, 4), f64(np.nan, 2, 5), Tolerance(rtol=0, atol=1))
    assert out.verdict == "pass"
    assert out.mean_abs_error == 0.5  # (0 + 1) / 2: the NaN pair is not averaged in
    assert out.max_rel_error == 0.25


def test_empty_arrays_compare_fine() -> None:
    out = one(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32), EXACT)
    assert out.verdict == "pass"
    assert (out.elements, out.max_abs_error, out.cosine) == (0, 0.0, 1.0)


@pytest.mark.parametrize(
    ("ref", "cand", "cosine"),
    [
        (f64(0, 0), f64(0, 0), 1.0),
        (f64(0, 0), f64(0, 1e-7), 0.0),  # only one all-zero vector
        (f64(1, 0), f64(0, 1), 0.0),  # orthogonal
        (f64(1, 2), f64(-1, -2), -1.0),
        (f64(3, 4), f64(4, 3), 24 / 25),  # (12 + 12) / (5 * 5)
        (f64(1e200, 1e200), f64(1e200, 1e200 * (1 + 2**-20)), 1.0),  # no overflow to nan
    ],
)
def test_cosine(ref, cand, cosine) -> None:
    out = one(ref, cand, Tolerance(rtol=0.5, atol=10))
    assert out.cosine == pytest.approx(cosine, abs=1e-12)


@pytest.mark.parametrize(
    ("min_cosine", "verdict"), [(0.999, "fail"), (0.998, "pass"), (None, "pass")]
)
def test_min_cosine(min_cosine, verdict) -> None:
    tolerance = Tolerance(rtol=0, atol=1.0, min_cosine=min_cosine)  # elementwise: passes
    out = one(f64(1, 2, 3, 4), f64(1, 2, 3, 4.5), tolerance)
    assert out.verdict == verdict
    assert out.mismatches == 0
    if verdict == "fail":
        assert "cosine similarity 0.998295 below min_cosine 0.999" == out.reason


# --------------------------------------------------------------------------------------------
# 16-bit floats: units in the last place

F16_ULP_AT_1 = 2.0**-10
BF16_ULP_AT_1 = 2.0**-7


@pytest.mark.parametrize(
    ("dtype", "ref", "cand", "tolerance", "verdict"),
    [
        # 1 ulp at 1.0 is 9.77e-4, far outside atol + rtol = 1.1e-4, inside 4 ulps
        (np.float16, 1.0, 1 + F16_ULP_AT_1, Tolerance(), "pass"),
        (np.float16, 1.0, 1 + F16_ULP_AT_1, Tolerance(fp16_ulps=0), "fail"),
        (np.float16, 1.0, 1 + 4 * F16_ULP_AT_1, Tolerance(fp16_ulps=4), "pass"),
        (np.float16, 1.0, 1 + 5 * F16_ULP_AT_1, Tolerance(fp16_ulps=4), "fail"),
        (np.float16, 1.0, 1 + 100 * F16_ULP_AT_1, Tolerance(), "fail"),
        # ulp scales with magnitude: at 1024 one ulp is 1.0
        (np.float16, 1024.0, 1026.0, Tolerance(rtol=0, atol=0, fp16_ulps=2), "pass"),
        (np.float16, 1024.0, 1124.0, Tolerance(rtol=0, atol=0, fp16_ulps=4), "fail"),
        # at zero the ulp is the smallest subnormal, 2**-24
        (np.float16, 0.0, 2.0**-24, Tolerance(rtol=0, atol=0, fp16_ulps=1), "pass"),
        (np.float16, 0.0, 5 * 2.0**-24, Tolerance(rtol=0, atol=0, fp16_ulps=4), "fail"),
        # the atol/rtol rule still applies (OR): 100 ulps pass with a loose atol
        (np.float16, 1.0, 1 + 100 * F16_ULP_AT_1, Tolerance(atol=0.1), "pass"),
        (ml_dtypes.bfloat16, 1.0, 1 + BF16_ULP_AT_1, Tolerance(), "pass"),
        (ml_dtypes.bfloat16, 1.0, 1 + BF16_ULP_AT_1, Tolerance(fp16_ulps=0), "fail"),
        (ml_dtypes.bfloat16, 1.0, 1 + 100 * BF16_ULP_AT_1, Tolerance(), "fail"),
        # float32 gets no ulp allowance
        (np.float32, 1.0, 1 + 2.0**-23, Tolerance(rtol=0, atol=0, fp16_ulps=4), "fail"),
    ],
)
def test_sixteen_bit_ulps(dtype, ref, cand, tolerance, verdict) -> None:
    ref_array, cand_array = np.array([ref], dtype=dtype), np.array([cand], dtype=dtype)
    assert float(cand_array[0]) == cand  # the test value is exactly representable
    out = one(ref_array, cand_array, tolerance)
    assert out.verdict == verdict
    assert out.dtype == np.dtype(dtype).name


def test_fp16_failure_reason_mentions_ulps() -> None:
    out = one(np.array([1.0], np.float16), np.array([1.5], np.float16), Tolerance())
    assert "or 4 ulps" in out.reason


def test_ulp_matches_numpy_spacing_for_every_float16() -> None:
    values = np.arange(0, 0x7BFF, dtype=np.uint16).view(np.float16)  # 0 .. below max
    expected = np.spacing(values).astype(np.float64)
    got = _ulp(values.astype(np.float64), np.finfo(np.float16))
    np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------------------------
# Exact types


@pytest.mark.parametrize(
    ("ref", "cand", "verdict", "mismatches", "first", "quoted"),
    [
        (np.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]]), "pass", 0, "", ""),
        (
            np.array([[1, 2], [3, 4]]),
            np.array([[1, 2], [3, 5]]),
            "fail",
            1,
            "(1, 1)",
            "4, candidate 5",
        ),
        (np.array([255], np.uint8), np.array([254], np.uint8), "fail", 1, "(0,)", "255"),
        (np.array([True, False, True]), np.array([True, True, False]), "fail", 2, "(1,)", "False"),
        (np.array(["a", "b"], object), np.array(["a", "c"], object), "fail", 1, "(1,)", "'b'"),
        (np.array(["a", "b"], object), np.array(["a", "b"]), "pass", 0, "", ""),
        (np.array(7, np.int32), np.array(8, np.int32), "fail", 1, "()", "7"),
    ],
)
def test_exact_types(ref, cand, verdict, mismatches, first, quoted) -> None:
    out = one(ref, cand, Tolerance(rtol=0.5, atol=100))  # a loose budget must not apply
    assert out.verdict == verdict
    assert (out.mismatches, out.first_mismatch) == (mismatches, first)
    assert out.max_abs_error is None and out.cosine is None
    assert quoted in out.reason
    if verdict == "fail":
        assert "must match exactly" in out.reason


# --------------------------------------------------------------------------------------------
# Structure: shapes, dtypes, missing and extra outputs


@pytest.mark.parametrize(
    ("ref", "cand", "reason"),
    [
        (np.zeros((2, 3)), np.zeros((3, 2)), "shape mismatch: reference (2, 3), candidate (3, 2)"),
        (np.zeros(4), np.zeros((1, 4)), "shape mismatch: reference (4,), candidate (1, 4)"),
        (np.zeros((0, 3)), np.zeros((0, 4)), "shape mismatch"),
        (
            np.zeros(2, np.float32),
            np.zeros(2, np.float64),
            "dtype mismatch: reference float32, candidate float64",
        ),
        (np.zeros(2, np.int32), np.zeros(2, np.int64), "dtype mismatch"),
        (np.zeros(2), [0.0, 0.0], "type mismatch: reference is a tensor, candidate a sequence"),
    ],
)
def test_structural_mismatch_fails(ref, cand, reason) -> None:
    out = one(ref, cand, Tolerance(rtol=0.5, atol=100))
    assert out.verdict == "fail"
    assert reason in out.reason
    assert out.max_abs_error is None


def test_shape_mismatch_records_both_shapes() -> None:
    out = one(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    assert (out.shape, out.candidate_shape) == ((2, 3), (3, 2))
    assert out.dtype == out.candidate_dtype == "float32"


def test_missing_and_extra_outputs() -> None:
    ref = {"a": f64(1), "b": f64(2)}
    cand = {"a": f64(1), "c": f64(2)}
    comparison = compare(ref, cand, Tolerance())
    assert not comparison.passed
    by_name = {o.name: o for o in comparison.outputs}
    assert list(by_name) == ["a", "b", "c"]
    assert by_name["a"].passed
    assert by_name["b"].reason == "missing from the candidate"
    assert by_name["b"].dtype == "float64" and by_name["b"].shape == (1,)
    assert by_name["c"].reason == "extra output, not in the reference"
    assert by_name["c"].kind == "missing" and by_name["c"].candidate_shape == (1,)


def test_empty_reference_is_an_error() -> None:
    with pytest.raises(ValueError, match="nothing to compare"):
        compare({}, {}, Tolerance())


# --------------------------------------------------------------------------------------------
# Sequences and maps (ONNX Runtime returns lists and dicts)

ZIPMAP_REF = [{0: 0.9, 1: 0.1}, {0: 0.3, 1: 0.7}]


@pytest.mark.parametrize(
    ("cand", "verdict", "text", "first"),
    [
        ([{0: 0.9, 1: 0.1}, {0: 0.3, 1: 0.7}], "pass", "", ""),
        ([{0: 0.9, 1: 0.1}, {0: 0.31, 1: 0.7}], "fail", "worst at [1][0]", "[1][0]"),
        ([{0: 0.9, 1: 0.1}, {0: 0.3, 2: 0.7}], "fail", "map keys differ at [1]", ""),
        ([{0: 0.9, 1: 0.1}], "fail", "sequence length mismatch: reference 2, candidate 1", ""),
        ([{0: 0.9, 1: 0.1}, [0.3, 0.7]], "fail", "type mismatch at [1]", ""),
        ([{0: 0.9, 1: 0.1}, {0: 0.3, 1: 1}], "fail", "dtype mismatch at [1][1]", ""),
    ],
)
def test_zipmap_list_of_dicts(cand, verdict, text, first) -> None:
    out = one(ZIPMAP_REF, cand, Tolerance())
    assert out.kind == "sequence"
    assert out.verdict == verdict
    assert text in out.reason
    assert out.first_mismatch == first


def test_zipmap_statistics_over_all_leaves() -> None:
    out = one(ZIPMAP_REF, [{0: 0.9, 1: 0.1}, {0: 0.31, 1: 0.7}], Tolerance())
    assert out.elements == 4 and out.mismatches == 1
    assert out.max_abs_error == pytest.approx(0.01, rel=1e-9)
    assert out.mean_abs_error == pytest.approx(0.0025, rel=1e-9)  # 0.01 / 4
    assert out.max_rel_error == pytest.approx(0.01 / 0.3, rel=1e-9)
    assert out.dtype == "float64"


def test_sequence_of_tensors_locates_inside_a_tensor() -> None:
    ref = [np.zeros(2, np.float32), np.zeros((1, 2), np.float32)]
    cand = [np.zeros(2, np.float32), np.array([[0, 1]], np.float32)]
    out = one(ref, cand, Tolerance())
    assert (out.first_mismatch, out.elements, out.mismatches) == ("[1](0, 1)", 4, 1)
    assert out.max_abs_error == 1.0


def test_map_output_with_string_keys() -> None:
    out = one({"cat": 1.0, "dog": 2.0}, {"cat": 1.0, "dog": 2.5}, Tolerance())
    assert (out.kind, out.verdict, out.first_mismatch) == ("map", "fail", "['dog']")
    out = one({"cat": 1.0}, {"cat": 1.0, "dog": 2.0}, Tolerance())
    assert "extra in candidate ['dog']" in out.reason


def test_sequence_of_int_tensors_is_exact() -> None:
    out = one([np.array([1, 2])], [np.array([1, 3])], Tolerance(rtol=0.5, atol=10))
    assert (out.verdict, out.first_mismatch) == ("fail", "[0](1,)")


def test_empty_sequence_passes() -> None:
    out = one([], [], Tolerance())
    assert (out.verdict, out.elements) == ("pass", 0)


# --------------------------------------------------------------------------------------------
# Tolerance validation and per-output overrides


def test_tolerance_defaults_are_strict() -> None:
    tolerance = Tolerance()
    assert (tolerance.rtol, tolerance.atol, tolerance.fp16_ulps) == (1e-4, 1e-5, 4.0)
    assert tolerance.min_cosine is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rtol": -1e-3}, "negative"),
        ({"atol": -1e-9}, "negative"),
        ({"fp16_ulps": -1}, "negative"),
        ({"rtol": math.nan}, "not finite"),
        ({"atol": math.nan}, "not finite"),
        ({"fp16_ulps": math.nan}, "not finite"),
        ({"atol": math.inf}, "not finite"),
        ({"rtol": 1.0}, "rtol=1 is a bug"),
        ({"rtol": 2.0}, "rtol=1 is a bug"),
        ({"fp16_ulps": 128}, "100% relative error"),
        ({"min_cosine": 1.5}, r"outside \[-1, 1\]"),
        ({"min_cosine": math.nan}, "not finite"),
        ({"rtol": "1e-3"}, "must be a number"),
        ({"atol": True}, "must be a number"),
    ],
)
def test_tolerance_rejects(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        Tolerance(**kwargs)


def test_override_makes_a_failing_output_pass_and_only_that_one() -> None:
    ref = {"logits": f64(1, 2), "probs": f64(1, 2)}
    cand = {"logits": f64(1, 2.003), "probs": f64(1, 2.003)}
    strict = compare(ref, cand, Tolerance())
    assert [o.verdict for o in strict.outputs] == ["fail", "fail"]
    loose = Tolerance(rtol=1e-2, atol=1e-3)
    relaxed = compare(ref, cand, Tolerance(), {"logits": loose})
    assert [o.verdict for o in relaxed.outputs] == ["pass", "fail"]
    assert relaxed.outputs[0].tolerance == loose
    assert relaxed.outputs[1].tolerance == Tolerance()


def test_override_can_be_stricter() -> None:
    out = one(f64(1), f64(1 + 1e-9), Tolerance(), y=EXACT)
    assert out.verdict == "fail"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"logitz": Tolerance()}, "no such output"), ({"y": 1e-3}, "must be a Tolerance")],
)
def test_bad_overrides(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        compare({"y": f64(1)}, {"y": f64(1)}, Tolerance(), overrides)


def test_tolerance_must_be_a_tolerance() -> None:
    with pytest.raises(ValueError, match="must be a Tolerance"):
        compare({"y": f64(1)}, {"y": f64(1)}, 1e-3)


# --------------------------------------------------------------------------------------------
# Comparison: passed, worst, summary, to_dict


def _mixed() -> Comparison:
    ref = {"a": f64(1), "b": f64(10), "c": f64(100), "d": np.array([1])}
    cand = {"a": f64(1.5), "b": f64(12), "c": f64(103), "d": np.array([1])}
    return compare(ref, cand, Tolerance(), {"c": Tolerance(rtol=0, atol=5)})


def test_worst_is_the_failing_output_with_largest_error() -> None:
    comparison = _mixed()
    assert [o.verdict for o in comparison.outputs] == ["fail", "fail", "pass", "pass"]
    assert not comparison.passed
    worst = comparison.worst()
    assert worst is not None and worst.name == "b"  # 2.0 > 0.5; "c" (3.0) passes
    assert worst.max_abs_error == 2.0


def test_worst_ranks_unfixable_failures_first_and_is_none_when_passing() -> None:
    comparison = compare({"a": f64(1), "b": f64(1)}, {"a": f64(9)}, Tolerance())
    assert comparison.worst().name == "b"  # missing beats an error of 8
    passing = compare({"a": f64(1)}, {"a": f64(1)}, Tolerance())
    assert passing.passed and passing.worst() is None


def test_summary_is_one_line() -> None:
    failing = _mixed().summary()
    assert failing.startswith("2 of 4 outputs fail: 'a': ")
    assert "'b': " in failing and "'c'" not in failing and "\n" not in failing
    passing = compare({"a": f64(1), "b": f64(2)}, {"a": f64(1), "b": f64(2.5)}, Tolerance(atol=1))
    assert passing.summary() == "all 2 outputs within tolerance; max abs error 0.5 on 'b'"


def _walk_types(value: object) -> set[type]:
    if isinstance(value, dict):
        return {dict}.union(*(_walk_types(v) for v in value.values()))
    if isinstance(value, list):
        return {list}.union(*(_walk_types(v) for v in value))
    return {type(value)}


def test_to_dict_is_strict_json_with_python_types() -> None:
    ref = {"x": f64(1, np.nan), "ids": np.array([1, 2]), "zm": ZIPMAP_REF}
    cand = {"x": f64(1, 2), "ids": np.array([1, 3]), "zm": ZIPMAP_REF}
    data = compare(ref, cand, Tolerance()).to_dict()
    text = json.dumps(data, allow_nan=False)
    assert _walk_types(data) <= {dict, list, str, int, float, bool, type(None)}
    assert data["passed"] is False and data["sets"] == 1
    x = data["outputs"][0]
    assert x["max_abs_error"] == "inf" and x["shape"] == [2]
    assert x["tolerance"] == {"rtol": 1e-4, "atol": 1e-5, "fp16_ulps": 4.0, "min_cosine": None}
    assert json.loads(text)["outputs"][2]["cosine"] == 1.0


# --------------------------------------------------------------------------------------------
# Several input sets


def test_compare_sets_aggregates_worst_across_sets() -> None:
    ref = {"y": f64(1, 2, 3, 4), "ids": np.array([7, 8])}
    set0 = {"y": f64(1, 2, 3, 4.25), "ids": np.array([7, 8])}
    set1 = {"y": f64(1, 2, 3, 4.5), "ids": np.array([7, 8])}
    comparison = compare_sets([ref, ref], [set0, set1], Tolerance(rtol=0, atol=0.3))
    assert comparison.sets == 2 and not comparison.passed
    y, ids = comparison.outputs
    assert y.verdict == "fail" and ids.verdict == "pass"
    assert y.reason.startswith("fails in set 1 of 2; set 1: 1 of 4 elements outside tolerance")
    assert y.max_abs_error == 0.5  # max(0.25, 0.5)
    assert y.mean_abs_error == 0.125  # max(0.0625, 0.125)
    assert y.max_rel_error == 0.125  # max(0.0625, 0.125)
    assert y.cosine == pytest.approx(COS_1234, rel=1e-12)  # set 1 has the lower cosine
    assert (y.elements, y.mismatches, y.set_index, y.first_mismatch) == (8, 1, 1, "(3,)")
    assert ids.elements == 4 and ids.mismatches == 0
    assert "over 2 input sets" in comparison.summary()


def test_compare_sets_reason_lists_every_failing_set() -> None:
    ref = {"y": f64(1)}
    comparison = compare_sets([ref] * 3, [{"y": f64(2)}, ref, {"y": f64(5)}], Tolerance())
    out = comparison.outputs[0]
    assert out.reason.startswith("fails in sets 0, 2 of 3; set 0: ")
    assert (out.max_abs_error, out.mismatches, out.set_index) == (4.0, 2, 0)


def test_compare_sets_passing_reports_the_set_with_largest_error() -> None:
    # dynamic dimension: the two sets have different shapes, which is fine
    refs = [{"y": f64(1, 2)}, {"y": f64(1, 2, 3)}]
    cands = [{"y": f64(1, 2.5)}, {"y": f64(1, 2, 3.25)}]
    out = compare_sets(refs, cands, Tolerance(rtol=0, atol=1)).outputs[0]
    assert out.verdict == "pass" and out.reason == ""
    assert (out.set_index, out.shape, out.max_abs_error) == (0, (2,), 0.5)
    assert out.elements == 5


def test_compare_sets_missing_output_in_one_set() -> None:
    comparison = compare_sets([{"y": f64(1)}, {"y": f64(1)}], [{"y": f64(1)}, {}], Tolerance())
    assert comparison.outputs[0].reason == "fails in set 1 of 2; set 1: missing from the candidate"


@pytest.mark.parametrize(
    ("refs", "cands", "overrides", "message"),
    [
        ([{"y": f64(1)}], [], None, "1 reference output sets but 0 candidate sets"),
        ([], [], None, "no output sets"),
        ([{"y": f64(1)}], [{"y": f64(1)}], {"z": Tolerance()}, "no such output"),
    ],
)
def test_compare_sets_rejects(refs, cands, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        compare_sets(refs, cands, Tolerance(), overrides)


def test_compare_sets_applies_overrides() -> None:
    refs, cands = [{"y": f64(1)}] * 2, [{"y": f64(1.01)}] * 2
    assert not compare_sets(refs, cands, Tolerance()).passed
    assert compare_sets(refs, cands, Tolerance(), {"y": Tolerance(atol=0.1)}).passed


# --------------------------------------------------------------------------------------------
# Properties

_float_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    elements={"allow_nan": True, "allow_infinity": True},
)


@settings(max_examples=200, deadline=None)
@given(_float_arrays)
def test_property_identical_outputs_pass_with_zero_error(x: np.ndarray) -> None:
    out = compare_output("y", x, x.copy(), EXACT)
    assert out.verdict == "pass", out.reason
    assert out.mismatches == out.nonfinite_mismatches == 0
    assert out.max_abs_error == out.mean_abs_error == out.p99_abs_error == 0.0
    assert out.max_rel_error == 0.0 and out.cosine == 1.0


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        st.integers(0, 20),
        elements=st.one_of(st.floats(-10, 10), st.sampled_from([math.nan, math.inf, -math.inf])),
    ),
    st.data(),
)
def test_property_mismatch_count_matches_numpy_isclose(ref: np.ndarray, data) -> None:
    delta = data.draw(hnp.arrays(np.float64, ref.shape, elements=st.floats(-1e-2, 1e-2)))
    cand = ref + delta
    tolerance = Tolerance(rtol=1e-3, atol=1e-3)
    out = compare_output("y", ref, cand, tolerance)
    # numpy.isclose(a, b) tests |a - b| <= atol + rtol * |b|: b is the reference
    expected = int((~np.isclose(cand, ref, rtol=1e-3, atol=1e-3, equal_nan=True)).sum())
    assert out.mismatches == expected
    assert out.passed == (expected == 0)
