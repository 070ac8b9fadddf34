# blockfs: `make demo` and `make test` install what is missing first (Debian packages, .venv),
# and do nothing more when everything is there.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev \
	qemu-utils qemu-system-common qemu-block-extra qemu-system-x86 fio sshfs \
	openssh-server openssh-client glusterfs-server glusterfs-client libgfapi0 libvhdi-utils \
	e2fsprogs util-linux iproute2 busybox-static cpio kmod xz-utils zstd bzip2

#: tests run in two processes (pytest-xdist): most of them wait on daemons, FUSE and fio, and
#: the suite takes about half the time of one process on two cores (7:15 against 14:05)
TEST_WORKERS ?= 2

.PHONY: setup apt venv demo demo-vm test bench lint clean

setup: apt venv

apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	@touch $@

demo: setup
	bash examples/demo.sh

demo-vm: setup
	bash examples/vm.sh qcow2

test: setup
	$(VENV)/bin/python -m pytest -q -ra -n $(TEST_WORKERS) $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python -m benchmarks $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check blockfs tests

clean:
	rm -rf $(VENV) .pytest_cache .cache
