"""Structured pruning on the ONNX graph, guarded on the user's metric (entry: ``pruning.stage``).

One job per module: ``spec`` (what ``--prune`` asks for), ``ffn`` (feed-forward blocks found
by structure, channels removed), ``heads`` (heads of the fused Attention op), ``layers``
(whole residual layers cut), ``graph`` (the down projection, bias and residual every block
ends in; the rewrite), ``moments`` (activation second moments on calibration data),
``importance`` (channel scores, the share per block), ``reconstruct`` (least-squares refit
of the down projection), ``stage`` (the search, the checks, the report section).
"""
