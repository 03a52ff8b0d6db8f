# minisd: `make test`, `make demo`, `make notebooks`, `make lab`, `make site`. Each creates .venv on
# first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The PyTorch build the course is tested with; pip takes it first so the rest never pulls another.
# Override for other platforms, e.g. `make test TORCH="torch torchvision"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
BUILD := build/notebooks

.PHONY: test unit lint demo notebooks lab site format clean mutate bench

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "minisd needs Python >= 3.10 (3.11 recommended)"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## test: lint, unit tests, every notebook under strict nbval (the CI command), and the widgets in
# JupyterLab in headless Chromium (tests/browser; skipped, with a line saying how to enable them,
# when no Chromium is installed)
test: $(STAMP) lint
	$(BIN)/python -m pytest -q --nbval --nbval-current-env --nbval-cell-timeout=600 tests notebooks

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## demo: type a prompt, get digits: the shipped text-to-MNIST model, a few prompts, one picture
DEMO_OUT := build/demo.png
demo: $(STAMP)
	@mkdir -p build
	$(BIN)/python -m minisd generate "a handwritten seven" "the number 2" "zero" "someone wrote the number five by hand" \
		--n 8 --guidance 3 --steps 20 --sampler dpm++2m --seed 0 --out $(DEMO_OUT)
	@echo "The picture: $(DEMO_OUT)"

## notebooks: run the course headless and say where the executed notebooks are
notebooks: $(STAMP)
	@mkdir -p $(BUILD)
	$(BIN)/jupyter nbconvert --to notebook --execute --output-dir $(BUILD) $(NOTEBOOKS)
	@echo "Executed notebooks (open with 'make lab' or any Jupyter):"
	@for nb in $(NOTEBOOKS); do echo "  $(BUILD)/$$(basename $$nb)"; done

## lab: JupyterLab on the course notebooks
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

## site: the executed notebooks as a static HTML site (course map, one page per lesson)
SITE := build/site
site: $(STAMP)
	$(BIN)/python tools/course_site.py --out $(SITE) $(NOTEBOOKS)
	@echo "The course as a site: $(SITE)/index.html"

## bench: minisd beside diffusers at identical weights; writes bench/results.md and .json
# BENCH_ARGS picks groups and repeats, e.g. BENCH_ARGS="--only train-text --repeats 5" (or --quick).
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

## mutate: mutation testing of the core modules (slow, not in CI); writes data/results/mutation.md
# mutmut forks one process per mutant; MUTATE_JOBS of them run at once (1 suits a 2-core laptop).
# MUTATE_ARGS=--resume finishes an interrupted run; --report-only rewrites the results file.
MUTATE_JOBS ?= 1
MUTATE_ARGS ?=
mutate: $(STAMP)
	@$(BIN)/python mutation/run.py --check-tool || $(BIN)/python -m pip install --quiet -e '.[mutation]'
	nice -n 10 $(BIN)/python mutation/run.py --jobs $(MUTATE_JOBS) $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache mutants
