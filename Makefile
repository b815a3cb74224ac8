# nodemesh — build, set up, test, demo.
#
# `make setup` is idempotent: it installs only what is missing (Debian packages, the venv,
# the project in the venv, the compiled BPF objects) and is a no-op when everything is there.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := clang llvm libbpf-dev bpftool iproute2 curl wrk nginx-light iptables \
	nghttp2-client procps python3-venv chromium chromium-driver tcpdump etcd-server etcd-client \
	containerd runc containernetworking-plugins busybox-static
BPF_SOURCES := $(wildcard bpf/*.bpf.c)
BPF_HEADERS := $(wildcard bpf/lib/*.h)
BPF_OBJECTS := $(patsubst bpf/%.bpf.c,build/bpf/%.bpf.o,$(BPF_SOURCES))
BPF_CFLAGS := -O2 -g -target bpf -mcpu=v3 -Wall -Werror -I/usr/include/x86_64-linux-gnu -Ibpf

.PHONY: setup apt venv bpf test test-unit test-integration demo lint bench bench-quick clean fuzz etcd-protos

setup: apt venv bpf

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

bpf: $(BPF_OBJECTS)

build/bpf/%.bpf.o: bpf/%.bpf.c $(BPF_HEADERS)
	@mkdir -p build/bpf
	clang $(BPF_CFLAGS) -c $< -o $@

# Suites that run a second time with the cluster on etcd (NODEMESH_TEST_STORE=etcd: etcd
# members of its own on the underlay): services, policy, routes, observe, and leases/slices.
ETCD_SUITES = tests/integration/test_services.py tests/integration/test_routes.py \
	tests/integration/test_l7_policy.py tests/integration/test_netpol.py \
	tests/integration/test_observe_flows.py tests/integration/test_slices_and_leases.py

# Two workers (pytest-xdist), each taking whole modules (their clusters are module fixtures, and
# independent: each has its own name, namespaces, state and bpffs). Modules marked `serial`
# (timing figures, load they must carry) run alone afterwards.
PARALLEL = -n 2 --dist loadfile

test: setup
	$(VENV)/bin/ruff check nodemesh tests
	$(VENV)/bin/lint-imports --no-cache
	@# all three passes run even when one fails; the first failure's exit code is make's
	rc=0; \
	$(PY) -m pytest $(PARALLEL) -m "not serial" tests || rc=$$?; \
	$(PY) -m pytest -m serial tests || { r=$$?; [ $$rc -ne 0 ] || rc=$$r; }; \
	NODEMESH_TEST_STORE=etcd $(PY) -m pytest $(PARALLEL) $(ETCD_SUITES) \
	  || { r=$$?; [ $$rc -ne 0 ] || rc=$$r; }; \
	exit $$rc

# The fuzz suite (tests/fuzz) with 1,000,000 cases in total instead of make test's 10,000
# (docs/reliability.md, "Fuzzing"), its properties spread over 2 workers.
fuzz: setup
	NODEMESH_FUZZ_EXAMPLES=1000000 $(PY) -m pytest -q -p no:cacheprovider --timeout=0 \
	  -n 2 --dist load --hypothesis-show-statistics tests/fuzz

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

demo: setup
	$(VENV)/bin/nodemesh demo

lint: setup
	$(VENV)/bin/ruff check nodemesh tests
	$(VENV)/bin/lint-imports --no-cache

bench: setup
	$(VENV)/bin/nodemesh bench

bench-quick: setup
	$(VENV)/bin/nodemesh bench --quick

clean:
	rm -rf build

# etcd's gRPC API for nodemesh/store/etcd.py: protoc's Python for the checked-in protos
# (nodemesh/store/etcdrpc/README.md), from the grpcio-tools that goes with the pinned protobuf,
# in a throwaway venv: grpcio-tools is no runtime dependency.
etcd-protos:
	rm -rf build/protoc-venv && $(PYTHON) -m venv build/protoc-venv
	build/protoc-venv/bin/pip install -q grpcio-tools==1.85.4 protobuf==7.36.2
	build/protoc-venv/bin/python -m grpc_tools.protoc -I . --python_out=. \
	  nodemesh/store/etcdrpc/auth.proto nodemesh/store/etcdrpc/kv.proto nodemesh/store/etcdrpc/rpc.proto
	rm -rf build/protoc-venv

# The Gateway API mesh conformance suite on a fresh 2-node cluster; writes
# docs/conformance/report.yaml (docs/conformance/README.md).
.PHONY: conformance
conformance: setup
	$(PY) -m nodemesh.conformance
