"""Expected-fusion check: family detection and expected vs. achieved counts on small graphs,
with a loud note on every shortfall."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from graph_passes.fusions.conv_bn import FuseConvBatchNorm
from graph_passes.fusions.gelu import FuseGelu
from graph_passes.fusions.layer_norm import FuseLayerNorm
from graph_passes.fusions.skip_layer_norm import FuseSkipLayerNorm
from graph_passes.target.targets import Target
from graph_passes.testing.helpers import model_from_text
from pipeline.fusion_report import FusionRow, detect_family, expected_fusions

ENCODER = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[N, S] input_ids) => (float[N, S, 4] out)
<float[10, 4] emb = {0., 1., 2., 3., 1., 0., 1., 0., 2., 2., 0., 1., 3., 1., 0., 2., 1., 1., 1., 1.,
   0., 2., 0., 2., 1., 3., 2., 1., 2., 0., 3., 0., 1., 1., 2., 2., 0., 0., 3., 1.},
 float[4] gamma = {0.5, -1.0, 2.0, 1.5}, float[4] beta = {0.1, 0.2, -0.3, 0.0},
 float eps = {0.001}, float two = {2.0}, float sqrt2 = {1.4142135}, float one = {1.0},
 float half = {0.5}> {
  e = Gather(emb, input_ids)
  att = Softmax<axis = -1>(e)
  r = Relu(e)
  x = Add(r, att)
  mean = ReduceMean<axes = [-1]>(x)
  d = Sub(x, mean)
  sq = Pow(d, two)
  var = ReduceMean<axes = [-1]>(sq)
  ve = Add(var, eps)
  std = Sqrt(ve)
  n = Div(d, std)
  y = Mul(n, gamma)
  z = Add(y, beta)
  dv = Div(z, sqrt2)
  er = Erf(dv)
  a = Add(er, one)
  m = Mul(z, a)
  out = Mul(m, half)
}"""
CNN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y)
<float[2, 2, 1, 1] w = {1., 0., 0., 1.}, float[2] s = {1., 2.}, float[2] b = {0., 1.},
 float[2] mu = {0.5, 0.}, float[2] var = {1., 4.}> {
  c = Conv(x, w)
  y = BatchNormalization(c, s, b, mu, var)
}"""


def rows_by_name(rows: list[FusionRow]) -> dict[str, FusionRow]:
    return {row.fusion: row for row in rows}


def test_encoder_expected_and_achieved():
    original = model_from_text(ENCODER)
    assert detect_family(original) == "encoder"
    optimized = original.clone()
    FuseSkipLayerNorm()(optimized)
    FuseGelu()(optimized)
    rows = rows_by_name(expected_fusions(original, optimized))
    assert set(rows) == {"attention", "layernorm", "skip_layernorm", "gelu"}
    assert (rows["attention"].expected, rows["attention"].achieved) == (1, 0)
    assert rows["attention"].note == "attention not fused in 1 of 1 layers: 1 Softmax remain"
    for name in ("layernorm", "skip_layernorm", "gelu"):
        assert (rows[name].expected, rows[name].achieved, rows[name].note) == (1, 1, "")


def test_encoder_nothing_fused_is_loud():
    original = model_from_text(ENCODER)
    rows = rows_by_name(expected_fusions(original, original.clone()))
    assert rows["layernorm"].note.startswith("layernorm not fused in 1 of 1 LayerNorms")
    assert "1 LayerNorm patterns left decomposed" in rows["layernorm"].note
    assert rows["gelu"].note == "gelu not fused in 1 of 1 GELUs"
    assert all(row.shortfall == 1 for row in rows.values())


def test_portable_has_no_skip_row_and_names_the_opset():
    original = model_from_text(ENCODER.replace('"" : 17', '"" : 14'))
    optimized = original.clone()
    FuseLayerNorm(Target("portable"))(optimized)  # blocked: opset 14
    rows = rows_by_name(expected_fusions(original, optimized, Target("portable")))
    assert "skip_layernorm" not in rows
    assert "raise_opset to 17" in rows["layernorm"].note
    assert "raise_opset to 20" in rows["gelu"].note


def test_cnn_batchnorm_folded_or_not():
    original = model_from_text(CNN)
    assert detect_family(original) == "cnn"
    (row,) = expected_fusions(original, original.clone())
    assert (row.fusion, row.expected, row.achieved) == ("batchnorm", 1, 0)
    assert (
        row.note
        == "batchnorm not fused in 1 of 1 BatchNormalization nodes: 1 BatchNormalization remain"
    )
    optimized = original.clone()
    assert FuseConvBatchNorm()(optimized).modified
    (row,) = expected_fusions(original, optimized)
    assert (row.expected, row.achieved, row.note) == (1, 1, "")


@pytest.mark.parametrize(
    ("inputs", "first", "family"),
    [
        ("float[N, 3, 4, 4] pixel_values", "pixel_values", "vit"),
        ("float[N, S, 4] h, float[N, 2, P, 4] past_key_values_0_key", "h", "decoder"),
        ("float[N, S, 4] hidden", "hidden", "unknown"),
    ],
)
def test_family_detection(inputs, first, family):
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
g ({inputs}) => (float[N, S, 4] y) {{
  y = Softmax<axis = -1>({first})
}}"""
    model = model_from_text(text)
    assert detect_family(model) == family


def test_unknown_without_patterns_has_no_rows():
    text = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }"""
    model = model_from_text(text)
    assert expected_fusions(model, model.clone()) == []


def test_model_is_not_modified():
    original = model_from_text(ENCODER)
    before = ir.to_proto(original).SerializeToString()
    expected_fusions(original, original.clone())
    assert ir.to_proto(original).SerializeToString() == before


def test_embedding_sum_is_not_expected_to_become_skip_layer_norm():
    text = ENCODER.replace("x = Add(r, att)", "g2 = Gather(emb, input_ids)\n  x = Add(e, g2)")
    original = model_from_text(text)
    rows = rows_by_name(expected_fusions(original, original.clone()))
    assert "skip_layernorm" not in rows and rows["layernorm"].expected == 1


RMS_BEHIND_CASTS = """<ir_version: 10, opset_import: ["" : 17]>
g (float[N, S, 4] x0) => (float[N, S, 4] out)
<float[4] gamma = {0.5, -1.0, 2.0, 1.5}, float eps = {0.000001}, float two = {2.0}> {
  x = Cast<to = 1>(x0)
  sq = Pow(x, two)
  var = ReduceMean<axes = [-1]>(sq)
  ve = Add(var, eps)
  std = Sqrt(ve)
  r = Reciprocal(std)
  n = Mul(x, r)
  nc = Cast<to = 1>(n)
  out = Mul(gamma, nc)
}"""


def test_rms_norm_behind_no_op_casts_is_expected():
    """Llama exports wrap each RMSNorm in float->float Casts; the count sees through them."""
    model = model_from_text(RMS_BEHIND_CASTS)
    rows = {row.fusion: row for row in expected_fusions(model, model)}
    assert rows["rmsnorm"].expected == 1 and rows["rmsnorm"].achieved == 0
