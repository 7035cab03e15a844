"""What ``--prune`` asks for, parsed and checked before any work.

``--prune ffn=0.2`` removes 20% of the feed-forward intermediate channels (over all blocks;
the share per block follows the measured importance, ``importance.allocate``);
``heads=0.25`` a quarter of the attention heads the same way; ``ffn=0.2,heads=0.25`` both.
``layers=2`` removes the two whole layers of least measured influence (``layers``); with a
share (``layers=2,ffn=0.2``) the layers go first and the share is of what remains.
``sparse=2:4`` zeroes 2 of every 4 consecutive weights along the reduction axis of every
eligible MatMul/Gemm (``sparse``: TensorRT's sparse kernels); with other targets it comes
last, on the model they leave. ``--prune auto`` searches the largest ``ffn`` share whose model
stays within the accuracy budget.
A bad spec is the user's mistake: ``ValueError`` with one line that says what is accepted
(the CLI turns it into exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"
# ffn: intermediate channels of feed-forward blocks (ffn.py); heads: attention heads of the
# fused Attention op (heads.py); layers: whole residual layers, a count (layers.py); sparse:
# the 2:4 weight pattern, its one accepted value (sparse.py).
TARGETS = ("ffn", "heads", "layers", "sparse")
SPARSE_PATTERN = "2:4"


@dataclass(frozen=True)
class PruneSpec:
    """The pruning asked for: each share target's share in (0, 1), the number of whole
    layers removed (None: not pruned) and whether the 2:4 pattern is applied last, or
    ``auto`` (the guard finds the ``ffn`` share)."""

    ffn: float | None = None
    heads: float | None = None
    layers: int | None = None
    sparse: bool = False
    auto: bool = False

    @property
    def shares(self) -> dict[str, float | None]:
        """Share target -> share for the ``ffn`` / ``heads`` pruned (``ffn`` -> None under
        ``auto``)."""
        if self.auto:
            return {"ffn": None}
        chosen = {"ffn": self.ffn, "heads": self.heads}
        return {target: share for target, share in chosen.items() if share is not None}

    @property
    def targets(self) -> dict[str, float | int | str | None]:
        """Every target pruned -> its share, count or pattern, in the order they are applied
        (``layers`` first, ``sparse`` last)."""
        return {
            **({"layers": self.layers} if self.layers else {}),
            **self.shares,
            **({"sparse": SPARSE_PATTERN} if self.sparse else {}),
        }

    @property
    def text(self) -> str:
        if self.auto:
            return AUTO
        return ",".join(
            f"{t}={v}" if isinstance(v, str) else f"{t}={v:g}" for t, v in self.targets.items()
        )


def parse(text: str) -> PruneSpec:
    """``auto`` or ``TARGET=VALUE`` pairs, comma-separated (``ffn=0.2,heads=0.25``,
    ``layers=2``, ``sparse=2:4``): a fraction for ``ffn`` and ``heads``, a count for
    ``layers``, the pattern for ``sparse``."""
    text = text.strip()
    if text == AUTO:
        return PruneSpec(auto=True)
    values: dict[str, float | int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        target, sep, value = part.partition("=")
        target = target.strip()
        if not sep:
            raise ValueError(f"expected {AUTO} or TARGET=VALUE (e.g. ffn=0.2), got {part!r}")
        if target not in TARGETS:
            raise ValueError(f"unknown pruning target {target!r} (known: {', '.join(TARGETS)})")
        if target in values:
            raise ValueError(f"{target} given twice")
        if target == "layers":
            values[target] = _count(value.strip())
            continue
        if target == "sparse":
            if value.strip() != SPARSE_PATTERN:
                raise ValueError(
                    f"sparse accepts {SPARSE_PATTERN} only (the pattern TensorRT's sparse "
                    f"kernels run), got {value.strip()!r}"
                )
            values[target] = True
            continue
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(f"{target} expects a fraction, got {value.strip()!r}") from None
        if not 0 < fraction < 1:
            raise ValueError(f"{target} fraction must be in (0, 1), got {value.strip()}")
        values[target] = fraction
    if not values:
        raise ValueError(f"expected {AUTO} or TARGET=VALUE (e.g. ffn=0.2), got {text!r}")
    return PruneSpec(**values)


def _count(text: str) -> int:
    """The number of layers to remove: a whole number >= 1 (whether the model has more
    layers than that is checked on the model, ``stage.check``)."""
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"layers expects a whole number of layers, got {text!r}") from None
    if count < 1:
        raise ValueError(f"layers must be at least 1, got {text}")
    return count
