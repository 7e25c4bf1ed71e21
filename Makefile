# Two commands for newcomers: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default; a GPU machine overrides, e.g. make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_output
PYTEST_ARGS ?=
GENERATIVE_BUNDLES := mri_generative_diffusion ct_generative_diffusion

.PHONY: install demo test test-fast lint configs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"

configs:
	@for b in $(GENERATIVE_BUNDLES); do cp common/configs/generative/*.json bundles/$$b/configs/; done

demo: install
	$(PY) -m meddiff.cli.main demo --output_dir $(DEMO_DIR)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check common tests bench

clean:
	rm -rf $(DEMO_DIR) .pytest_cache bundles/*/models bundles/*/outputs
