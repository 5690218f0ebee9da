# The README's two commands: `make bench` (the main job) and `make test`. Both build everything they need
# from a clean clone: a virtual environment in .venv with the pinned requirements, then the package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
INSTALL_STAMP := $(VENV)/.package-installed
PACKAGE_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)

.PHONY: install test test-slow bench clean

$(DEPS_STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade -r requirements-dev.txt
	touch $@

$(INSTALL_STAMP): $(DEPS_STAMP) $(PACKAGE_SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(INSTALL_STAMP)

# One worker per core (pytest-xdist); a test file stays on one worker, so its module fixtures run once.
test: $(INSTALL_STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile tests

test-slow: $(INSTALL_STAMP)
	$(PY) -m pytest -q -m slow tests

bench: $(INSTALL_STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info skyformer_ext/*.so
