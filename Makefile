# qcow2fs: build, test, demo, install.
PREFIX  ?= /usr/local
DESTDIR ?=
BINDIR  ?= $(PREFIX)/bin
# mount(8) looks for mount helpers in /sbin only.
SBINDIR ?= /sbin
MANDIR  ?= $(PREFIX)/share/man
CARGO   ?= cargo

.PHONY: all build release test lint demo install uninstall bench fuzz clean

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

demo: release
	bash scripts/demo.sh target/release/qcow2fs

install: release
	install -D -m 0755 target/release/qcow2fs $(DESTDIR)$(BINDIR)/qcow2fs
	install -d $(DESTDIR)$(SBINDIR)
	ln -sf $(abspath $(BINDIR))/qcow2fs $(DESTDIR)$(SBINDIR)/mount.qcow2fs
	install -D -m 0644 man/qcow2fs.1 $(DESTDIR)$(MANDIR)/man1/qcow2fs.1
	install -D -m 0644 man/mount.qcow2fs.8 $(DESTDIR)$(MANDIR)/man8/mount.qcow2fs.8

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/qcow2fs $(DESTDIR)$(SBINDIR)/mount.qcow2fs
	rm -f $(DESTDIR)$(MANDIR)/man1/qcow2fs.1 $(DESTDIR)$(MANDIR)/man8/mount.qcow2fs.8

clean:
	$(CARGO) clean
