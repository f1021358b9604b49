# Two commands:  make run  (set up, then the default training job)   make test  (set up, then the suite)
# make check: the quick tier of the suite (about a minute)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
NP      ?= 4
MPIEXEC := $(BIN)/mpiexec
STAMP   := $(VENV)/.installed

.PHONY: setup data run baseline test check bench clean

setup: $(STAMP) data

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[mpich,test,bench,tensorboard]'
	touch $(STAMP)

# Fashion-MNIST from the Debian package where apt is there; elsewhere mpi_sfl downloads and verifies it.
data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	fi

# mpiexec hands the ranks pipes, not the terminal: ask for the progress bar when make has one.
BAR := $(shell [ -t 2 ] && echo '--set run.progress="bar"')

# `make run` starts the default job afresh each time (--overwrite); `make run ARGS=--resume` continues an interrupted one.
START = $(if $(filter --resume,$(ARGS)),,--overwrite)

run: setup
	$(MPIEXEC) -n $(NP) $(BIN)/python -m mpi4py -m mpi_sfl train $(BAR) $(START) $(ARGS)

baseline: setup
	$(BIN)/mpi-sfl baseline --set run.out_dir=\"runs/baseline\" --overwrite $(ARGS)

test: setup
	$(BIN)/python -m pytest -q --durations=30 $(PYTEST_ARGS)

# The quick tier: the in-process tests and those marked quick (one real mpiexec job per variant).
check: setup
	$(BIN)/python -m pytest -q --durations=10 -m "quick or not mpi" $(PYTEST_ARGS)

# Every benchmark suite, quick settings (drop --quick for the real measurement): runs/bench/*.json
bench: setup
	$(BIN)/python -m benchmarks all --quick $(ARGS)

clean:
	rm -rf runs .pytest_cache
