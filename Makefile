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

#: mount(8) looks for its helpers in /sbin only (/sbin:/sbin/fs.d:/sbin/fs, not /usr/local/sbin)
SBIN ?= /sbin
MOUNT_HELPERS := mount.fuse.blockfs umount.fuse.blockfs

.PHONY: setup apt venv demo demo-vm test bench lint clean mount-helper

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

# `mount -t fuse.blockfs` and /etc/fstab lines: link this checkout's helpers into /sbin (never
# replacing another file there). The tests link them themselves while they run.
mount-helper: venv
	@for h in $(MOUNT_HELPERS); do \
	  if [ -L $(SBIN)/$$h ] || [ -e $(SBIN)/$$h ]; then \
	    [ "$$(readlink -f $(SBIN)/$$h)" = "$$(readlink -f $(VENV)/bin/$$h)" ] || \
	      echo "$(SBIN)/$$h is there already (not this checkout's): left alone"; \
	  else \
	    ln -s $(abspath $(VENV))/bin/$$h $(SBIN)/$$h && echo "linked $(SBIN)/$$h"; \
	  fi; \
	done

lint: setup
	$(VENV)/bin/ruff check blockfs tests

clean:
	@for h in $(MOUNT_HELPERS); do \
	  [ "$$(readlink $(SBIN)/$$h)" = "$(abspath $(VENV))/bin/$$h" ] && rm -f $(SBIN)/$$h; done; true
	rm -rf $(VENV) .pytest_cache .cache
