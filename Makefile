# The two commands of the README: `make demo` and `make test`. Each creates or updates .venv (the newest
# TransformerLens). `make test-compat` runs the same suite against TransformerLens 3.9 in .venv-tl3.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.geostore-installed
DEMO := demo

VENV_TL3 := .venv-tl3
STAMP_TL3 := $(VENV_TL3)/.geostore-installed

.PHONY: demo test test-compat lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: the CPU build on local disk (a later resolve would pull a multi-GB CUDA build)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# The oldest TransformerLens geostore supports (3.9: HookedTransformer and TransformerBridge), same install order.
$(STAMP_TL3): pyproject.toml
	test -x $(VENV_TL3)/bin/python || $(PYTHON) -m venv $(VENV_TL3)
	$(VENV_TL3)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_TL3)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV_TL3)/bin/python -m pip install --quiet -e ".[test]" "transformer-lens==3.9.*"
	touch $(STAMP_TL3)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/geostore train $(DEMO)/run
	$(BIN)/geostore ingest $(DEMO)/run $(DEMO)/store.zarr
	$(BIN)/geostore info $(DEMO)/store.zarr
	@echo
	@echo "Next: open the viewer on a machine with a display:  $(BIN)/geoview $(DEMO)/store.zarr"
	@echo "      or explore in Python:  import geostore; s = geostore.open_store('$(DEMO)/store.zarr')"

lint: $(STAMP)
	$(BIN)/ruff check .

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: lint
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test-compat: $(STAMP_TL3)
	$(VENV_TL3)/bin/ruff check .
	QT_QPA_PLATFORM=offscreen $(VENV_TL3)/bin/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) $(VENV_TL3) $(DEMO) .pytest_cache .ruff_cache *.egg-info
