# lazyfast — the two commands of the README:
#   make demo   the main job: the paper's experiments (quick presets) with figures
#   make test   everything CI checks: Python tests, C++ unit tests, CUDA compile check, CUDA link check,
#               the package check (sdist -> wheel -> fresh venv) and the quick benchmark
# Both do their own setup on a fresh machine (venv, torch==2.13.0, build without isolation).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lazyfast-deps
DEPS   := torch==2.13.0 "setuptools>=77" wheel build ninja numpy scipy tqdm matplotlib scikit-learn \
          pytest pytest-benchmark hypothesis expecttest \
          torchvision==0.28.0 timm==1.0.31 transformers==5.25.0
OUT    ?= out/demo

.PHONY: venv build demo test test-python native-test cuda-link-check package-check bench-quick bench clean

venv: $(STAMP)

# Re-checked when this Makefile (the dependency list) changes.
$(STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(DEPS)
	touch $@

# Editable install, compiled against the venv's torch (never with build isolation).
build: $(STAMP)
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m lazyfast.cli info

# The main job: quick presets of the paper's cover, tau-sweep and rates experiments, with figures.
demo: build
	$(PY) -m lazyfast.cli reproduce demo --out $(OUT)

test-python: build
	$(PY) -m pytest -q tests

native-test:
	cmake -S . -B build-native -DCMAKE_BUILD_TYPE=Release > build-native.log 2>&1 || (cat build-native.log; exit 1)
	cmake --build build-native -j2
	ctest --test-dir build-native --output-on-failure

cuda-link-check:
	bash scripts/cuda_link_check.sh

# sdist -> wheel built from the extracted sdist -> non-editable install in a fresh venv -> smoke test.
package-check: $(STAMP)
	bash scripts/package_check.sh $(PY)

# lazyfast vs its pure-PyTorch baselines at small sizes; fails if any implementation disagrees.
bench-quick: build
	mkdir -p out
	$(PY) -m lazyfast.cli bench --quick --json out/bench-quick.json --markdown out/bench-quick.md

test: test-python native-test cuda-link-check package-check bench-quick

# The full-size benchmark table (minutes, several GB), and the pytest-benchmark suites.
bench: build
	$(PY) -m lazyfast.cli bench --json benchmarks/results/bench-cpu.json --markdown benchmarks/results/bench-cpu.md
	$(PY) -m pytest benchmarks -q --benchmark-columns=min,median,mean,rounds

clean:
	rm -rf build build-native build-cuda build-native.log lazyfast/_C*.so lazyfast/_build_config.py *.egg-info dist
