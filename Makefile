# Two commands set everything up on a fresh Debian machine:
#   make run    boot the default guest, its shell on this terminal
#   make test   run the test suite (builds the guest images first)
PYTHON ?= python3
IMAGES ?= images
MICROVMM = $(PYTHON) -m microvmm

.PHONY: setup images run test bench clean

setup:
	@./scripts/setup-host

images: setup
	@$(PYTHON) guest/build_images.py --out $(IMAGES)

run: images
	$(MICROVMM) run --kernel $(IMAGES)/vmlinux --initrd $(IMAGES)/initramfs.cpio

test: images
	$(PYTHON) -m pytest -q -ra tests

bench: images
	$(PYTHON) bench/run_all.py

clean:
	rm -rf $(IMAGES) build .pytest_cache
