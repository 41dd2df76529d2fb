# PRIC: set-up, tests and the end-to-end demo. Every target installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup web-setup test test-fast demo detector detector-wheel clean

setup: $(STAMP)

# torch is pinned and installed first: an unpinned torch pulls several GB of CUDA wheels.
$(STAMP): pyproject.toml package-lock.json
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all]'
	$(MAKE) web-setup
	touch $(STAMP)

# The participant's page (collector/webapp) runs onnxruntime-web from node_modules, pinned
# by package-lock.json; nothing is vendored or fetched at run time. Skipped without npm.
web-setup:
	@if command -v npm >/dev/null; then npm ci --ignore-scripts --no-audit --no-fund; \
	else echo "npm not found: the participant's web page stays off (the collector answers 503)"; fi

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow'

demo: $(STAMP)
	$(BIN)/python -m scripts.demo

# The face detector's weights ship inside the facenet-pytorch wheel: downloaded without its
# dependencies (they would pull another torch), read as a zip (never installed or imported),
# exported to ONNX; the same wheel gives the same files as the shipped ones.
detector: detector-wheel
	$(BIN)/python -m training.detector.export --wheel .cache/wheels/facenet_pytorch-2.6.0-py3-none-any.whl \
		--out exported_models/face-detector

# the wheel alone (the tests re-export from it and compare with the shipped files)
detector-wheel: $(STAMP)
	mkdir -p .cache/wheels
	$(BIN)/pip download -q --no-deps facenet-pytorch==2.6.0 -d .cache/wheels

clean:
	rm -rf $(VENV) .pytest_cache node_modules
