"""What a person reads first: a run's facts put into words, once, for every renderer.

The console summary, the Markdown and HTML reports and report.json's ``summary`` section
all read the dict ``summarize`` returns, so a figure and the words about it are made in one
place and cannot disagree between them (the console once printed a latency ratio that the
two medians beside it contradicted, and an int8 run's table showed the fp32 stage's parity
as if it were the int8 model's).

Units: sizes are decimal (1 MB = 10^6 bytes, as a file manager shows them); a latency
ratio is optimized time / original time, so "faster" is its inverse.
"""

from __future__ import annotations

from pipeline.runtime.timing import speed_words


def size_text(nbytes: int | None) -> str:
    """``313 B``, ``4.2 kB``, ``90.4 MB``, ``1.20 GB`` (decimal units)."""
    if nbytes is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{nbytes} B"


def ms_text(ms: float) -> str:
    """A time in milliseconds with the digits that mean something."""
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms:.3g} ms"


def type_text(value: dict | None) -> str:
    """``int64[batch, sequence]``; an unknown dimension is ``?``; ``-`` for no value."""
    if value is None:
        return "-"
    shape = value.get("shape")
    dims = "" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape)
    return f"{(value.get('type') or '?').lower()}{dims}{']' if dims else ''}"


def io_rows(before: dict, after: dict | None) -> list[dict]:
    """Graph inputs then outputs: ``{kind, name, before, after}`` with type and shape."""
    rows = []
    for kind, key in (("in", "inputs"), ("out", "outputs")):
        new = {v["name"]: v for v in (after or {}).get(key, [])}
        for value in before[key]:
            later = new.pop(value["name"], None)
            rows.append(
                {
                    "kind": kind,
                    "name": value["name"],
                    "before": type_text(value),
                    "after": type_text(later) if after else None,
                }
            )
        rows += [
            {"kind": kind, "name": name, "before": "-", "after": type_text(value)}
            for name, value in new.items()
        ]
    return rows


def opset_text(model: dict) -> str:
    """``ai.onnx 17, com.microsoft 1 (IR 8)``."""
    opsets = ", ".join(
        f"{domain or 'ai.onnx'} {version}" for domain, version in model["opset_imports"].items()
    )
    return f"{opsets} (IR {model['ir_version']})"


def op_changes(before: dict, after: dict | None) -> list[dict]:
    """Op types whose count changed, by name: ``{op, before, after}``."""
    if after is None:
        return []
    old, new = before["op_histogram"], after["op_histogram"]
    return [
        {"op": op, "before": old.get(op, 0), "after": new.get(op, 0)}
        for op in sorted(set(old) | set(new))
        if old.get(op, 0) != new.get(op, 0)
    ]


def parity_words(parity: dict | None, verify: dict) -> tuple[bool | None, str]:
    """(passed, words) for the graph passes' parity check against the original."""
    if parity is None:
        return None, "not verified: ONNX Runtime cannot run the model (ONNX checker only)"
    sets = parity.get("sets", 0)
    if not parity["passed"]:
        return False, f"DIFFERENT outputs: {parity['summary']}"
    errors = [(o.get("max_abs_error") or 0.0, o["name"]) for o in parity["outputs"]]
    worst, name = max(errors, default=(0.0, ""))
    if worst == 0.0:
        return True, f"identical outputs on {sets} input sets"
    return True, (
        f"same outputs within tolerance on {sets} input sets (max abs error {worst:.1e} on "
        f"'{name}'; rtol {verify['rtol']:g}, atol {verify['atol']:g})"
    )


