# The README's quick start: `make run` starts the gateway, `make test` runs the whole test suite.
# Both install what a fresh machine lacks: cmake (Pingora builds zlib-ng with it) and, for the
# tests, a Python virtualenv with the real google-genai and openai SDKs.

CONFIG ?= conf/keygate.yaml
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTHON ?= python3

.PHONY: run test lint deps test-deps check-config bench bench-deps

run: deps
	cargo run --release -- --config $(CONFIG)

test: deps test-deps .venv/.installed
	KEYGATE_PYTHON=$(CURDIR)/.venv/bin/python cargo test --all-targets
	$(MAKE) --no-print-directory check-config

# The example config must always pass the binary's own check (with made-up keys).
check-config:
	GEMINI_API_KEYS=made-up-key-1,made-up-key-2:made-up-project cargo run --quiet -- --config conf/keygate.yaml --check
	GEMINI_FLASH_KEYS=made-up-key-3:p3 KEYGATE_TOKEN_ALICE=made-up-token KEYGATE_ADMIN_TOKEN=made-up-admin-token-0123 \
		cargo run --quiet -- --config conf/team.yaml --check

lint: deps
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

# The load benchmark (BENCHMARKS.md): direct upstream vs nginx vs a minimal Pingora proxy vs
# keygate, side by side.
bench: deps bench-deps
	cargo build --release --bins --examples
	cargo bench --bench load

bench-deps:
	@command -v nginx >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nginx-light; }
	@command -v oha >/dev/null 2>&1 || cargo install oha --locked --version 1.16.0

# The metrics test checks keygate's /metrics with Prometheus' own linter, promtool; the fleet
# tests start their own redis-server (Debian's package, with redis-cli) on a free port; the
# dashboard's browser test drives Debian's chromium through chromium-driver (WebDriver).
test-deps:
	@command -v promtool >/dev/null 2>&1 || { \
		echo "promtool is missing (the metrics test runs it); installing Debian's prometheus package"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "redis-server is missing (the fleet tests run it); installing Debian's redis-server package"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends redis-server; }
	@{ [ -x /usr/bin/chromium ] && command -v chromedriver >/dev/null 2>&1; } || { \
		echo "chromium or chromedriver is missing (the dashboard's browser test drives them); installing Debian's packages"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

deps:
	@command -v cmake >/dev/null 2>&1 || { \
		echo "cmake is missing (Pingora needs it to build); installing it with apt-get"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq cmake; }

.venv/.installed: tests/sdk/requirements.txt
	$(PYTHON) -m venv .venv
	.venv/bin/pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
	touch $@
