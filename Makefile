# Moat: every entry point a person or CI uses. Run as root on Debian 12.
# `make test` and `make demo` install what they need (tools/install-deps).

VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export VENV
PYTEST_ARGS ?=

.PHONY: help deps test test-fast lint format demo bench bench-esp bench-portal clean
.PHONY: payload image boot flash test-powercut-long test-ota-powercut-long

help:
	@echo "make demo       build a namespace network and show the tunnel working"
	@echo "make test       install dependencies and run every test"
	@echo "make test-fast  unit tests only (no namespaces, no QEMU)"
	@echo "make lint       ruff format check, ruff, mypy"
	@echo "make bench      throughput benchmarks, printed as ratios"
	@echo "make bench-portal  portal scale: start time, memory, registrations/s"
	@echo "make bench-esp  ESP core µs per packet beside bare crypto calls"
	@echo "make payload    freeze the moat program (PyInstaller onedir)"
	@echo "make image      build moat-x86_64.img (firmware/, board/)"
	@echo "make boot       boot the image under QEMU, serial console here"
	@echo "make flash DEVICE=/dev/sdX   write the image to a disk (asks first)"

deps:
	@tools/install-deps

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: deps
	$(PY) -m pytest -m "not netns and not qemu" $(PYTEST_ARGS)

lint: deps
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: deps
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-portal: deps
	$(PY) tools/bench_portal.py

clean:
	rm -rf build dist out .pytest_cache .mypy_cache .ruff_cache

# tunnel throughput: iperf3 through moat beside veth and OpenVPN, as ratios
BENCH_ARGS ?=
bench: deps
	$(PY) tools/bench_tunnel.py $(BENCH_ARGS)

# five namespaces (LAN client, moat, internet, portal, corporate host), fresh keys
demo: deps
	$(PY) tools/demo.py

# ESP core micro-benchmark: µs per seal/open beside a bare AEAD call, as ratios
BENCH_ESP_ARGS ?=
bench-esp: deps
	$(PY) tests/bench/bench_esp.py $(BENCH_ESP_ARGS)
# --- firmware image -------------------------------------------------------
IMAGE ?= moat-x86_64.img

payload: deps
	$(PY) -m firmware.payload

image: payload
	$(PY) -m firmware.image -o $(IMAGE)

boot:
	@test -f $(IMAGE) || $(MAKE) image
	qemu-system-x86_64 -machine pc -m 128 -nographic \
		-drive file=$(IMAGE),format=raw,if=virtio \
		-nic user,model=virtio-net-pci -nic user,model=virtio-net-pci

flash:
	@test -n "$(DEVICE)" || { echo "usage: make flash DEVICE=/dev/sdX"; exit 2; }
	@test -f $(IMAGE) || $(MAKE) image
	$(PY) -m firmware.flash $(IMAGE) $(DEVICE)

# 100 power cuts instead of the 12 `make test` does (about an hour)
test-powercut-long: deps
	MOAT_POWERCUTS=100 $(PY) -m pytest -m qemu -k power_cuts tests/test_firmware_qemu.py

# 100 power cuts during an OTA install on the image (10 in `make test`; hours
# under TCG on a shared 2-core host)
test-ota-powercut-long: deps
	MOAT_OTA_POWERCUTS=100 $(PY) -m pytest -m qemu -k power_cuts_during_install tests/test_ota_qemu.py
