# qcow2fs: build, test, demo, install.
PREFIX  ?= /usr/local
DESTDIR ?=
BINDIR  ?= $(PREFIX)/bin
# mount(8) looks for mount helpers in /sbin only.
SBINDIR ?= /sbin
MANDIR  ?= $(PREFIX)/share/man
CARGO   ?= cargo
# Where cargo puts what it builds: CARGO_TARGET_DIR or build.target-dir when set, else
# target/ (asked of cargo, so every way of setting it is honoured).
TARGET_DIR ?= $(or $(shell $(CARGO) metadata --format-version 1 --no-deps 2>/dev/null | \
	sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'),target)
BIN = $(TARGET_DIR)/release/qcow2fs

.PHONY: all build release test lint man demo install uninstall bench bench-remote fuzz clean

all: release

build:
	$(CARGO) build

release:
	$(CARGO) build --release

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# Every test: formatting, lints, unit tests and the integration tests, which build their
# images with qemu-img in temporary directories and mount real FUSE filesystems.
test: lint
	$(CARGO) test --no-fail-fast
	cd fuzz && $(CARGO) clippy --no-default-features --bins -- -D warnings

# The option sections of the man pages, between their BEGIN and END markers, are generated
# from the option table (src/cli/options/table.rs); `make man` regenerates them after the
# table changes, and tests/docs.rs fails while they differ.
MAN_PAGES = man/qcow2fs.1 man/mount.qcow2fs.8

man:
	$(CARGO) build --quiet
	set -e; for p in $(MAN_PAGES); do \
		$(CARGO) run --quiet -- gen-man $$p > $$p.new; mv $$p.new $$p; \
	done

# Needs root and FUSE; works in $(TARGET_DIR)/demo.
demo: release
	bash scripts/demo.sh $(BIN) $(TARGET_DIR)/demo

# qcow2fs against qemu-storage-daemon's FUSE export, side by side, and the memory rebuilt
# from a snapshot's VM state (benches/vmstate.sh) (needs root; writes benches/RESULTS.md;
# BENCH_QUICK=1 for a smoke run), then the engine micro-benchmarks.
bench:
	bash benches/run.sh
	QCOW2FS=$(TARGET_DIR)/release/qcow2fs bash benches/live_snapshot.sh
	$(CARGO) bench --bench engine

# Fuzzing: each target in fuzz/fuzz_targets runs for FUZZ_SECONDS from a seed corpus that
# fuzz/seeds.sh makes with qemu-img (in fuzz/corpus, not committed); crashes land in
# fuzz/artifacts/TARGET/. Installs cargo-fuzz when missing. cargo-fuzz passes nightly-only
# flags (-Zsanitizer, -Cpasses=sancov-module); RUSTC_BOOTSTRAP=1 lets the stable toolchain
# take them. `-s none` skips AddressSanitizer: qcow2fs has no unsafe parsing code, and
# overflow checks and debug assertions stay on (fuzz/Cargo.toml).
# Reproduce a crash: RUSTC_BOOTSTRAP=1 cargo fuzz run -s none -O TARGET ARTIFACT (in fuzz/).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= header snapshot_table entries decompress image vmstate luks bitmap_directory
FUZZ = cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz

# Remote images over local HTTP and S3 (moto), beside QEMU's curl driver (needs root;
# writes benches/REMOTE.md; BENCH_SIZE=256M for a shorter run).
bench-remote:
	bash benches/remote.sh

fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	$(FUZZ) build -s none -O
	rm -rf fuzz/corpus/seeds && bash fuzz/seeds.sh fuzz/corpus/seeds
	set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t; \
		($(FUZZ) run -s none -O $$t corpus/$$t corpus/seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048); \
	done

install: release
	install -D -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/qcow2fs
	install -d $(DESTDIR)$(SBINDIR)
	ln -sf $(abspath $(BINDIR))/qcow2fs $(DESTDIR)$(SBINDIR)/mount.qcow2fs
	ln -sf $(abspath $(BINDIR))/qcow2fs $(DESTDIR)$(SBINDIR)/mount.fuse.qcow2fs
	ln -sf $(abspath $(BINDIR))/qcow2fs $(DESTDIR)$(SBINDIR)/umount.fuse.qcow2fs
	install -D -m 0644 man/qcow2fs.1 $(DESTDIR)$(MANDIR)/man1/qcow2fs.1
	install -D -m 0644 man/mount.qcow2fs.8 $(DESTDIR)$(MANDIR)/man8/mount.qcow2fs.8

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/qcow2fs $(DESTDIR)$(SBINDIR)/mount.qcow2fs \
		$(DESTDIR)$(SBINDIR)/mount.fuse.qcow2fs $(DESTDIR)$(SBINDIR)/umount.fuse.qcow2fs
	rm -f $(DESTDIR)$(MANDIR)/man1/qcow2fs.1 $(DESTDIR)$(MANDIR)/man8/mount.qcow2fs.8

clean:
	$(CARGO) clean
