"""Load a model safely and save one atomically.

Loading goes through onnx-ir so external data stays memory-mapped (models over 2 GB never
become one protobuf). Every way a file can be unusable is turned into a one-line ``UserError``.
Saving writes into a temporary folder beside the target and renames into place, so the target
path holds either the previous file or the complete new one, never a partial write.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from pipeline.runtime import opaque_types, scratch_weights
from pipeline.runtime.errors import UserError
from pipeline.runtime.proto_size import ONE_MESSAGE_LIMIT
from pipeline.runtime.scratch_weights import ScratchWeights

logger = logging.getLogger(__name__)

MIN_IR_VERSION = 4
# Keys in the main graph's ``meta`` (copied by Model.clone, never serialized).
DECLARED_VALUE_INFO = "declared_value_info"
LOAD_NOTES = "load_notes"


def load_model(path: str | os.PathLike, scratch: ScratchWeights | None = None) -> ir.Model:
    """Load and check an ONNX model, raising ``UserError`` for anything unusable.

    With ``scratch``, a large model whose weights are inside its file (a file of
    ``scratch_weights.SPILL_FILE_BYTES`` and up, no external data) has them moved to the
    scratch folder and memory-mapped from there (pipeline/runtime/scratch_weights.py says
    why)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"input model not found: {path}")
    if path.is_dir():
        raise UserError(f"input is a directory, not an .onnx file: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"input model is an empty file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types for bad bytes
        raise UserError(f"not a readable ONNX model: {path} ({_first_line(exc)})") from exc
    if proto.HasField("graph"):
        _raise_duplicate_outputs(proto.graph, path)
    checked = path
    base_dir = path.parent
    if scratch is not None and _worth_spilling(path, proto):
        checked = scratch.externalize_proto(proto)
        base_dir = checked.parent
        proto = onnx.load(str(checked), load_external_data=False)
    stash = opaque_types.detach(proto)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise UserError(f"not a readable ONNX model: {path} ({_root_cause(exc)})") from exc
    del proto
    ir.external_data.set_base_dir(model.graph, str(base_dir))
    opaque_types.attach(model, stash)
    if len(model.graph) == 0 and not model.graph.outputs:
        raise UserError(f"file parses but holds no ONNX graph (not a model?): {path}")
    if not model.graph.outputs:
        raise UserError(f"model graph has no outputs, nothing to optimize: {path}")
    _check_external_data(model, path)
    try:
        check_model(checked)
    except UserError as exc:
        if _UNSORTED not in str(exc):
            raise
        _sort_and_check(model, path)
    _raise_old_ir_version(model)
    model.graph.meta[DECLARED_VALUE_INFO] = _described_values(model)
    return model


def _worth_spilling(path: Path, proto: onnx.ModelProto) -> bool:
    """A large file whose weights are all inside it (a model with external data already
    keeps its weights on disk)."""
    if path.stat().st_size < scratch_weights.SPILL_FILE_BYTES:
        return False
    return not any(
        tensor.data_location == onnx.TensorProto.EXTERNAL
        for tensor in onnx.external_data_helper._get_all_tensors(proto)
    )


def _raise_duplicate_outputs(graph: onnx.GraphProto, path: Path) -> None:
    """Two nodes writing one value name make the graph meaningless; name the value and nodes.

    Each graph is its own scope (a subgraph may reuse a name from its parent's nodes).
    """
    producers: dict[str, str] = {value.name: "a graph input" for value in graph.input}
    for node in graph.node:
        here = f"{node.op_type} node '{node.name}'" if node.name else f"a {node.op_type} node"
        for name in node.output:
            if not name:
                continue
            if name in producers:
                raise UserError(
                    f"value '{name}' is written twice, by {producers[name]} and by {here} "
                    f"(duplicate value names; graph '{graph.name}'): {path}"
                )
            producers[name] = here
        for attribute in node.attribute:
            subgraphs = [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]
            for sub in subgraphs:
                _raise_duplicate_outputs(sub, path)


def add_note(model: ir.Model, text: str) -> None:
    """Record something the user should know about how the model was read (report warning)."""
    model.graph.meta.setdefault(LOAD_NOTES, []).append(text)


def load_notes(model: ir.Model) -> list[str]:
    return list(model.graph.meta.get(LOAD_NOTES, []))


def detach_initializer_inputs(model: ir.Model) -> int:
    """Stop listing weights as graph inputs (old exporters did); returns how many.

    An initializer that is also a graph input is, by the ONNX spec, a default the caller may
    override, so no optimizer may treat it as a constant (ONNX Runtime warns and does not
    fold it either). Nobody feeds the weights of a model-zoo CNN at run time, so by default
    they become plain initializers and the passes can fold them; the report says how many.
    """
    weights = [value for value in model.graph.inputs if value.is_initializer()]
    for value in weights:
        model.graph.inputs.remove(value)
    if weights:
        add_note(
            model,
            f"{len(weights)} initializer(s) were also listed as graph inputs (old exporters did "
            "this) and were made plain weights; --keep-initializer-inputs keeps them as inputs",
        )
    return len(weights)


def _raise_old_ir_version(model: ir.Model) -> None:
    """IR version < 4 requires every initializer to be a graph input too, so any pass that
    adds a weight would fail the checker. IR 4 only relaxed that rule, so raise to it."""
    if model.ir_version < MIN_IR_VERSION:
        add_note(model, f"IR version {model.ir_version} raised to {MIN_IR_VERSION}")
        model.ir_version = MIN_IR_VERSION


def _described_values(model: ir.Model) -> frozenset[str]:
    """Names of intermediate values the input model gave a type or shape (its value_info)."""
    return frozenset(
        value.name
        for graph in model.graphs()
        for node in graph
        for value in node.outputs
        if value.name and (value.type is not None or value.shape is not None)
    )


# The checker's words for a node that uses a value no earlier node produced. ONNX Runtime
# rejects such subgraphs too, but node order carries no meaning, so we sort instead.
_UNSORTED = "must be topologically sorted"


def check_model(path: Path) -> None:
    """Run the ONNX checker on a file (by path, so external data and >2 GB models work)."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:
        raise UserError(f"model fails the ONNX checker: {_first_line(exc)}") from exc


def _sort_and_check(model: ir.Model, path: Path) -> None:
    """Sort the main graph and every subgraph (stable), then check the sorted model.

    Exporters and hand-edited models sometimes list nodes out of order, most often inside
    If/Loop bodies. A value that no node produces still fails the check after sorting.
    """
    try:
        model.graph.sort()  # sorts all subgraphs too
    except ValueError as exc:  # a cycle
        raise UserError(
            f"model graph has a cycle through {_cycle_nodes(model.graph)}: {path}"
        ) from exc
    try:
        onnx.checker.check_model(opaque_types.to_proto(model), full_check=False)
    except Exception as exc:
        raise UserError(f"model fails the ONNX checker: {_first_line(exc)}") from exc
    add_note(model, "nodes were not in topological order; they were sorted")


def _cycle_nodes(graph: ir.Graph, limit: int = 4) -> str:
    """Describe the nodes that lie on a cycle of ``graph`` (for the error message).

    Nodes are peeled off from both ends (no producer left, then no consumer left); what
    remains is the cycles themselves. A cycle inside a subgraph is reported as 'a subgraph'.
    """
    nodes = list(graph)
    inside = set(nodes)

    def preds(node: ir.Node) -> set[ir.Node]:
        return {v.producer() for v in node.inputs if v is not None and v.producer() in inside}

    def succs(node: ir.Node) -> set[ir.Node]:
        return {user for v in node.outputs for user, _ in v.uses() if user in inside}

    for neighbours in (preds, succs):
        changed = True
        while changed:
            changed = False
            for node in list(inside):
                if not neighbours(node):
                    inside.discard(node)
                    changed = True
    if not inside:
        return "a subgraph"
    on_cycle = [n for n in nodes if n in inside]
    names = [
        f"{n.op_type} '{n.name or (n.outputs[0].name if n.outputs else '?')}'"
        for n in on_cycle[:limit]
    ]
    more = f" and {len(on_cycle) - limit} more" if len(on_cycle) > limit else ""
    return "nodes " + ", ".join(names) + more


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Fail early and clearly when an external-data file is missing or too short."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            data_path = Path(tensor.base_dir) / tensor.location
            if not data_path.is_file():
                raise UserError(
                    f"external data file missing for initializer '{value.name}': {data_path}"
                )
            needed = (tensor.offset or 0) + (tensor.length or 0)
            if data_path.stat().st_size < needed:
                raise UserError(
                    f"external data file too short for initializer '{value.name}': {data_path}"
                )


def tensor_bytes(model: ir.Model) -> int:
    """Total bytes of initializer data in all graphs (no tensor data is read)."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def save_model(
    model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None
) -> None:
    """Write ``model`` to ``path`` atomically, with external data when large or asked.

    Everything is written into a temporary folder in the target's directory and renamed into
    place, so the target path holds the previous model or the complete new one. External
    data goes to ``OUT.<content hash>.data``: a new model never reads an old data file nor
    an old model a new one, whatever moment a crash hits, and identical weights give
    identical names (runs stay byte-identical). The previous model's data file is removed
    once the new model is in place. ``external_data=None`` keeps data external when the
    model's weights are large or already were external.
    """
    path = Path(path)
    target_dir = path.parent if str(path.parent) else Path(".")
    if not target_dir.is_dir():
        raise UserError(f"output folder does not exist: {target_dir}")
    if not os.access(target_dir, os.W_OK):
        raise UserError(f"output folder is not writable: {target_dir}")
    has_external = any(
        isinstance(v.const_value, ir.ExternalTensor)
        for g in model.graphs()
        for v in g.initializers.values()
    )
    if external_data is None:
        external_data = has_external or tensor_bytes(model) >= ONE_MESSAGE_LIMIT
    if not external_data and has_external:
        ir.external_data.load_to_model(model)  # or the file would point at the input's data
    previous_data = _own_data_files(path)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target_dir))
    except OSError as exc:
        raise UserError(f"cannot write to output folder {target_dir}: {exc.strerror}") from exc
    try:
        staged_model = staging / path.name
        staged_data = "staged.data" if external_data else None
        with _only_declared_value_info(model):
            ir.save(model, staged_model, external_data=staged_data)
        data_name = None
        if staged_data is not None:
            digest = file_sha256(staging / staged_data)[:12]
            data_name = f"{path.name}.{digest}.data"
        if data_name is not None or opaque_types.has_opaque_types(model):
            proto = onnx.load(str(staged_model), load_external_data=False)
            _relocate_external_data(proto, data_name)
            onnx.save(opaque_types.restore(proto, model), str(staged_model))
        if data_name is not None:
            os.replace(staging / staged_data, target_dir / data_name)
        os.replace(staged_model, path)
    except OSError as exc:
        raise UserError(f"cannot write output model {path}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in previous_data - {data_name}:
        (target_dir / old).unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in blocks (weights files can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def referenced_data_files(path: Path) -> set[str]:
    """External-data locations the model file at ``path`` refers to (empty if none/unreadable).

    A file of ``scratch_weights.SPILL_FILE_BYTES`` or more is taken to hold its weights
    itself and is not parsed: a protobuf can only be read whole, and reading a multi-GB model
    to list no data files would double a run's memory. (A model with external data is a
    small file.)"""
    if not path.is_file() or path.stat().st_size >= scratch_weights.SPILL_FILE_BYTES:
        return set()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set()
    return {
        entry.value
        for tensor in onnx.external_data_helper._get_all_tensors(proto)
        for entry in tensor.external_data
        if entry.key == "location"
    }


def _own_data_files(path: Path) -> set[str]:
    """Data files of the model now at ``path`` that a save of ours wrote (``NAME.*.data``)."""
    return {
        name
        for name in referenced_data_files(path)
        if "/" not in name and name.startswith(path.name + ".") and name.endswith(".data")
    }


def _relocate_external_data(proto: onnx.ModelProto, data_name: str | None) -> None:
    if data_name is None:
        return
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name


@contextlib.contextmanager
def _only_declared_value_info(model: ir.Model) -> Iterator[None]:
    """While saving, write ``value_info`` only where the input model had it.

    onnx-ir writes an entry for every value with a type or shape: for every initializer
    (repeating what the tensor says) and for every intermediate value that shape inference
    (run by several passes) annotated. A quantized model with dozens of small scales grew
    ~8% from that alone, so an "optimized" file came out larger than its input. ONNX Runtime
    infers these itself at load. Types and shapes are cleared only during the save.
    """
    declared = model.graph.meta.get(DECLARED_VALUE_INFO)
    cleared = []
    for graph in model.graphs():
        outputs = set(graph.outputs)
        inputs = {value.name for value in graph.inputs}
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or value.name in inputs or value.metadata_props or value.doc_string:
                continue
            if value.type != ir.TensorType(tensor.dtype) or value.shape != tensor.shape:
                continue
            cleared.append((value, value.type, value.shape))
        if declared is not None:
            for node in graph:
                for value in node.outputs:
                    if value not in outputs and value.name not in declared:
                        cleared.append((value, value.type, value.shape))
    for value, _, _ in cleared:
        value.type, value.shape = None, None
    try:
        yield
    finally:
        for value, type_, shape in cleared:
            value.type, value.shape = type_, shape


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost cause (onnx-ir wraps the useful message)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
