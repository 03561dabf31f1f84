#!/bin/bash
# Seed corpus for the image_meta fuzz target: small qcow2 images made by QEMU's own tools
# (512-byte and 4 KiB clusters, refcount widths 1 and 16, v2 and v3, an internal snapshot,
# compressed clusters, lazy refcounts), each behind the target's 8 steering bytes in a few
# combinations (dirty bit, writes, repair, compaction, a sparse stretch of the file).
set -eu
cd "$(dirname "$0")"
out=corpus/image_meta
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

io() { qemu-io -f qcow2 "$@" >/dev/null; }

qemu-img create -q -f qcow2 -o cluster_size=512 "$tmp/a.qcow2" 1M
io -c 'write -P 0x11 0 4k' -c 'write -P 0x22 300k 1k' -c 'write -z 600k 2k' "$tmp/a.qcow2"

qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=1 "$tmp/f.qcow2" 1M
io -c 'write -P 0x12 0 8k' -c 'write -P 0x13 512k 4k' "$tmp/f.qcow2"

qemu-img create -q -f qcow2 -o cluster_size=4096 "$tmp/b.qcow2" 4M
io -c 'write -P 0x33 0 8k' -c 'write -P 0x44 1M 4k' "$tmp/b.qcow2"
qemu-img snapshot -c s1 "$tmp/b.qcow2"
io -c 'write -P 0x55 0 4k' -c 'discard 1M 4k' "$tmp/b.qcow2"

qemu-img create -q -f raw "$tmp/r.raw" 256k
qemu-io -f raw -c 'write -P 0x66 0 64k' -c 'write -P 0x77 128k 16k' "$tmp/r.raw" >/dev/null
qemu-img convert -c -O qcow2 -o cluster_size=4096 "$tmp/r.raw" "$tmp/c.qcow2"

qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 "$tmp/d.qcow2" 512k
io -c 'write -P 0x88 1k 3k' -c 'write -P 0x99 200k 512' "$tmp/d.qcow2"

qemu-img create -q -f qcow2 -o cluster_size=512,lazy_refcounts=on "$tmp/e.qcow2" 256k
io -c 'write -P 0xaa 0 2k' -c 'write -P 0xbb 100k 1k' "$tmp/e.qcow2"

for img in "$tmp"/*.qcow2; do
    name=$(basename "$img" .qcow2)
    # Steering byte: 1 dirty, 2 write, 4 repair, 8 compact, 16 stretch by bytes 1..5 << 11.
    for ctl in 00 03 0e 17 1a; do
        { printf "\\x$ctl\\x00\\x00\\x10\\x00\\x00\\x00\\x00"; cat "$img"; } > "$out/$name-$ctl"
    done
done
ls -l "$out" | tail -n +2 | wc -l
