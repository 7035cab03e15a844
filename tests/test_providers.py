"""Provider resolution: parsing, failure classification, resolution rules, TensorRT options,
node placement, and the CLI end to end.

The end-to-end tests use the real onnxruntime-gpu wheel. On a CPU-only machine it lists CUDA
and TensorRT as available but cannot run them; those tests check that the CLI says so. Where
a GPU really works, the CPU-only expectations are skipped and the ``cuda`` / ``tensorrt``
marked tests run instead; nothing GPU-side is ever faked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline import providers as P
from pipeline.runtime.errors import EXIT_BAD_INPUT, UserError
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, 4] x) => (float[batch, 4] y) {
  c = Constant<value = float[4] {1.0, 2.0, 3.0, 4.0}>()
  a = Add(x, c)
  m = Mul(a, a)
  y = Relu(m)
}
"""

# Verbatim stderr of onnxruntime-gpu 1.31.1 asked for CUDA / TensorRT on a machine without
# the CUDA 13 libraries (ANSI colours included, as ORT writes them).
CUDA_LOG = (
    "\x1b[1;31m2026-11-23 15:31:58.518115909 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 "
    "operator()] /onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 "
    "onnxruntime::Provider& onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL :"
    " Failed to load library /x/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: "
    "libcublasLt.so.13: cannot open shared object file: No such file or directory\n\x1b[m\n"
    "\x1b[0;93m2026-11-23 15:31:58.518215807 [W:onnxruntime:Default, "
    "onnxruntime_pybind_state.cc:1295 CreateExecutionProviderFactoryInstance] Failed to create "
    "CUDAExecutionProvider. Require cuDNN 9.* and CUDA 13.*. Please install all dependencies\n"
)
TRT_LOG = (
    "[E:onnxruntime:Default, provider_bridge_ort.cc:2430 operator()] Failed to load library "
    "/x/libonnxruntime_providers_tensorrt.so with error: libcublas.so.13: cannot open shared "
    "object file: No such file or directory\n*************** EP Error ***************\n"
    "EP Error ... Please install TensorRT libraries as mentioned in the GPU requirements page\n"
)


def gpu_provider_works(name: str) -> bool:
    return P.probe(name).ok


def has_nvidia_driver() -> bool:
    return shutil.which("nvidia-smi") is not None


cpu_only = pytest.mark.skipif(
    has_nvidia_driver(), reason="expects a machine without an NVIDIA GPU (nvidia-smi found)"
)


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(onnx.parser.parse_model(MODEL), path)
    return path


# ----------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("cpu", ("cpu",)),
        ("CUDA", ("cuda",)),
        ("auto", ("tensorrt", "cuda", "cpu")),
        ("tensorrt, cuda ,cpu", ("tensorrt", "cuda", "cpu")),
        ("trt,cpu", ("tensorrt", "cpu")),
    ],
)
def test_provider_list_parses(text: str, names: tuple[str, ...]) -> None:
    assert P.parse_provider_list(text) == names


@pytest.mark.parametrize("text", ["", "rocm", "cuda,cuda", "auto,cpu", "cpu,,x"])
def test_bad_provider_list_is_user_error(text: str) -> None:
    with pytest.raises(UserError):
        P.parse_provider_list(text)


def test_provider_options_normalize_and_reject() -> None:
    parsed = P.parse_provider_options(
        ["trt_fp16_enable=1", "cudnn_conv_algo_search=heuristic", "device_id=0", "io_binding=on"]
    )
    assert parsed == {
        "trt_fp16_enable": "True",
        "cudnn_conv_algo_search": "HEURISTIC",
        "device_id": "0",
        "io_binding": "True",
    }
    for bad in ["nokey", "trt_fp16_enable=maybe", "cudnn_conv_algo_search=FAST", "device_id=-1"]:
        with pytest.raises(UserError):
            P.parse_provider_options([bad])
    with pytest.raises(UserError, match="unknown key 'trt_fp61_enable'"):
        P.parse_provider_options(["trt_fp61_enable=1"])


def test_options_are_routed_to_the_provider_that_takes_them() -> None:
    options = {"device_id": "1", "trt_fp16_enable": "True", "use_tf32": "False", "io_binding": "1"}
    assert P.options_for("cuda", options) == {"device_id": "1", "use_tf32": "False"}
    assert P.options_for("tensorrt", options) == {"device_id": "1", "trt_fp16_enable": "True"}
    assert P.options_for("cpu", options) == {}


