# Two commands set everything up on a fresh Debian machine:
#   make run    boot the default guest, its shell on this terminal
#   make test   run the test suite (builds the guest images first): the host
#               suite, then the real-KVM lane; fails if either fails
#   make test-kvm  the whole real-KVM lane alone (scripts/test-kvm); make test
#               runs its quick selection (MICROVMM_LANE=quick)
PYTHON ?= python3
IMAGES ?= images
MICROVMM = $(PYTHON) -m microvmm

.PHONY: setup images run test test-host test-kvm bench clean

setup:
	@./scripts/setup-host

images: setup
	@$(PYTHON) guest/build_images.py --out $(IMAGES)

run: images
	$(MICROVMM) run --kernel $(IMAGES)/vmlinux --initrd $(IMAGES)/initramfs.cpio

# Both lanes run even when the first fails; make test fails if either does.
test: images
	@status=0; \
	$(MAKE) --no-print-directory test-host || status=$$?; \
	MICROVMM_LANE=quick $(MAKE) --no-print-directory test-kvm || status=$$?; \
	exit $$status

test-host: images
	$(PYTHON) -m pytest -q -ra tests

# KVM unit tests and end-to-end modules on a real-semantics KVM (hardware KVM
# here, else kvm_amd in an L1 under QEMU TCG: scripts/realkvm).
test-kvm: images
	PYTHON=$(PYTHON) ./scripts/test-kvm

# The benchmarks, then the boot benchmark in the real-KVM lane (realkvm_*
# figures) unless /dev/kvm here is hardware KVM (bench/README.md).
bench: images
	$(PYTHON) bench/run_all.py

clean:
	rm -rf $(IMAGES) build .pytest_cache
