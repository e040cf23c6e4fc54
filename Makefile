# The two commands of the README: `make demo` (set up + main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ZOO := $(VENV)/bin/zoo
DATA ?= .data
SHARED_DATA ?= ../shared/data
export ZOO_DATA_DIR ?= $(abspath $(DATA))
DEMO_IMAGES ?= 3

.PHONY: install data demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	# olah (a Hugging Face hub mirror) serves the hub tests; its pins clash with concrete-ml's,
	# so it gets a virtualenv of its own.
	python3 -m venv .venv-olah
	.venv-olah/bin/pip install --quiet olah==0.5.4
	touch $@

# Real CIFAR in the official python layout. Here it is materialized from the offline copy in
# ../shared/data; elsewhere, unpack the official archives into $(DATA) instead.
data: $(DATA)/cifar-10-batches-py/.complete

$(DATA)/cifar-10-batches-py/.complete: | install
	$(PY) $(SHARED_DATA)/materialize_cifar.py $(DATA)

# The main job, end to end: pull the flagship's full build from the release store (releases/,
# verified against its pins) and measure it in FHE simulation on real test images; pull
# cifar10-split-tiny the same way, build it again (the same bytes), publish it to the local hub
# (into a scratch registry), pull it back from there (after emptying the cache), and classify
# real CIFAR-10 test images in real FHE.
demo: install data
	$(ZOO) pull cifar10-split-8bit
	$(ZOO) eval cifar10-split-8bit --fhe simulate -n 100
	$(ZOO) pull cifar10-split-tiny
	$(ZOO) build cifar10-split-tiny --profile smoke --out build-out/demo --resume
	cp registry.json build-out/demo-registry.json
	$(ZOO) publish build-out/demo --hub local --registry build-out/demo-registry.json
	$(ZOO) cache rm cifar10-split-tiny --registry build-out/demo-registry.json
	$(ZOO) pull cifar10-split-tiny --registry build-out/demo-registry.json
	$(ZOO) eval cifar10-split-tiny --fhe execute -n $(DEMO_IMAGES) --registry build-out/demo-registry.json

# The modules that run concrete keygen and FHE get a process each (concrete keeps native state
# per process). pytest exits 5 when it collected no test: that is a failure here. CI=1: the
# tests that would skip without olah or Ray (both installed by `make install`) fail instead.
HEAVY := tests/test_package.py tests/test_build.py tests/test_recipes.py tests/test_eval.py \
	tests/test_serve.py tests/test_wheel.py tests/test_interfaces.py tests/test_cost.py
test: install data
	$(PY) -m ruff check zoo recipes tests benchmarks
	$(PY) -m ruff format --check zoo recipes tests benchmarks
	@for args in "$(foreach f,$(HEAVY),--ignore=$(f))" $(HEAVY); do \
	  echo "pytest $$args"; CI=1 $(PY) -m pytest -q -p no:cacheprovider $$args; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest ran no test ($$args)"; exit 1; fi; \
	  if [ $$rc -ne 0 ]; then exit $$rc; fi; \
	done

lint: install
	$(PY) -m ruff check zoo recipes tests benchmarks
	$(PY) -m ruff format --check zoo recipes tests benchmarks

bench: install data
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/bench_pull.py
	$(PY) benchmarks/bench_simulate.py --build-missing
	$(PY) benchmarks/tradeoff.py

clean:
	rm -rf build-out .pytest_cache .ruff_cache