# ----------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("log", "error", "provider", "kind", "words"),
    [
        (CUDA_LOG, "", "cuda", "missing_library", ["libcublasLt.so.13", "cuDNN 9.* and CUDA 13.*"]),
        (TRT_LOG, "", "tensorrt", "missing_library", ["libcublas.so.13"]),
        (
            "EP Error Please install TensorRT libraries as mentioned in the GPU requirements",
            "",
            "tensorrt",
            "missing_library",
            ["libnvinfer"],
        ),
        (
            "Failed to load library libonnxruntime_providers_cuda.so with error: libcuda.so.1: "
            "cannot open shared object file: No such file or directory",
            "",
            "cuda",
            "no_device",
            ["no NVIDIA driver"],
        ),
        (
            "CUDA failure 100: no CUDA-capable device is detected ; GPU=0",
            "",
            "cuda",
            "no_device",
            ["no CUDA-capable GPU"],
        ),
        (
            "CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version",
            "",
            "cuda",
            "version_mismatch",
            ["driver is too old"],
        ),
        (
            "Failed to load library libonnxruntime_providers_cuda.so with error: "
            "libcudnn.so.9: undefined symbol: cudnnGetVersion_v9",
            "",
            "cuda",
            "version_mismatch",
            ["undefined symbol"],
        ),
        ("", "", "cuda", "unknown", ["fell back to CPU"]),
    ],
)
def test_failures_are_classified(
    log: str, error: str, provider: str, kind: str, words: list[str], monkeypatch
) -> None:
    monkeypatch.setattr(P, "find_other_versions", lambda soname: [])
    got_kind, reason = P.classify_failure(log, error, True, provider)
    assert got_kind == kind, reason
    for word in words:
        assert word in reason


def test_missing_library_with_other_version_installed_is_a_mismatch(monkeypatch) -> None:
    monkeypatch.setattr(P, "find_other_versions", lambda soname: ["libcublasLt.so.12"])
    kind, reason = P.classify_failure(CUDA_LOG, "", True, "cuda")
    assert kind == "version_mismatch"
    assert "needs libcublasLt.so.13, but only libcublasLt.so.12 is installed" in reason


def test_provider_missing_from_build() -> None:
    kind, reason = P.classify_failure("", "", False, "cuda")
    assert kind == "not_in_build" and "CUDAExecutionProvider" in reason


# ----------------------------------------------------------------------- resolution rules


def fake_prober(working: set[str]):
    calls = []

    def prober(name: str, options: dict[str, str]) -> P.Probe:
        calls.append((name, options))
        if name in working:
            return P.Probe(name, True, "ok", f"{name} works")
        return P.Probe(name, False, "missing_library", f"{name} lacks libfoo.so.1")

    prober.calls = calls
    return prober


def test_single_provider_that_fails_is_exit_2_with_reason() -> None:
    with pytest.raises(P.ProviderUnavailable) as info:
        P.resolve(P.ProviderRequest("cuda"), fake_prober({"cpu"}))
    assert info.value.exit_code == EXIT_BAD_INPUT
    assert "cuda lacks libfoo.so.1" in str(info.value)
    assert "--allow-fallback" in str(info.value)
    assert info.value.to_dict()["probes"][0]["kind"] == "missing_library"


def test_allow_fallback_runs_on_cpu_and_says_why() -> None:
    res = P.resolve(P.ProviderRequest("cuda", allow_fallback=True), fake_prober({"cpu"}))
    assert (res.resolved, res.fallback) == ("cpu", True)
    assert res.reason.startswith("fell back to cpu") and "cuda lacks libfoo.so.1" in res.reason
    assert res.session_providers() == ["CPUExecutionProvider"]


