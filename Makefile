# Two commands for newcomers: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default; a GPU machine overrides, e.g. make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_output
PYTEST_ARGS ?=
GENERATIVE_BUNDLES := mri_generative_diffusion ct_generative_diffusion

.PHONY: install demo demo-train test test-fast lint configs clean

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

# retrains the MRI, CT and breast demo models (what the shipped weights were made with), then samples and segments
demo-train: install
	$(PY) -m meddiff.cli.main demo --output_dir $(DEMO_DIR) --train

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check common tests bench
	$(PY) -m meddiff.cli.main format-json $(JSON_PATHS) --check

# JSON as the model zoo's pre-commit writes it (pretty-format-json --indent=4 --no-sort-keys); `make lint` checks it
JSON_PATHS ?= bundles common/configs
.PHONY: format-json
format-json: install
	$(PY) -m meddiff.cli.main format-json $(JSON_PATHS)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache bundles/*/outputs
	# trained files in bundles/*/models go; the shipped demo weights (tracked, un-ignored in .gitignore) stay
	git clean -q -fdX bundles/*/models

# MONAI Label server (README "MONAI Label server"). Its own venv: monailabel imports torchvision, and PyPI's
# torchvision does not import beside the CPU torch 2.13 wheel, so this venv takes a torch/torchvision pair
# that import together (a CUDA build; it runs on the CPU too) and monailabel with --no-deps plus what it
# imports (.ci/label_requirements.txt: no sam2). meddiff reaches the server inside the exported bundle.
LABEL_VENV ?= .venv-label
LABEL_PY := $(LABEL_VENV)/bin/python
LABEL_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
MONAILABEL_SPEC ?= monailabel==0.8.5
LABEL_HOME ?= build/label
LABEL_APP ?= $(LABEL_HOME)/app
LABEL_STUDIES ?= $(LABEL_HOME)/studies
LABEL_MODELS ?= breast_mri_segmentation
# common/label_app also hosts generation bundles: LABEL_APP_SRC=common/label_app LABEL_GENERATORS=mri_generative_diffusion
LABEL_APP_SRC ?= $(LABEL_VENV)/monailabel/sample-apps/monaibundle
LABEL_GENERATORS ?=
LABEL_CONF ?=
LABEL_HOST ?= 127.0.0.1
LABEL_PORT ?= 8000

.PHONY: label-venv label-app label-server

$(LABEL_VENV)/.installed: .ci/label_requirements.txt
	$(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_PY) -m pip install -q --upgrade pip
	$(LABEL_PY) -m pip install -q $(LABEL_TORCH_SPEC)
	$(LABEL_PY) -m pip install -q -r .ci/label_requirements.txt
	$(LABEL_PY) -m pip install -q --no-deps $(MONAILABEL_SPEC)
	$(LABEL_PY) -c "import monailabel.tasks.infer.bundle, monailabel.tasks.train.bundle, torchvision"
	touch $@

label-venv: $(LABEL_VENV)/.installed

# MONAI Label's monaibundle sample app (or LABEL_APP_SRC) with each bundle of LABEL_MODELS and LABEL_GENERATORS
# exported (meddiff inside) into its model/ folder, served from there with no zoo download; demo studies
# (breast phantoms, four labelled) unless LABEL_STUDIES exists.
# Kept between runs (the server trains into it): rm -rf $(LABEL_APP) to export the bundles again.
label-app: label-venv
	@if [ ! -d "$(LABEL_APP)" ]; then \
		set -e; rm -rf $(LABEL_APP).partial; mkdir -p $(LABEL_APP).partial/model; \
		cp -r $(LABEL_APP_SRC)/. $(LABEL_APP).partial/; \
		for m in $$(echo $(LABEL_MODELS),$(LABEL_GENERATORS) | tr ',' ' '); do \
			$(PY) -m meddiff.cli.main export bundles/$$m $(LABEL_APP).partial/model/$$m; done; \
		mv $(LABEL_APP).partial $(LABEL_APP); fi
	@if [ ! -d "$(LABEL_STUDIES)" ]; then \
		set -e; rm -rf $(LABEL_HOME)/phantoms; \
		$(PY) -m meddiff.cli.main breast-phantoms $(LABEL_HOME)/phantoms --num_cases 6 --num_test 2; \
		rm -rf $(LABEL_STUDIES).partial; mkdir -p $(LABEL_STUDIES).partial/labels/final; \
		cp $(LABEL_HOME)/phantoms/imagesTr/*.nii.gz $(LABEL_HOME)/phantoms/imagesTs/*.nii.gz $(LABEL_STUDIES).partial/; \
		cp $(LABEL_HOME)/phantoms/labelsTr/*.nii.gz $(LABEL_STUDIES).partial/labels/final/; \
		mv $(LABEL_STUDIES).partial $(LABEL_STUDIES); fi

label-server: install label-app
	$(LABEL_PY) -m monailabel.main start_server --app $(LABEL_APP) --studies $(LABEL_STUDIES) \
		--host $(LABEL_HOST) --port $(LABEL_PORT) \
		--conf models $(LABEL_MODELS) --conf zoo_source local --conf sam2 false --conf preload false \
		$(if $(LABEL_GENERATORS),--conf generators $(LABEL_GENERATORS)) $(LABEL_CONF)
