# The two commands of the README: `make demo` and `make test`. Each creates or updates .venv.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.geostore-installed
DEMO := demo

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: the CPU build on local disk (a later resolve would pull a multi-GB CUDA build)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

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

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache *.egg-info