def test_auto_picks_the_first_that_works_and_says_why() -> None:
    res = P.resolve(P.ProviderRequest("auto"), fake_prober({"cuda", "cpu"}))
    assert (res.resolved, res.fallback) == ("cuda", False)
    assert "tensorrt lacks libfoo.so.1" in res.reason and res.reason.startswith("auto")
    assert [p.provider for p in res.probes] == ["tensorrt", "cuda"]
    assert res.session_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_ordered_list_skips_broken_providers_without_allow_fallback() -> None:
    res = P.resolve(P.ProviderRequest("tensorrt,cuda,cpu"), fake_prober({"cpu"}))
    assert res.resolved == "cpu" and res.fallback is True
    assert "skipped tensorrt" in res.reason and "cuda lacks" in res.reason
    with pytest.raises(P.ProviderUnavailable):
        P.resolve(P.ProviderRequest("tensorrt,cuda"), fake_prober({"cpu"}))


def test_options_reach_session_and_unused_ones_are_noted() -> None:
    request = P.ProviderRequest(
        "tensorrt",
        options={"trt_fp16_enable": "True", "cudnn_conv_algo_search": "HEURISTIC"},
    )
    prober = fake_prober({"tensorrt"})
    res = P.resolve(request, prober)
    assert prober.calls == [("tensorrt", {"trt_fp16_enable": "True"})]
    assert res.session_providers() == [
        ("TensorrtExecutionProvider", {"trt_fp16_enable": "True"}),
        ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}),
        "CPUExecutionProvider",
    ]
    request = P.ProviderRequest("cuda", True, options={"trt_fp16_enable": "True"})
    res = P.resolve(request, fake_prober({"cpu"}))
    assert any("trt_fp16_enable ignored" in note for note in res.notes)


def test_tensorrt_always_gets_the_portable_graph() -> None:
    assert P.target_for("tensorrt", "cpu")[0] == "portable"
    assert P.target_for("tensorrt", "cuda")[0] == "portable"
    assert P.target_for("tensorrt", "portable") == ("portable", "")
    assert P.target_for("cuda", "cpu")[0] == "cuda"
    assert P.target_for("cpu", "cpu") == ("cpu", "")


# ----------------------------------------------------------------------- TensorRT options


def test_profile_shapes_from_input_specs() -> None:
    sets = [
        {"ids": np.zeros((2, 8)), "mask": np.zeros((2, 8)), "img": np.zeros((1, 3))},
        {"ids": np.zeros((3, 13)), "mask": np.zeros((3, 13)), "img": np.zeros((1, 3))},
    ]
    dynamic = {"ids": [True, True], "mask": [True, True], "img": [False, False]}
    assert P.profile_shapes(sets, dynamic) == {
        "trt_profile_min_shapes": "ids:1x1,mask:1x1",
        "trt_profile_opt_shapes": "ids:2x8,mask:2x8",
        "trt_profile_max_shapes": "ids:3x13,mask:3x13",
    }
    assert P.profile_shapes(sets, {"img": [False, False]}) == {}


def _trt_resolution(options: dict[str, str], cache_dir: Path) -> P.Resolution:
    probe = P.Probe(
        "tensorrt", True, "ok", "", libraries={"libnvinfer.so.10": "/lib/libnvinfer.so.10.9.0"}
    )
    return P.Resolution(
        requested=["tensorrt"],
        mode="list",
        resolved="tensorrt",
        fallback=False,
        reason="",
        allow_fallback=False,
        probes=[probe],
        options={"TensorrtExecutionProvider": dict(options)} if options else {},
        harness_options={"cache_dir": str(cache_dir)},
        gpu_name="NVIDIA H100 80GB HBM3",
    )


def test_tensorrt_caches_are_keyed_by_model_version_and_gpu(tmp_path: Path) -> None:
    res = _trt_resolution({"trt_max_workspace_size": "1024"}, tmp_path)
    sets = [{"x": np.zeros((2, 4))}, {"x": np.zeros((3, 4))}]
    P.finalize_tensorrt(res, "ab" * 32, sets, {"x": [True, False]})
    opts = res.options["TensorrtExecutionProvider"]
    cache = tmp_path / "tensorrt" / ("ab" * 8 + "-trt10.9.0-NVIDIA-H100-80GB-HBM3")
    assert opts["trt_engine_cache_path"] == str(cache) and cache.is_dir()
    assert opts["trt_timing_cache_path"] == str(cache)
    assert opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_max_workspace_size"] == "1024"  # the user's value wins
    assert opts["trt_profile_max_shapes"] == "x:3x4"
    other = _trt_resolution({}, tmp_path)
    other.gpu_name = "NVIDIA A10"
    P.finalize_tensorrt(other, "ab" * 32, sets, {"x": [True, False]})
    assert other.options["TensorrtExecutionProvider"]["trt_engine_cache_path"] != str(cache)


