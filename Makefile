# gristmill: `make demo` runs the whole pipeline on the built-in corpus; `make test` runs the tests.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# Models are trained from scratch or loaded from a path: never fetch from a hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false

# torch is pinned to 2.13.0, whose CPU wheel this project's machines keep on disk (pip finds it
# there first). Elsewhere, point TORCH_INDEX at PyTorch's CPU wheel index to avoid the
# multi-GB CUDA build, e.g. `make install TORCH_INDEX="--index-url <your cpu wheel index>"`.
TORCH_INDEX ?=

.PHONY: install demo test soak bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (gristmill needs Python 3.11)" >&2; exit 2; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_INDEX) "torch==2.13.0"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

demo: install
	$(BIN)/gristmill run data_specs/python_docs.yaml

# Two pytest-xdist workers, a test module to a worker, in the order tests/conftest.py gives them
# (it says why); TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The kill trials past the one round `make test` runs: three rounds give every stage each of its kill
# points (RELIABILITY.md); the trial table is printed and kept in kills.json.
soak: install
	GRISTMILL_KILL_TRIALS=51 GRISTMILL_KILL_REPORT=kills.json $(BIN)/python -m pytest -q -s tests/reliability/test_kill.py -k killed_run

# Each benchmark prints a ratio against a baseline measured in the same run (BENCHMARKS.md).
bench: install
	$(BIN)/python bench/dedup.py
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/pretrain.py
	$(BIN)/python bench/qa_rules.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/trl_speed.py
	$(BIN)/python bench/dpo_speed.py
	$(BIN)/python bench/rag_eval.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/lease.py
	$(BIN)/python bench/warm_start.py

clean:
	rm -rf .gristmill