def _quantization_check(section: dict) -> dict:
    """The quantized model's accuracy against its budget, in words."""
    if section["precision"] == "fp32":  # auto found no tier worth it: nothing was lowered
        return {
            "stage": "fp32 kept (auto)",
            "passed": True,
            "words": "no candidate was both within its accuracy budget and faster",
        }
    check = section.get("final_check") or {}
    passed = check.get("passed", section.get("within_budget"))
    summary = check.get("summary") or section.get("summary", "")
    budget = check.get("max_drop", section.get("max_drop"))
    where = check.get("against", "the decision data")
    verdict = "within budget" if passed else "OVER budget"
    limit = f" ({section.get('metric')} drop <= {budget:g})" if budget is not None else ""
    return {
        "stage": f"{section['precision']} vs fp32",
        "passed": passed,
        "words": f"{verdict}{limit}: {summary}; measured against {where}",
    }


def _pruning_check(section: dict) -> dict:
    """What pruning removed and the pruned model's accuracy against its budget, in words."""
    check = section.get("final_check") or {}
    if not section.get("pruned"):
        return {"stage": "prune", "passed": True, "words": "nothing pruned: " + check["summary"]}
    removed = ", ".join(
        f"{target} {total['before']} -> {total['after']}"
        for target, total in section.get("totals", {}).items()
    )
    verdict = "within budget" if check.get("passed") else "OVER budget"
    return {
        "stage": f"pruned ({section['targets']}) vs unpruned",
        "passed": check.get("passed"),
        "words": f"{removed}; {verdict} ({section.get('metric')} drop <= "
        f"{section.get('max_drop'):g}): {check.get('summary', '')}",
    }


def checks(report: dict) -> list[dict]:
    """Each stage's check of the model it produced: ``{stage, passed, words}``."""
    rows = []
    status = report["status"]
    if report.get("parity") is not None or status == "ok":
        passed, words = parity_words(report.get("parity"), report["recipe"]["verify"])
        rows.append({"stage": "graph passes (fp32)", "passed": passed, "words": words})
    if report.get("pruning"):
        rows.append(_pruning_check(report["pruning"]))
    if report.get("quantization"):
        rows.append(_quantization_check(report["quantization"]))
    provider = report.get("provider") or {}
    check = provider.get("check") or {}
    if check.get("ran"):
        rows.append(
            {
                "stage": f"on {provider['resolved']}",
                "passed": check.get("passed"),
                "words": check.get("summary", ""),
            }
        )
    return rows


def speed(report: dict) -> dict | None:
    """The speed check in words, with what the figures were measured at; when it did not
    run, why (None when the run stopped before it)."""
    latency = report.get("latency")
    if not latency:
        if report["status"] != "ok":
            return None
        if not report["recipe"]["speed"]["check"]:
            why = "the speed check is off"
        elif report.get("parity") is None:
            why = "ONNX Runtime cannot run the model"
        else:
            why = "nothing was changed"
        return {"verdict": None, "words": f"not measured: {why}"}
    margin = report["recipe"]["speed"]["max_slowdown"]
    shapes = ", ".join(
        f"{name}[{','.join(map(str, shape))}]"
        for name, shape in (latency.get("input_shapes") or {}).items()
    )
    threads = latency.get("intra_op_threads")
    threads_text = (
        f"{threads} threads"
        if threads
        else f"ORT default threads ({latency.get('usable_cores') or '?'} cores)"
    )
    return {
        "verdict": latency["verdict"],
        "words": speed_words(latency["ratio"], latency["noise"], latency["verdict"], margin),
        "medians": f"median per run: {ms_text(latency['median_ms_original'])} -> "
        f"{ms_text(latency['median_ms_optimized'])}",
        "ratio": f"per-round ratio {latency['ratio']:.2f} ±{latency['noise']:.2f} "
        f"(optimized/original, {latency['rounds']} rounds)",
        "measured_at": f"measured at {shapes or 'no inputs'}; {threads_text}",
    }


def provider_words(provider: dict | None) -> str:
    """``cpu``, or the provider chosen and why when there was a choice or a fallback."""
    if not provider:
        return "cpu"
    chosen = provider.get("resolved") or "none"
    if provider.get("requested") == ["cpu"] and not provider.get("fallback"):
        return chosen
    fallback = " (fallback)" if provider.get("fallback") else ""
    return f"{chosen}{fallback}: {provider.get('reason', '')}"


