#!/usr/bin/env bash
# Builds a seed corpus for the fuzz targets with qemu-img and qemu-io: small images of
# every kind (v2, v3, extended L2, zlib and zstd compression, snapshots, a raw backing
# file, lazy refcounts left dirty, 1- and 64-bit refcounts), and from them the header
# clusters, snapshot tables, L2 tables, compressed payloads and bitmap directories the
# parser targets start from, and small migration streams laid out as savevm writes them. Usage: seeds.sh DIR (creates DIR/<target>/; nothing here is committed).
set -euo pipefail

out=${1:?usage: seeds.sh DIR}
mkdir -p "$out"/{image,header,snapshot_table,entries,decompress,vmstate,luks,bitmap_directory}
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

io() { qemu-io -f qcow2 "${@:2}" "$1" >/dev/null; }

# A raw backing file; the image target keeps one of the same name next to its input.
head -c 65536 /dev/urandom >base.raw

qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096 v2.qcow2 256K
io v2.qcow2 -c 'write -P 0x11 0 12k' -c 'write -P 0x22 100k 4k'

qemu-img create -q -f qcow2 -o cluster_size=4096 v3.qcow2 256K
io v3.qcow2 -c 'write -P 0x33 0 8k' -c 'write -z 64k 8k' -c 'write -P 0x44 200k 1k'

qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 small.qcow2 64K
io small.qcow2 -c 'write -P 0x55 0 2k' -c 'write -z 4k 1k'

qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=64 rc64.qcow2 128K
io rc64.qcow2 -c 'write -P 0x66 4k 8k'

qemu-img create -q -f qcow2 -o cluster_size=16384,extended_l2=on ext.qcow2 256K
io ext.qcow2 -c 'write -P 0x77 0 1k' -c 'write -z 16k 2k' -c 'write -P 0x78 33k 3k'

head -c 32768 /dev/urandom >data.raw
head -c 32768 /dev/zero | tr '\0' 'q' >>data.raw
qemu-img convert -q -c -O qcow2 -o cluster_size=4096 -f raw data.raw zlib.qcow2
qemu-img convert -q -c -O qcow2 -o cluster_size=4096,compression_type=zstd -f raw data.raw zstd.qcow2

qemu-img create -q -f qcow2 -o cluster_size=4096 snap.qcow2 128K
io snap.qcow2 -c 'write -P 0x81 0 8k'
qemu-img snapshot -c first snap.qcow2
io snap.qcow2 -c 'write -P 0x82 4k 8k'
qemu-img snapshot -c second snap.qcow2
io snap.qcow2 -c 'write -P 0x83 64k 4k'

qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.raw -F raw overlay.qcow2 64K
io overlay.qcow2 -c 'write -P 0x91 4k 4k'

qemu-img create -q -f qcow2 -o cluster_size=4096,lazy_refcounts=on dirty.qcow2 128K
# qemu-io aborts on purpose (leaving the dirty bit set); keep the shell's report quiet.
exec 3>&2 2>/dev/null
qemu-io -f qcow2 -c 'write -P 0xa1 0 8k' -c abort dirty.qcow2 >/dev/null || true
exec 2>&3 3>&-

be32() { od -An -tu4 --endian=big -j "$2" -N4 "$1" | tr -d ' '; }
be64() { od -An -tu8 --endian=big -j "$2" -N8 "$1" | tr -d ' '; }
slice() { dd if="$1" iflag=skip_bytes,count_bytes skip="$2" count="$3" status=none; }

for img in *.qcow2; do
    name=${img%.qcow2}
    cp "$img" "$out/image/$name"
    cs=$((1 << $(be32 "$img" 20)))
    head -c "$cs" "$img" >"$out/header/$name"
    # An L2 table (the first L1 entry's) with a byte for the cluster bits and one for
    # flags: extended L2 for ext, the zero flag for v3.
    l1=$(be64 "$img" 40)
    l2=$(( $(be64 "$img" "$l1") & 0x00fffffffffffe00 ))
    flags=2
    [ "$name" = ext ] && flags=3
    [ "$name" = v2 ] && flags=0
    { printf "\\x$(printf %02x $(( $(be32 "$img" 20) - 9 )))\\x0$flags"
      slice "$img" "$l2" "$cs"; } >"$out/entries/$name"
done

# Snapshot tables: two bytes of entry count, then the table.
nb=$(be32 snap.qcow2 60)
off=$(be64 snap.qcow2 64)
{ printf "\\x00\\x$(printf %02x "$nb")"; slice snap.qcow2 "$off" 4096; } \
    >"$out/snapshot_table/snap"

# Compressed payloads: a selector byte (bit 7 zstd, low bits cluster bits - 9), then data.
head -c 4096 data.raw >cluster
python3 - cluster "$out/decompress" <<'PY'
import sys, zlib
data = open(sys.argv[1], "rb").read()
c = zlib.compressobj(9, zlib.DEFLATED, -15)
open(sys.argv[2] + "/deflate", "wb").write(bytes([3]) + c.compress(data) + c.flush())
PY
zstd -q -c cluster | { printf '\x83'; cat; } >"$out/decompress/zstd"
head -c 4096 /dev/zero | zstd -q -c | { printf '\x83'; cat; } >"$out/decompress/zstd-zeros"