def test_int8_calibration_table_is_copied_into_the_cache(tmp_path: Path) -> None:
    table = tmp_path / "calib.flatbuffers"
    table.write_bytes(b"table")
    res = _trt_resolution(
        {"trt_int8_enable": "True", "trt_int8_calibration_table_name": str(table)},
        tmp_path / "c",
    )
    P.finalize_tensorrt(res, "cd" * 32, [{"x": np.zeros((1, 4))}], {"x": [False, False]})
    opts = res.options["TensorrtExecutionProvider"]
    assert opts["trt_int8_calibration_table_name"] == "calib.flatbuffers"
    assert (Path(opts["trt_engine_cache_path"]) / "calib.flatbuffers").read_bytes() == b"table"
    assert "trt_profile_min_shapes" not in opts  # static input: no profile
    bare = _trt_resolution({"trt_int8_enable": "True"}, tmp_path / "d")
    P.finalize_tensorrt(bare, "cd" * 32, [{"x": np.zeros((1, 4))}], {})
    assert any("calibration table" in note for note in bare.notes)


# ----------------------------------------------------------------------- placement


def test_summarize_profile_counts_nodes_and_op_types_per_provider() -> None:
    def node(name: str, op: str, provider: str) -> dict:
        return {"cat": "Node", "name": name, "args": {"op_name": op, "provider": provider}}

    events = [
        {"cat": "Session", "name": "model_run"},
        node("a_kernel_time", "MatMul", "CUDAExecutionProvider"),
        node("a_fence_before", "MatMul", "CUDAExecutionProvider"),
        node("b_kernel_time", "MatMul", "CUDAExecutionProvider"),
        node("s_kernel_time", "Shape", "CPUExecutionProvider"),
        node("t_kernel_time", "TRTKernel_graph_main_123_0", "TensorrtExecutionProvider"),
    ]
    summary = P.summarize_profile(events)
    assert summary["nodes"] == 4
    assert summary["by_provider"]["CUDAExecutionProvider"] == {
        "nodes": 2,
        "share": 0.5,
        "op_types": {"MatMul": 2},
    }
    assert summary["by_provider"]["CPUExecutionProvider"]["op_types"] == {"Shape": 1}
    assert summary["by_provider"]["TensorrtExecutionProvider"]["op_types"] == {"TRTKernel": 1}


def test_node_placement_from_a_real_profile(model_path: Path) -> None:
    feeds = {"x": np.ones((2, 4), np.float32)}
    placement = P.node_placement(
        str(model_path), ["CPUExecutionProvider"], feeds, optimization="disable_all"
    )
    assert placement["nodes"] == 3  # Constant is folded into an initializer at load
    cpu = placement["by_provider"]["CPUExecutionProvider"]
    assert cpu["op_types"] == {"Add": 1, "Mul": 1, "Relu": 1} and cpu["share"] == 1.0


# ----------------------------------------------------------------------- real probes


def test_cpu_probe_works() -> None:
    assert P.probe("cpu").ok


@cpu_only
@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_gpu_probe_on_a_cpu_machine_names_the_reason(name: str) -> None:
    import onnxruntime as ort

    result = P.probe(name)
    assert not result.ok
    if P.PROVIDERS[name].ort_name in ort.get_available_providers():
        assert result.kind in ("missing_library", "no_device", "version_mismatch"), result
        assert ".so" in result.reason or "GPU" in result.reason
    else:
        assert result.kind == "not_in_build"


# ----------------------------------------------------------------------- CLI end to end


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


