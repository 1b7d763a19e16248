# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-convex test lint unit docs bench clean chromium client mutate

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

# The local Convex backend's npm packages (Convex's own client and its JS test backend),
# from the lock file the wheel ships: installed next to server.mjs, so the checkout runs it
# in place; ./node_modules links to them for the tests' own Node scripts
CONVEX_SERVER := src/byod/convex_server
NODE_STAMP := $(CONVEX_SERVER)/node_modules/.installed
$(NODE_STAMP): $(CONVEX_SERVER)/package.json $(CONVEX_SERVER)/package-lock.json
	cd $(CONVEX_SERVER) && npm ci --no-audit --no-fund --ignore-scripts
	ln -sfn $(CONVEX_SERVER)/node_modules node_modules
	touch $(NODE_STAMP)

# The TypeScript client's packages (openapi-fetch; openapi-typescript and tsc to build and
# test it), from its own lock file
CLIENT := clients/typescript
CLIENT_STAMP := $(CLIENT)/node_modules/.installed
$(CLIENT_STAMP): $(CLIENT)/package.json $(CLIENT)/package-lock.json
	cd $(CLIENT) && npm ci --no-audit --no-fund
	touch $(CLIENT_STAMP)

demo: $(STAMP)  ## the main job on the embedded default (SQLite in this folder)
	$(BIN)/byod demo

demo-convex: $(STAMP) $(NODE_STAMP)  ## the demo on local Convex test deployments (needs Node 20)
	$(BIN)/byod demo --convex

lint: $(STAMP)
	$(BIN)/ruff check src tests bench docs/hooks
	$(BIN)/ruff format --check src tests bench docs/hooks
	$(BIN)/mypy
	$(BIN)/lint-imports

chromium:  ## Debian's Chromium for the dashboard's browser test (installed as root)
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "install Debian's chromium (apt-get install chromium) for the browser test"; }

# A second Convex app of the tests' own, with its own npm packages (convex-helpers)
ARENA := tests/convex_apps/arena
ARENA_STAMP := $(ARENA)/node_modules/.installed
$(ARENA_STAMP): $(ARENA)/package.json $(ARENA)/package-lock.json
	cd $(ARENA) && npm ci --no-audit --no-fund --ignore-scripts
	touch $(ARENA_STAMP)

unit: $(STAMP) $(NODE_STAMP) $(CLIENT_STAMP) $(ARENA_STAMP) chromium
	$(BIN)/pytest -n 2

test: lint unit  ## the whole suite: lint, types, tests against real databases

client: $(STAMP) $(CLIENT_STAMP)  ## after changing the HTTP API: its document and the client's types anew
	$(BIN)/python -m byod.api.document > $(CLIENT)/openapi.json
	cd $(CLIENT) && npm run --silent generate

mutate: $(STAMP)  ## mutation testing of the modules that hold byod's guarantees (slow; not in `make test`); SUITES="chain ledger" for some
	$(BIN)/python tests/mutation/run.py $(SUITES)

# Material's banner about MkDocs 2.0 is not a build warning; it would only hide real ones
export NO_MKDOCS_2_WARNING := true

docs: $(STAMP)  ## the documentation site, built offline into ./site (open site/index.html)
	$(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python bench/fleet.py

clean:
	rm -rf site $(VENV) node_modules $(CONVEX_SERVER)/node_modules $(CLIENT)/node_modules $(ARENA)/node_modules $(CLIENT)/dist byod.db byod.db-wal byod.db-shm byod.key byod-demo byod-convex-demo
