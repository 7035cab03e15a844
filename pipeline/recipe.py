"""Recipes: an ordered pass list plus verification and speed budgets, as validated data.

A recipe is a TOML file (bundled ones live in ``pipeline/recipes``). It is validated when it
loads: unknown keys, unknown pass names, duplicates, out-of-range numbers and broken ordering
rules are all rejected with a message naming the offending field, because a typo in a recipe
must not silently run a different pipeline. CLI flags override a loaded recipe through
``Recipe.with_overrides``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from graph_passes.registry import FUSIONS_GROUP, REGISTRY, default_fusions, order_rules
from graph_passes.target.targets import TARGETS
from pipeline.runtime.errors import UserError

VERIFY_MODES = ("per-pass", "end", "auto")
MAX_OPSET = 23  # the newest default-domain opset ONNX Runtime 1.31 runs

# (earlier, later): when a recipe has both, ``earlier`` must come first. Each pass states its
# own (``runs_after``); this is every such fact together.
ORDER_RULES: tuple[tuple[str, str], ...] = order_rules()


def expand_passes(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``names`` with the ``"fusions"`` entry replaced by every default fusion, in order."""
    expanded: list[str] = []
    for name in names:
        expanded.extend(default_fusions() if name == FUSIONS_GROUP else (name,))
    return tuple(expanded)


@dataclass(frozen=True)
class VerifySettings:
    """How passes are verified and the default output tolerance."""

    mode: str = "auto"
    rtol: float = 1e-4
    atol: float = 1e-5


@dataclass(frozen=True)
class SpeedSettings:
    """The latency check of original vs. optimized on ONNX Runtime CPU."""

    check: bool = True
    rounds: int = 15
    max_slowdown: float = 0.05
    # Time each contrib fusion against the nodes it replaces on this CPU and leave it out
    # where the fused kernel is slower (graph_passes/target/kernel_timing.py; cpu target only).
    time_kernels: bool = True
    # Ignore this machine's stored kernel-timing verdicts, measure again and replace them
    # with the new clean ones (the CLI's --retime; needs time_kernels).
    retime: bool = False


@dataclass(frozen=True)
class Recipe:
    """A validated, immutable pipeline description."""

    name: str
    passes: tuple[str, ...]
    description: str = ""
    max_iterations: int = 8
    # Where the model will run: cpu / cuda (ORT contrib ops allowed where a kernel exists)
    # or portable (standard ONNX only, for TensorRT and other runtimes).
    target: str = "cpu"
    # Raise the default-domain opset up to this so standard fused ops fit (0: never).
    raise_opset_to: int = 0
    verify: VerifySettings = field(default_factory=VerifySettings)
    speed: SpeedSettings = field(default_factory=SpeedSettings)

    def __post_init__(self) -> None:
        _validate(self)

    def with_overrides(
        self,
        *,
        passes: list[str] | None = None,
        skip_passes: list[str] | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        verify_mode: str | None = None,
        speed_check: bool | None = None,
        time_kernels: bool | None = None,
        retime: bool | None = None,
        target: str | None = None,
        raise_opset_to: int | None = None,
    ) -> Recipe:
        """A copy with CLI overrides applied (and validated again)."""
        chosen = expand_passes(passes) if passes is not None else self.passes
        skip = set(skip_passes or ())
        unknown = sorted(skip - set(REGISTRY))
        if unknown:
            raise UserError(f"--skip-passes names unknown pass(es): {', '.join(unknown)}")
        verify = dataclasses.replace(
            self.verify,
            rtol=self.verify.rtol if rtol is None else rtol,
            atol=self.verify.atol if atol is None else atol,
            mode=self.verify.mode if verify_mode is None else verify_mode,
        )
        speed = dataclasses.replace(
            self.speed,
            check=self.speed.check if speed_check is None else speed_check,
            time_kernels=self.speed.time_kernels if time_kernels is None else time_kernels,
            retime=self.speed.retime if retime is None else retime,
        )
        return dataclasses.replace(
            self,
            passes=tuple(p for p in chosen if p not in skip),
            verify=verify,
            speed=speed,
            target=self.target if target is None else target,
            raise_opset_to=self.raise_opset_to if raise_opset_to is None else raise_opset_to,
        )