@cpu_only
@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_cli_gpu_provider_without_gpu_exits_2(name: str, model_path: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    proc = run_cli(model_path, "-o", out, "--report", report, "--provider", name)
    assert proc.returncode == 2, proc.stderr
    assert f"--provider {name} cannot run here" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    data = _report(report)
    assert data["status"] == "error" and data["provider"]["resolved"] is None
    assert data["provider"]["probes"][0]["ok"] is False


@cpu_only
@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_cli_allow_fallback_runs_on_cpu_and_reports_it(
    name: str, model_path: Path, tmp_path: Path
) -> None:
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    proc = run_cli(
        model_path, "-o", out, "--report", report, "--provider", name, "--allow-fallback"
    )
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    provider = _report(report)["provider"]
    assert provider["resolved"] == "cpu" and provider["fallback"] is True
    assert provider["reason"].startswith("fell back to cpu") and name in provider["reason"]
    assert provider["session_providers"] == ["CPUExecutionProvider"]
    assert any("fell back to cpu" in w for w in _report(report)["warnings"])


@cpu_only
def test_cli_auto_picks_cpu_and_says_why(model_path: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    proc = run_cli(model_path, "-o", out, "--report", report, "--provider", "auto")
    assert proc.returncode == 0, proc.stderr
    provider = _report(report)["provider"]
    assert provider["mode"] == "auto" and provider["resolved"] == "cpu"
    assert provider["fallback"] is False
    assert provider["reason"].startswith("auto (tensorrt > cuda > cpu) picked cpu")
    assert "skipped tensorrt:" in provider["reason"] and "; cuda:" in provider["reason"]
    assert [p["provider"] for p in provider["probes"]] == ["tensorrt", "cuda", "cpu"]


def test_cli_rejects_bad_provider_and_options(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    proc = run_cli(model_path, "-o", out, "--provider", "rocm")
    assert proc.returncode == 2 and "--provider expects" in proc.stderr
    proc = run_cli(model_path, "-o", out, "--provider-option", "trt_fp61_enable=1")
    assert proc.returncode == 2 and "unknown key 'trt_fp61_enable'" in proc.stderr
    proc = run_cli(model_path, "-o", out, "--provider", "tensorrt", "--target", "cpu")
    assert proc.returncode == 2 and "portable graph" in proc.stderr


def test_cli_cpu_provider_report_section(model_path: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    proc = run_cli(model_path, "-o", out, "--report", report, "--no-speed-check")
    assert proc.returncode == 0, proc.stderr
    provider = _report(report)["provider"]
    assert provider["requested"] == ["cpu"] and provider["resolved"] == "cpu"
    assert provider["check"] == {"ran": False}  # verified on CPU already
    assert [p["provider"] for p in provider["probes"]] == ["cpu"]


# ----------------------------------------------------------------------- GPU (skipped here)


@pytest.mark.cuda
def test_cli_cuda_runs_on_cuda_with_parity_and_placement(model_path: Path, tmp_path: Path) -> None:
    if not gpu_provider_works("cuda"):
        pytest.skip(f"CUDA provider does not work here: {P.probe('cuda').reason}")
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    proc = run_cli(model_path, "-o", out, "--report", report, "--provider", "cuda")
    assert proc.returncode == 0, proc.stderr
    provider = _report(report)["provider"]
    assert provider["resolved"] == "cuda" and provider["fallback"] is False
    assert provider["check"]["ran"] and provider["check"]["passed"]
    assert provider["placement"]["by_provider"]["CUDAExecutionProvider"]["nodes"] >= 1
    assert _report(report)["recipe"]["target"] == "cuda"


@pytest.mark.tensorrt
def test_cli_tensorrt_uses_portable_graph_and_cache(model_path: Path, tmp_path: Path) -> None:
    if not gpu_provider_works("tensorrt"):
        pytest.skip(f"TensorRT provider does not work here: {P.probe('tensorrt').reason}")
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    proc = run_cli(
        model_path,
        "-o",
        out,
        "--report",
        report,
        "--provider",
        "tensorrt",
        "--provider-option",
        f"cache_dir={tmp_path / 'cache'}",
    )
    assert proc.returncode == 0, proc.stderr
    data = _report(report)
    provider = data["provider"]
    assert provider["resolved"] == "tensorrt" and data["recipe"]["target"] == "portable"
    opts = provider["options"]["TensorrtExecutionProvider"]
    assert opts["trt_engine_cache_path"].startswith(str(tmp_path / "cache" / "tensorrt"))
    assert opts["trt_profile_min_shapes"] == "x:1x4"
    assert provider["check"]["passed"]
    assert "TensorrtExecutionProvider" in provider["placement"]["by_provider"]
