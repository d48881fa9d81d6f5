# keyd — `make demo` and `make test` do all set-up on a fresh Debian 12 box (as root).
SHELL := /bin/bash
PY_SYS ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_FLAGS ?=
# The VM tier runs one lab guest per pytest-xdist worker, a guest per core (TCG keeps one busy):
# two on a machine with two cores or more, one on a single core. `make vm VM_WORKERS=1` for one.
VM_WORKERS ?= $(shell [ "$$(nproc)" -ge 2 ] && echo 2 || echo 1)
# Test files go to the workers whole, so one lab boot serves all the tests of a file.
VM_PYTEST = $(PY) -m pytest tests/vm -n $(VM_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_FLAGS)

.PHONY: all deps apt venv bytecode unit host vm test lint deb demo lab clean
all: test

deps: apt venv

# Installs only what is missing, so a second run costs a dpkg query. Empty apt lists
# (a fresh box) also trigger an update: the lab resolves its kernel through apt.
apt:
	@command -v $(PY_SYS) >/dev/null || { apt-get update -qq && apt-get install -y -qq python3; }
	@# The lab's OpenZFS (zfsutils-linux, zfs-dkms) lives in Debian's contrib: enable it once, in its own file.
	@added="$$($(PY_SYS) -m keyd_lab.apt_sources)" && if [ -n "$$added" ]; then echo "apt: enabled contrib in $$added"; apt-get update -qq; fi
	@apt-cache policy linux-image-amd64 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update -qq
	@pkgs="$$($(PY_SYS) -m keyd_lab.programs --apt)"; \
	missing=$$(for p in $$pkgs; do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# The Debian package's Build-Depends (debian/control), declared there only.
	@dpkg-checkbuilddeps 2>/dev/null || { echo "apt: installing debian/control's Build-Depends"; \
	  DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq --no-install-recommends ./ >/dev/null; }

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@$(MAKE) --no-print-directory apt
	$(PY_SYS) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev,fuse]'
	touch $@

unit: deps
	$(PY) -m pytest tests/unit $(PYTEST_FLAGS)

# As root on this machine, no VM: FUSE mounts and loop devices (the userspace crypt backend).
host: deps
	$(PY) -m pytest tests/host $(PYTEST_FLAGS)

# Guests import keyd from this tree over 9p: compiled once here, Python under TCG
# does not recompile every module on every start (~25 % of keyd's start-up CPU).
bytecode: deps
	@$(PY) -m compileall -q keyd

# The VM tier installs the Debian package in the lab (tests/vm/test_debian_package.py). The lab's
# kernel, initramfs and OpenZFS are built (or found in the cache) once, before the workers start.
vm: bytecode deb
	$(VENV)/bin/keyd-lab build
	$(VM_PYTEST)

# The gates first (seconds), then the unit tests (fast feedback), the host tier (this kernel's
# FUSE and loop devices, seconds), the Debian package (its unit tests against Debian's
# libraries), then the real-kernel tier in the lab.
test: lint bytecode
	@# What the lab cache lacks (on a fresh machine: the kernel and OpenZFS, minutes) is built in
	@# the background meanwhile; the build before the VM tier waits for it (a lock) and reports.
	@mkdir -p build && { $(VENV)/bin/keyd-lab build >build/lab-build.log 2>&1 & }
	$(PY) -m pytest tests/unit $(PYTEST_FLAGS)
	$(PY) -m pytest tests/host $(PYTEST_FLAGS)
	$(MAKE) --no-print-directory deb
	$(VENV)/bin/keyd-lab build
	$(VM_PYTEST)

lint: deps
	$(VENV)/bin/ruff check keyd keyd_lab tests benchmarks
	$(VENV)/bin/mypy --strict keyd keyd_lab tests benchmarks

# keyd_<version>_all.deb in build/deb/, built from a copy of the tree (tracked and untracked
# files, as git sees them) with Debian's tools; its unit tests run against Debian's python3-*.
DEB_DIR := build/deb
deb: deps
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp -P --parents -t $(DEB_DIR)/src
	@# Debian's own python3 and tools only: no venv, no other Python earlier on PATH.
	cd $(DEB_DIR)/src && env -u VIRTUAL_ENV -u PYTHONPATH PATH=/usr/sbin:/usr/bin:/sbin:/bin \
	  dpkg-buildpackage --build=binary --no-sign -rfakeroot
	lintian --fail-on error $(DEB_DIR)/keyd_*_all.deb

lab: deps
	$(VENV)/bin/keyd-lab build

demo: bytecode
	$(VENV)/bin/keyd-lab demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
