# Two commands on a fresh clone: `make demo` (the main job) and `make test` (the suite).
# Each sets up its own environment first.
PYTHON ?= python3.11
PORT      ?= 8500
REST_PORT ?= 8501
# Test processes (pytest-xdist, whole files per process, the files with slow tests handed out first: see
# tests/conftest.py). Two suit a 2-core machine: most tests spend their time in one Python thread (tracing
# graphs, starting servers), so a second process halves the wall time.
TEST_WORKERS ?= 2
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast lint serve loadtest bench lock clean

setup: $(STAMP)

# uv installs the pinned packages (downloads in parallel, byte-compiles on both cores: about half of pip's time
# on a fresh machine, the same versions); pip is the fallback, and reads the machine's pip.conf.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip -c constraints.txt uv
	$(PY) -m uv pip install -q --python $(PY) --compile-bytecode -c constraints.txt -e '.[dev,loadtest]' \
	  || { echo "uv could not install the packages (it reads no pip.conf: set UV_INDEX_URL for a mirror); pip installs them"; \
	       $(PY) -m pip install -q -c constraints.txt -e '.[dev,loadtest]'; }
	touch $(STAMP)

demo: setup
	$(PY) -m carclf.demo

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow and not browser"

lint: setup
	$(VENV)/bin/ruff check carclf train serving ensemble clients loadtest tests

# TensorFlow threads inside one op, for make serve, make bench and the server make loadtest starts when none runs: the cores shared out among
# serving/batching.config's num_batch_threads (2), so the batches that run side by side fill the cores without
# contending for them: 1 on a 2-core machine, where it served 19-29 % more photos/s at concurrency 8 at the
# same single-photo latency (MobileNetV2), and ran EfficientNetB0/B3 34-76 % faster with two callers at equal
# or lower latency; Xception gained 9-14 % but one photo took 1.4-1.5x as long (docs/PERFORMANCE.md,
# "2026-12-05 (08:30-09:26)"). TF_INTRA_OP=0 restores TensorFlow's default: every core for each op.
TF_INTRA_OP ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 3 ? n / 2 : 1 )))

# Serves what model_repository/ holds (models.config generated from it) plus the ensemble of $(ENSEMBLE)
# (after `make demo`: make serve ENSEMBLE=runs/demo/serving/car_ensemble/config.pbtxt).
ENSEMBLE ?= ensemble/car_ensemble/config.pbtxt
REPOSITORY ?= model_repository
serve: setup
	mkdir -p runs/serving
	$(VENV)/bin/carclf serving-config --repository $(REPOSITORY) --output runs/serving/models.config
	$(VENV)/bin/carclf serve --model_config_file runs/serving/models.config --model_repository $(REPOSITORY) \
	  --port $(PORT) --rest_api_port $(REST_PORT) --ensemble_config_file $(ENSEMBLE) \
	  --enable_batching --batching_parameters_file serving/batching.config --batching_early_dispatch \
	  --monitoring_config_file serving/monitoring.config --enable_grpc_healthcheck_service \
	  --tensorflow_intra_op_parallelism $(TF_INTRA_OP)

# ARGS go to the runner, e.g. make loadtest ARGS="--target-model demo_mobilenet_v2 --users 4"; PORT and
# REST_PORT (as given to make serve) say where the server is
loadtest: setup
	$(PY) -m carclf.loadtest.run --host http://127.0.0.1:$(REST_PORT) --grpc-host 127.0.0.1:$(PORT) \
	  --tensorflow-intra-op-parallelism $(TF_INTRA_OP) $(ARGS)

# ARGS go to carclf bench, e.g. make bench ARGS="--model mobilenet_v2_224x448 --quick --out reports/bench_quick"
bench: setup
	$(VENV)/bin/carclf bench --tensorflow-intra-op-parallelism $(TF_INTRA_OP) $(ARGS)

lock:
	$(PY) -m pip freeze --exclude-editable > constraints.txt

clean:
	rm -rf runs reports model_repository .pytest_cache