# Migration streams: header, configuration, the RAM section (block list, zero, fill and
# data pages, CONTINUE), a switchover-start command, device sections, EOF and the JSON
# device description; one i440fx stream and one q35 stream with configuration
# subsections and the x-ignore-shared block addresses.
python3 - "$out/vmstate" <<'PY'
import json, struct, sys
be16 = lambda v: struct.pack(">H", v)
be32 = lambda v: struct.pack(">I", v)
be64 = lambda v: struct.pack(">Q", v)
counted = lambda s: bytes([len(s)]) + s.encode()
PS = 4096

def stream(machine, subsections=b"", ignore_shared=False):
    blocks = [("pc.ram", 8 * PS), ("vga.vram", 2 * PS)]
    s = b"QEVM" + be32(3) + b"\x07" + be32(len(machine)) + machine.encode() + subsections
    s += b"\x01" + be32(1) + counted("ram") + be32(0) + be32(4)
    s += be64(sum(b[1] for b in blocks) | 0x04)
    for i, (name, size) in enumerate(blocks):
        s += counted(name) + be64(size) + (be64(0x10000000 * i) if ignore_shared else b"")
    s += be64(0x10) + b"\x7e" + be32(1)
    s += b"\x02" + be32(1)
    s += be64(0x08) + counted("pc.ram") + bytes([0x41]) * PS
    s += be64(PS | 0x08 | 0x20) + bytes([0x42]) * PS
    s += be64(2 * PS | 0x02 | 0x20) + b"\x00"
    s += be64(3 * PS | 0x02 | 0x20) + b"\xab"
    s += be64(0x02) + counted("vga.vram") + b"\x00"
    s += be64(0x10) + b"\x7e" + be32(1)
    s += b"\x08" + be16(11) + be16(0)
    s += b"\x03" + be32(1) + be64(0x10) + b"\x7e" + be32(1)
    devices = [("timer", 0, b"\x00" * 24), ("cpu", 0, b"\x7e" + be32(2) + b"\x01" * 40)]
    for i, (name, inst, body) in enumerate(devices):
        sid = 2 + i
        s += b"\x04" + be32(sid) + counted(name) + be32(inst) + be32(1) + body + b"\x7e" + be32(sid)
    desc = json.dumps({"page_size": PS,
                       "devices": [{"name": n, "instance_id": i} for n, i, _ in devices]})
    return s + b"\x00" + b"\x06" + be32(len(desc)) + desc.encode()

sub = lambda name: b"\x05" + counted(name) + be32(1)
open(sys.argv[1] + "/i440fx", "wb").write(stream("pc-i440fx-10.0"))
conf = (sub("configuration/target-page-bits") + be32(12)
        + sub("configuration/capabilities") + be32(1) + counted("x-ignore-shared")
        + sub("configuration/uuid") + bytes(range(16)))
open(sys.argv[1] + "/q35", "wb").write(stream("pc-q35-10.0", conf, ignore_shared=True))
PY
# LUKS areas (the luks target): QEMU's default cipher and two others, with the area cut
# from the image at the offset and length of its encryption extension.
for spec in "" ",encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=md5" \
        ",encrypt.cipher-alg=serpent-128,encrypt.cipher-mode=ctr,encrypt.hash-alg=sha512"; do
    n=$((${n:-0} + 1))
    qemu-img create -q -f qcow2 --object secret,id=s0,data=pw \
        -o "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10$spec" "luks$n.img" 1M
    python3 - "luks$n.img" "$out/luks/luks$n" <<'PY'
import struct, sys
b = open(sys.argv[1], "rb").read()
off = struct.unpack(">I", b[100:104])[0]
while True:
    kind, length = struct.unpack(">II", b[off:off + 8])
    if kind == 0x0537BE77:
        start, size = struct.unpack(">QQ", b[off + 8:off + 24])
        open(sys.argv[2], "wb").write(b[start:start + size])
        break
    if kind == 0:
        sys.exit("no encryption extension")
    off += 8 + (length + 7) // 8 * 8
PY
done

# Bitmap directories (the bitmap_directory target): two bytes of entry count, a byte of
# cluster bits - 9, the directory, then the words of the first bitmap's table.
qemu-img create -q -f qcow2 -o cluster_size=4096 bm.qcow2 1M
qemu-img bitmap --add bm.qcow2 first
qemu-img bitmap --add -g 512 --disable bm.qcow2 "a longer name"
io bm.qcow2 -c 'write -P 0xb1 0 64k'
python3 - bm.qcow2 "$out/bitmap_directory/two" <<'PY'
import struct, sys
b = open(sys.argv[1], "rb").read()
off = struct.unpack(">I", b[100:104])[0]
while True:
    kind, length = struct.unpack(">II", b[off:off + 8])
    if kind == 0x23852875:
        nb, _, size, start = struct.unpack(">IIQQ", b[off + 8:off + 32])
        table, tsize = struct.unpack(">QI", b[start:start + 12])
        seed = struct.pack(">H", nb) + bytes([3]) + b[start:start + size]
        open(sys.argv[2], "wb").write(seed + b[table:table + 8 * tsize])
        break
    if kind == 0:
        sys.exit("no bitmaps extension")
    off += 8 + (length + 7) // 8 * 8
PY

echo "seeds in $out: $(find "$out" -type f | wc -l) files"