def _validate(recipe: Recipe) -> None:
    where = f"recipe '{recipe.name}'"
    unknown = [p for p in recipe.passes if p not in REGISTRY]
    if unknown:
        raise UserError(
            f"{where}: unknown pass(es) {', '.join(unknown)}; "
            f"known passes: {', '.join(sorted(REGISTRY))} "
            f"(and '{FUSIONS_GROUP}': every default fusion)"
        )
    duplicates = sorted({p for p in recipe.passes if recipe.passes.count(p) > 1})
    if duplicates:
        raise UserError(f"{where}: pass(es) listed twice: {', '.join(duplicates)}")
    for earlier, later in ORDER_RULES:
        if earlier in recipe.passes and later in recipe.passes:
            if recipe.passes.index(earlier) > recipe.passes.index(later):
                raise UserError(f"{where}: pass '{earlier}' must come before '{later}'")
    if recipe.target not in TARGETS:
        raise UserError(f"{where}: target must be one of {', '.join(TARGETS)}")
    if recipe.raise_opset_to and not 13 <= recipe.raise_opset_to <= MAX_OPSET:
        raise UserError(f"{where}: raise_opset_to must be 0 or in 13..{MAX_OPSET}")
    if not 1 <= recipe.max_iterations <= 100:
        raise UserError(f"{where}: max_iterations must be in 1..100")
    if recipe.verify.mode not in VERIFY_MODES:
        raise UserError(f"{where}: verify.mode must be one of {', '.join(VERIFY_MODES)}")
    for name in ("rtol", "atol"):
        value = getattr(recipe.verify, name)
        if not 0 <= value < 1:
            raise UserError(f"{where}: verify.{name} must be in [0, 1), got {value}")
    if not 3 <= recipe.speed.rounds <= 1000:
        raise UserError(f"{where}: speed.rounds must be in 3..1000")
    if not 0 <= recipe.speed.max_slowdown < 1:
        raise UserError(f"{where}: speed.max_slowdown must be in [0, 1)")


_TOP_KEYS = {
    "name",
    "description",
    "passes",
    "max_iterations",
    "target",
    "raise_opset_to",
    "verify",
    "speed",
}


def parse_recipe(data: dict, source: str) -> Recipe:
    """Build a Recipe from parsed TOML, rejecting unknown keys and wrong types."""
    extra = sorted(set(data) - _TOP_KEYS)
    if extra:
        raise UserError(f"{source}: unknown key(s) {', '.join(extra)}")
    passes = data.get("passes")
    if not isinstance(passes, list) or not all(isinstance(p, str) for p in passes):
        raise UserError(f"{source}: 'passes' must be a list of pass names")
    try:
        verify = VerifySettings(**_table(data, "verify", source))
        speed = SpeedSettings(**_table(data, "speed", source))
    except TypeError as exc:
        raise UserError(f"{source}: {exc}") from exc
    _check_types(verify, source, "verify")
    _check_types(speed, source, "speed")
    name = data.get("name", Path(source).stem)
    iterations = data.get("max_iterations", 8)
    target = data.get("target", "cpu")
    raise_opset_to = data.get("raise_opset_to", 0)
    if not isinstance(name, str) or not isinstance(iterations, int):
        raise UserError(f"{source}: 'name' must be a string and 'max_iterations' an integer")
    if not isinstance(target, str) or not isinstance(raise_opset_to, int):
        raise UserError(f"{source}: 'target' must be a string and 'raise_opset_to' an integer")
    return Recipe(
        name=name,
        passes=expand_passes(passes),
        description=str(data.get("description", "")),
        max_iterations=iterations,
        target=target,
        raise_opset_to=raise_opset_to,
        verify=verify,
        speed=speed,
    )


def _table(data: dict, key: str, source: str) -> dict:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise UserError(f"{source}: [{key}] must be a table")
    return table


def _check_types(settings: object, source: str, table: str) -> None:
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        expected = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}[
            str(f.type)
        ]
        if isinstance(value, bool) and bool not in expected:
            raise UserError(f"{source}: {table}.{f.name} has the wrong type")
        if not isinstance(value, expected):
            raise UserError(f"{source}: {table}.{f.name} has the wrong type")


def bundled_recipe_names() -> list[str]:
    """Names of the recipes shipped in ``pipeline/recipes``."""
    files = resources.files("pipeline.recipes").iterdir()
    return sorted(p.name[: -len(".toml")] for p in files if p.name.endswith(".toml"))


def load_recipe(name_or_path: str) -> Recipe:
    """Load a bundled recipe by name, or a recipe file by path."""
    path = Path(name_or_path)
    if name_or_path in bundled_recipe_names():
        text = resources.files("pipeline.recipes").joinpath(f"{name_or_path}.toml").read_text()
        source = f"recipe '{name_or_path}'"
    elif path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        text = path.read_text(encoding="utf-8", errors="replace")
        source = str(path)
    else:
        raise UserError(
            f"unknown recipe '{name_or_path}'; bundled: {', '.join(bundled_recipe_names())}"
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: not valid TOML ({exc})") from exc
    return parse_recipe(data, source)