def model_rows(summary: dict) -> list[list[tuple[str, str, str]]]:
    """The (what, original, optimized) table every format shows, in three groups: format
    and interface; the op counts that changed, then all nodes; size and precision."""
    (old_nodes, new_nodes), (old_size, new_size) = summary["nodes"], summary["size_bytes"]
    interface = [("opset", summary["opsets"][0], summary["opsets"][1] or "-")]
    interface += [
        (f"{row['kind'].upper()} {row['name']}", row["before"], row["after"] or "-")
        for row in summary["io"]
    ]
    ops = [(row["op"], str(row["before"]), str(row["after"])) for row in summary["op_changes"]]
    ops.append(("nodes (all ops)", str(old_nodes), "-" if new_nodes is None else str(new_nodes)))
    size = [("size", size_text(old_size), size_text(new_size))]
    if summary["precision"] != "fp32":
        size.append(("precision", "fp32", summary["precision"]))
    return [interface, ops, size]


CANDIDATE_HEADER = ("candidate", "float", "accuracy", "drop/budget", "time", "verdict")
CANDIDATE_NOTE = (
    "* chosen. float: nodes the guard kept float. accuracy and drop on the decision data, "
    "against each tier's own budget. time: candidate / optimized fp32 time per run (< 1 is "
    "faster); the speed check compares the result with the original model."
)


def candidate_rows(report: dict) -> list[tuple[str, ...]]:
    """``--precision auto``'s measured candidates, one row each (``CANDIDATE_HEADER``, read
    with ``CANDIDATE_NOTE``)."""
    rows = []
    for row in (report.get("quantization") or {}).get("candidates") or []:
        accuracy = ", ".join(f"{k} {v:.4f}" for k, v in (row.get("accuracy") or {}).items())
        ratio, noise = row.get("latency_ratio"), row.get("noise")
        drop, budget = row.get("drop"), row.get("max_drop")
        rows.append(
            (
                row["precision"] + (" *" if row.get("chosen") else ""),
                "" if row.get("kept_float") is None else str(row["kept_float"]),
                accuracy,
                "" if drop is None or budget is None else f"{drop:.2g}/{budget:g}",
                "" if ratio is None else f"{ratio:.2f}x" + (f" ±{noise:.2f}" if noise else ""),
                row.get("verdict", ""),
            )
        )
    return rows


PASS_HEADER = ("pass", "check", "nodes", "matches", "ms")


def pass_rows(report: dict) -> list[tuple[str, ...]]:
    """The pass applications report.json lists (those that changed something or failed)."""
    return [
        (
            p["name"],
            p["verification"] + (f": {p['reason']}" if p.get("reason") else ""),
            f"{p['nodes_before']} -> {p['nodes_after']}",
            str(p["matches"]),
            f"{p['seconds'] * 1e3:.0f}",
        )
        for p in report.get("passes", [])
    ]


def summarize(report: dict) -> dict:
    """The ``summary`` section: what a person reads first, from the report's own fields."""
    before, after = report["input_model"], report.get("output_model")
    precision = (report.get("quantization") or {}).get("precision", "fp32")
    return {
        "input": before["path"],
        "output": after["path"] if after else None,
        "nodes": [before["nodes"], after["nodes"] if after else None],
        "size_bytes": [before["size_bytes"], after["size_bytes"] if after else None],
        "opsets": [opset_text(before), opset_text(after) if after else None],
        "op_changes": op_changes(before, after),
        "io": io_rows(before, after),
        "precision": precision,
        "checks": checks(report),
        "speed": speed(report),
        "provider": provider_words(report.get("provider")),
        "passes_applied": sum(
            1
            for p in report.get("passes", [])
            if p["modified"] and p["verification"] != "rolled_back"
        ),
        "rolled_back": sorted(report.get("rolled_back", {})),
        "warnings": len(report.get("warnings", [])),
    }
