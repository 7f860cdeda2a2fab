# The two commands of the README:
#   make report   set up the environment, reproduce every figure, build the book
#   make test     set up the environment, run the whole test suite
# Both are idempotent: the virtual environment, the MNIST cache and trained results are reused.

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
# Each test run uses one thread per process: outputs are compared bit for bit.
export OMP_NUM_THREADS ?= 1
# Debian's Chromium renders the book in tests/test_book.py and prints `make pdf`.
CHROMIUM ?= chromium
CHROMIUM_FLAGS := --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
                  --disable-component-update --disable-sync

.PHONY: setup data test report report-quick book pdf benchmark clean browser constraints

setup: $(STAMP)

# constraints.txt pins every package to the version the report's record was made with.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[report,test]'
	$(PY) -m ipykernel install --sys-prefix --name python3 > /dev/null
	rm -f $(VENV)/.installed-* && touch $@

data: setup
	$(PY) -m lowrank data mnist fashion-mnist

test: data browser
	$(PY) -m pytest tests --nbval notebooks --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

report: data
	$(PY) -m lowrank report --jobs 2

report-quick: data
	$(PY) -m lowrank report --quick

book: setup
	$(VENV)/bin/jb build -W -n --keep-going book/

# The whole book as one HTML page, printed by headless Chromium once MathJax has typeset it.
pdf: setup browser
	$(VENV)/bin/jb build --builder singlehtml book/
	mkdir -p book/_build/pdf
	profile=$$(mktemp -d) && $(CHROMIUM) $(CHROMIUM_FLAGS) --user-data-dir="$$profile" \
	  --no-pdf-header-footer --virtual-time-budget=30000 --print-to-pdf=book/_build/pdf/book.pdf \
	  "file://$(CURDIR)/book/_build/singlehtml/index.html" 2> /dev/null; rc=$$?; rm -rf "$$profile"; exit $$rc
	@test -s book/_build/pdf/book.pdf && echo "wrote book/_build/pdf/book.pdf"

benchmark: setup
	$(PY) -m lowrank benchmark

clean:
	rm -rf book/_build .pytest_cache

# After a deliberate upgrade of a dependency: pin the environment anew (then rerun `make report`).
constraints: setup
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^-e'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# Install Debian's chromium when it is missing and we are root (as in CI); otherwise say what to do.
browser:
	@if command -v $(CHROMIUM) > /dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
	  echo "installing Debian's chromium for the browser tests of the book"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium > /dev/null; \
	else \
	  echo "make: $(CHROMIUM) is not installed: run 'sudo apt-get install --no-install-recommends chromium'" \
	       "(tests/test_book.py skips its browser test and 'make pdf' fails without it)"; \
	fi
