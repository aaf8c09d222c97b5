# `make test` and `make demo` are all the set-up a fresh machine needs: they create .venv and install
# the project with torch pinned by constraints.txt (the CPU wheel), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,notebooks,models]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff over everything; mypy --strict over what is typed so far (the planner, the runtime and their helpers)
TYPED := invfx/planner.py invfx/tolerances.py invfx/units.py invfx/runtime/ invfx/passes/infra.py invfx/passes/chain.py \
         invfx/passes/segment_run.py
lint: $(STAMP)
	$(BIN)/ruff check invfx tests benchmarks
	$(BIN)/mypy $(TYPED)

# the suite without the tests marked slow (a quicker loop while working; CI runs them all)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m invfx demo

# `make bench`: every benchmark whose table is in the README, at its size, tables collected in
# benchmarks/results/README_tables.md. The revlib and memcnn columns need
#   pip install -c constraints.txt --no-deps revlib==1.7.2 memcnn==1.5.2 numpy
# (skipped with a note without them); the torch.compile column: inductor needs a C compiler, else aot_eager.
bench: $(STAMP)
	$(BIN)/python benchmarks/suite.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
