# Two commands on a fresh machine: `make serve` (the main job) and `make test`.
# Each does whatever set-up it still needs: OpenMPI, Slurm's client and Prometheus from Debian, a venv in .venv,
# the package, and DeepSpeed's compiled shared-memory op.
VENV     ?= .venv
PYTHON   ?= python3
PORT     ?= 8000
NPROC    ?= 2
TEST_WORKERS ?= 2
MODEL    ?= models/tiny
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BIN      := $(VENV)/bin

.PHONY: install serve test bench gpu-check gpu-wheels clean

$(BIN)/.installed: pyproject.toml
	@# slurm-client: the tests compare node-list parsing with Slurm's own `scontrol show hostnames`.
	@# prometheus: the tests scrape a real server with Prometheus and check configs and rules with promtool
	@# (the tests start their own prometheus; the package's service is not used).
	@command -v mpirun >/dev/null && command -v mpicc >/dev/null && command -v ip >/dev/null \
	  && command -v scontrol >/dev/null && command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  echo "installing OpenMPI, iproute2, Slurm's client and Prometheus from Debian packages"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    openmpi-bin libopenmpi-dev iproute2 slurm-client prometheus >/dev/null; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,bench]'
	# DeepSpeed's shared-memory all-reduce op: compiled now (about 40 s), not at the first `make serve`.
	$(BIN)/python -m dscluster.engine.parallel
	touch $@

install: $(BIN)/.installed

$(MODEL)/config.json: | $(BIN)/.installed
	$(BIN)/dscluster tiny-model $(MODEL)

serve: $(BIN)/.installed $(MODEL)/config.json
	$(BIN)/dscluster serve $(MODEL) --nproc $(NPROC) --port $(PORT)

# Two pytest-xdist workers, each taking a whole test file at a time (a module's server is started
# once), in file order: the e2e files, which mostly wait on the processes they start, go first.
# Measured on 2 cores: 7:00 with two workers, 11:46 in one process, 7:36 with three (more
# contention, and timing-bound tests get tight). TEST_WORKERS=0 runs everything in one process.
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 $(PYTEST_ARGS)

# The serving benchmark loads servers with wrk (a C load generator), from Debian.
bench: $(BIN)/.installed
	@command -v wrk >/dev/null || { echo "installing wrk from Debian packages"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python -m benchmarks.run

# The GPU path on this machine's NVIDIA GPUs (docs/gpu.md): one line and exit 0 where there is none.
# Offline: make gpu-check WHEELS=DIR, with DIR from `make gpu-wheels` on a machine with network.
gpu-check:
	@scripts/gpu-check.sh $(if $(WHEELS),--wheels $(WHEELS))

gpu-wheels:
	scripts/gpu-wheels.sh $(or $(WHEELS),wheels) $(GPU_PYTHON_VERSION)

clean:
	rm -rf $(VENV) .venv-gpu models
