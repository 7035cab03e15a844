"""Graph passes over onnx-ir models; ``graph_passes.registry`` names them.

Layout: ``cleanup/`` (folding, dead and no-op removal, CSE, chains, opset), ``fusions/``
(one module per fusion, each carrying its facts), ``target/`` (which ops a target runs,
kernel timing and its store), ``testing/`` (test helpers and the fuzzer). Shared pieces:
``base`` (the pass class, value helpers), ``match`` (matcher helpers), ``shapes``.
This package imports only ``pipeline.runtime`` from the rest of the project.
"""
