"""ONNX Runtime quantization, chosen, guarded and verified (entry: ``quantization.stage``).

One job per module: ``isa`` (u8/s8 choice from the CPU), ``preprocess`` (opset, shapes,
mask constants), ``calibration`` (data readers, generated data, cache keys), ``tiers`` (one
function per precision, each a thin call into ``onnxruntime.quantization``), ``metrics``
(the accuracy metric a budget is held to), ``data`` (calibration / decision / held-out
evaluation splits), ``guard`` (per-vector cosine, SQNR proxy), ``exclusions`` (nodes kept
float by measured effect, fewest within budget), ``smooth`` (SmoothQuant), ``int4_affine``,
``lm_guard`` (perplexity and top-1 for causal LMs).
"""
