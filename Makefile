# stargaze — developer and CI entry points. `make help` lists the targets.
# CI runs `bash .ci/run`, which runs `make test` as root with no stdin.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo

.DEFAULT_GOAL := help
.PHONY: help deps build test test-systemd lint fmt demo fuzz bench soak install uninstall

help:
	@echo "make deps    install missing Debian packages and cargo-nextest (as root)"
	@echo "make build   debug build of everything, release build of the binaries"
	@echo "make test    deps, then rustfmt check, clippy, and all tests (what CI runs)"
	@echo "make test-systemd  the units on a real systemd: a booted Debian node (nspawn), restarts and kills under load (as root)"
	@echo "make lint    rustfmt check and clippy"
	@echo "make fmt     format all Rust code"
	@echo "make demo    run a container from a lazily pulled image next to a full pull (as root)"
	@echo "make fuzz    run the fuzz targets for a bounded time (scripts/fuzz.sh)"
	@echo "make bench   run the benchmarks (bench/run.sh)"
	@echo "make soak    10,000 random reads through a hostile network proxy (HOSTILE_READS), 20 kill -9 of the fetcher (CRASH_KILLS), 1,000 reads per phase of a dying mirror (MIRROR_READS), 100 containers from 20 lazy images at once through kills (LOAD_CONTAINERS, LOAD_IMAGES)"
	@echo "make install     release build, then binaries, systemd units and config (PREFIX, DESTDIR)"
	@echo "make uninstall   remove what install put in place (keeps an edited config and all state)"

deps:
	@echo "== deps: checking system packages and tools"
	@bash scripts/deps.sh

build:
	@echo "== build: debug, all targets"
	$(CARGO) build --workspace --all-targets
	@echo "== build: release binaries"
	$(CARGO) build --release --workspace --bins

test: deps
	@echo "== test: rustfmt check"
	$(CARGO) fmt --all -- --check
	@echo "== test: clippy"
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@p=/sys/module/fuse/parameters/enable_uring; \
	if [[ -w $$p && $$(cat $$p) != Y ]]; then \
		echo "== test: FUSE over io_uring on for the io_uring transport's tests ($$p = Y until reboot; echo N > $$p undoes it)"; \
		echo Y > $$p; \
	fi
	@echo "== test: cargo nextest"
	$(CARGO) nextest run --workspace --no-fail-fast

# A Debian bookworm node booted with systemd-nspawn, stargaze installed with
# `make install`, containers reading lazily through restarts and kills of
# every unit (tests/systemd/run.sh). STARGAZE_BINARIES=DIR skips the build.
test-systemd:
	@bash tests/systemd/run.sh

lint:
	@echo "== lint: rustfmt check"
	$(CARGO) fmt --all -- --check
	@echo "== lint: clippy"
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

demo:
	@bash scripts/demo.sh

fuzz:
	bash scripts/fuzz.sh

bench:
	bash bench/run.sh

# The hostile-network, crash, mirror and load tests of `make test`, run long.
soak: deps
	HOSTILE_READS=$${HOSTILE_READS:-10000} $(CARGO) nextest run -p stargaze-fetcher --test hostile_network --no-capture
	CRASH_KILLS=$${CRASH_KILLS:-20} $(CARGO) nextest run -p stargaze-fetcher --test crash_restart --no-capture
	MIRROR_READS=$${MIRROR_READS:-1000} $(CARGO) nextest run -p stargaze-fetcher --test mirror_failover --no-capture
	LOAD_CONTAINERS=$${LOAD_CONTAINERS:-100} LOAD_IMAGES=$${LOAD_IMAGES:-20} $(CARGO) nextest run -p stargaze-snapshotter --test load --no-capture

# PREFIX, DESTDIR, BINDIR, UNITDIR, SYSCONFDIR pass through the environment
# (scripts/install.sh documents them). STARGAZE_BINARIES=DIR installs already
# built binaries from DIR instead of building release ones.
install:
	@if [[ -z "$${STARGAZE_BINARIES:-}" ]]; then $(CARGO) build --release --workspace --bins; fi
	@bash scripts/install.sh install

uninstall:
	@bash scripts/install.sh uninstall
