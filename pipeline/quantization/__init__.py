"""ONNX Runtime quantization, chosen, guarded and verified (entry: ``quantization.stage``).

One job per module: ``isa`` (u8/s8 choice from the CPU), ``preprocess`` (opset, shapes,
mask constants), ``calibration`` (data readers, generated data, cache keys), ``tiers`` (one
function per precision, each a thin call into ``onnxruntime.quantization``), ``guard``
(accuracy against fp32, per-node sensitivity, greedy exclusion).
"""
