#!/bin/sh
# thinvm guest workloads. Runs as PID 1 (from the initramfs, or from the root file system
# after switch_root). The steps come from the kernel command line:
#   thinvm.workload=STEP[,STEP...]
# STEP: boot | fill:MIB | rm | sync | zero-wipe | fstrim | zero-range:MIB | devtest | df |
#       topology | sleep:S | blkbench:MODE:BS:SECS | fio:RW[:SECS[:JOBS]]  (RW: randread randwrite read write verify)
#       | agent (serve the test agent until the VM is stopped) | count[:SECS] (THINVM-COUNT n
#       lines forever) | writes:N[:PAUSE] (N synced 1 MiB files, each announced, PAUSE
#       seconds apart, then all checked) | bench-server[:PORT] (the vsock benchmarks' guest end, thinvm-agent bench-server) |
#       raw-header | sector0 | peek | crash:SEED | crash-verify   (guest-images/crash-trials)
# Each step prints a machine-readable line:
#   THINVM-RESULT step=NAME ms=ELAPSED [key=value...]
# and failures print THINVM-ERROR step=NAME msg=... . At the end the guest prints
# THINVM-DONE status=N (N: steps that failed, at most 127) and writes N to the debug-exit port
# (thinvm --debug-exit then exits with (N << 1) | 1); without that device it reboots itself
# (reboot=k: thinvm sees the i8042 reset and exits 0). The test agent (thinvm-agent serve,
# vsock port 1025) runs in the background throughout; the step `agent` just waits for it.
export PATH=/usr/sbin:/sbin:/usr/bin:/bin
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/block ] || mount -t sysfs sys /sys
mkdir -p /tmp
mountpoint -q /tmp 2>/dev/null || mount -t tmpfs tmp /tmp

param() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
now_ms() { read up _ < /proc/uptime; echo "$up" | awk '{ printf "%d", $1 * 1000 }'; }
result() { echo "THINVM-RESULT step=$1 ms=$2 $3"; }
error() { echo "THINVM-ERROR step=$1 msg=$2"; }
failed=0
AGENT=$(command -v thinvm-agent || true)
finish() {
  sync
  status=$((failed > 127 ? 127 : failed))
  echo "THINVM-DONE status=$status"
  sleep 0.2
  # Without the device the agent says so (and fails): then the reset ends the VM.
  [ -n "$AGENT" ] && "$AGENT" debug-exit "$status" 2>&1 | sed 's/^/THINVM-DEBUG-EXIT /'
  reboot -f
}
[ -n "$AGENT" ] && "$AGENT" serve &

# util-linux's blkdiscard (it has -z). By absolute path: busybox's shell prefers its own
# applets over $PATH.
BLKDISCARD=/usr/sbin/blkdiscard
[ -x "$BLKDISCARD" ] || BLKDISCARD=blkdiscard

# Where file-based workloads write: the root file system when we run from it.
DATA=${THINVM_DATA:-/}

step_boot() {
  mem=$(awk '/MemTotal/ { print $2 }' /proc/meminfo)
  echo "THINVM-BOOT-OK cpus=$(nproc) mem_kb=$mem kernel=$(uname -r)"
}

# 1 MiB of random data, reused as the fill pattern (urandom is slow in nested guests).
chunk() {
  [ -f /tmp/chunk ] || head -c 1048576 /dev/urandom > /tmp/chunk
}

step_fill() {
  n=$1; chunk
  i=0
  while [ "$i" -lt "$n" ]; do cat /tmp/chunk; i=$((i + 1)); done > "$DATA/fill.bin" || return 1
  sync
  echo "bytes=$((n * 1048576))"
}

step_rm() { rm -f "$DATA/fill.bin" && sync; }

step_zero_wipe() {
  # What wipe tools do: fill the free space with zeros, sync, delete. ext4 keeps a reserve
  # of clusters for delayed allocation (2% of the fs, up to 16 MiB) that no file can use;
  # lift it during the wipe so every free block gets zeroed, then restore it.
  resv=
  for f in /sys/fs/ext4/*/reserved_clusters; do
    [ -f "$f" ] && { resv="$f=$(cat "$f")"; echo 0 > "$f"; }
  done
  dd if=/dev/zero of="$DATA/zero.bin" bs=1M 2>/tmp/dd.err
  bytes=$(stat -c %s "$DATA/zero.bin" 2>/dev/null || echo 0)
  sync
  rm -f "$DATA/zero.bin"
  sync
  [ -n "$resv" ] && echo "${resv#*=}" > "${resv%%=*}"
  echo "bytes=$bytes"
}

step_fstrim() {
  out=$(fstrim -v "$DATA" 2>&1) || { echo "$out" >&2; return 1; }
  bytes=$(echo "$out" | sed -n "s/.* \([0-9][0-9]*\) bytes.*/\1/p")
  echo "bytes=${bytes:-0}"
}

step_zero_range() {
  dev=/dev/vdb
  [ -b "$dev" ] || { echo "no $dev"; return 1; }
  "$BLKDISCARD" -z -l $(($1 * 1048576)) "$dev" && sync
}

# Raw-device checks on /dev/vda (unmounted): write, read back, zero-fill with O_DIRECT,
# discard, write-zeroes. Each prints its own result.
step_devtest() {
  dev=/dev/vda
  [ -b "$dev" ] || { echo "no $dev"; return 1; }
  pat() { head -c "$1" /dev/zero | tr '\000' "$2"; }
  # MiB 0-1: pattern 0xab; MiB 1-2: 0xcd then zero-filled (dd O_DIRECT);
  # MiB 2-3: 0xef then blkdiscard; MiB 3-4: 0x12 then blkdiscard -z.
  pat 1048576 '\253' | dd of=$dev bs=1M seek=0 count=1 iflag=fullblock conv=fsync 2>/dev/null || return 1
  pat 1048576 '\315' | dd of=$dev bs=1M seek=1 count=1 iflag=fullblock conv=fsync 2>/dev/null || return 1
  pat 1048576 '\357' | dd of=$dev bs=1M seek=2 count=1 iflag=fullblock conv=fsync 2>/dev/null || return 1
  pat 1048576 '\022' | dd of=$dev bs=1M seek=3 count=1 iflag=fullblock conv=fsync 2>/dev/null || return 1
  sum1=$(dd if=$dev bs=1M count=1 iflag=direct 2>/dev/null | md5sum | cut -c1-32)
  want=$(pat 1048576 '\253' | md5sum | cut -c1-32)
  [ "$sum1" = "$want" ] && echo "THINVM-CHECK readback ok" || echo "THINVM-CHECK readback FAIL"
  dd if=/dev/zero of=$dev bs=1M seek=1 count=1 oflag=direct 2>/dev/null || return 1
  "$BLKDISCARD" -o $((2 * 1048576)) -l 1048576 $dev || return 1
  "$BLKDISCARD" -z -o $((3 * 1048576)) -l 1048576 $dev || return 1
  sync
  zero=$(pat 1048576 '\000' | md5sum | cut -c1-32)
  for m in 1 2 3; do
    s=$(dd if=$dev bs=1M skip=$m count=1 iflag=direct 2>/dev/null | md5sum | cut -c1-32)
    [ "$s" = "$zero" ] && echo "THINVM-CHECK zeros-$m ok" || echo "THINVM-CHECK zeros-$m FAIL"
  done
  serial=$(cat /sys/block/vda/serial 2>/dev/null || true)
  echo "serial=$serial discard_granularity=$(cat /sys/block/vda/queue/discard_granularity)"
}

# raw-header: the format-probing attack (QEMU's CVE-2008-2004 class). /dev/vdb holds a
# qcow2 header that names a host file (the host put it there: a guest could as well write
# it byte by byte); the guest copies it over the start of /dev/vda, its raw disk. Prints
# dd's exit code and whether /dev/vda now starts with the qcow2 magic.
step_raw_header() {
  [ -b /dev/vdb ] || { echo "no /dev/vdb"; return 1; }
  rc=0
  dd if=/dev/vdb of=/dev/vda bs=65536 oflag=direct 2>/dev/null || rc=$?
  m=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 4 | od -An -tx1 | tr -d ' \n')
  [ "$m" = 514649fb ] && magic=1 || magic=0
  echo "header_rc=$rc magic=$magic"
}

# sector0: ordinary, zero and write-zeroes writes of /dev/vda's first 4 KiB, each read back.
step_sector0() {
  pat() { head -c "$1" /dev/zero | tr '\000' "$2"; }
  sum() { dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | md5sum | cut -c1-32; }
  w=0; z=0; wz=0
  pat 4096 '\253' | dd of=/dev/vda bs=4096 count=1 iflag=fullblock oflag=direct 2>/dev/null || w=$?
  [ "$(sum)" = "$(pat 4096 '\253' | md5sum | cut -c1-32)" ] && wback=1 || wback=0
  dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null || z=$?
  [ "$(sum)" = "$(pat 4096 '\000' | md5sum | cut -c1-32)" ] && zback=1 || zback=0
  pat 4096 '\253' | dd of=/dev/vda bs=4096 count=1 iflag=fullblock oflag=direct 2>/dev/null
  "$BLKDISCARD" -z -o 0 -l 4096 /dev/vda || wz=$?
  [ "$(sum)" = "$(pat 4096 '\000' | md5sum | cut -c1-32)" ] && wzback=1 || wzback=0
  echo "write_rc=$w write_back=$wback zero_rc=$z zero_back=$zback write_zeroes_rc=$wz write_zeroes_back=$wzback"
}

# peek: the first 64 bytes of /dev/vda as text (what the guest can read there).
step_peek() {
  echo "head=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 64 | tr -c 'a-zA-Z0-9-' '.')"
}

# blkbench:MODE:BS:SECS on /dev/vda (raw device, from the initramfs).
step_blkbench() {
  IFS=: read -r mode bs secs <<ARGS
$1
ARGS
  /bin/blkbench /dev/vda "${mode:-randread}" "${bs:-4096}" "${secs:-5}" 256
}

# fio:RW[:SECS[:JOBS]] (root file system only): fio on a 64 MiB file there, O_DIRECT, libaio,
# 32 requests in flight per job, SECS seconds (default 5), JOBS fio jobs (threads, default 1;
# with more, each job has its own file and the result is their sum). RW is fio's rw:
# randread and randwrite use
# 4 KiB blocks, read and write 1 MiB; "verify" writes 64 MiB at random offsets in 4-64 KiB
# blocks, then reads every block back and checks its crc32c (fails on any mismatch).
step_fio() {
  IFS=: read -r rw secs jobs <<ARGS
$1
ARGS
  rw=${rw:-randread}
  jobs=${jobs:-1}
  case "$rw" in
    randread | randwrite) set -- --rw="$rw" --bs=4k --runtime="${secs:-5}" --time_based ;;
    read | write) set -- --rw="$rw" --bs=1M --runtime="${secs:-5}" --time_based ;;
    verify) set -- --rw=randwrite --bsrange=4k-64k --verify=crc32c --do_verify=1 ;;
    *) echo "unknown-rw-$rw"; return 1 ;;
  esac
  [ -x /usr/bin/fio ] || { echo "no-fio-here"; return 1; }
  set -- --name=thinvm --directory="$DATA" --size=64M --direct=1 --ioengine=libaio \
    --iodepth=32 --thread --numjobs="$jobs" --group_reporting "$@"
  # The files are laid out first, so what is counted below is the timed run alone.
  /usr/bin/fio "$@" --create_only=1 > /dev/null 2>&1
  # Announced on the console (a benchmark's host side samples its counters there), then
  # the guest's own counters around the run: interrupts of its virtio devices and requests
  # the disks completed.
  echo "THINVM-MARK fio-start rw=$rw" > /dev/console
  irqs0=$(virtio_irqs); ios0=$(disk_ios); sources0=$(irq_sources)
  out=$(/usr/bin/fio "$@" --output-format=terse --terse-version=3 2>&1) ||
    { echo "fio-failed: $(echo "$out" | tail -1)"; return 1; }
  irqs=$(($(virtio_irqs) - irqs0)); ios=$(($(disk_ios) - ios0))
  # Every interrupt source that fired during the run, most first (timer, IPIs, virtio, ...).
  sources=$( { echo "$sources0"; echo; irq_sources; } | awk '
    !NF { after = 1; next }
    !after { before[$1] = $2; next }
    $2 > before[$1] { d[$1] = $2 - before[$1] }
    END { for (k in d) print d[k], k }' | sort -rn | head -8 | awk '{ printf "%s%s:%s", (NR > 1 ? "," : ""), $2, $1 }')
  rm -f "$DATA"/thinvm.*
  # Terse v3: field 5 error, 7/8 read KiB/s and IOPS, 48/49 write KiB/s and IOPS.
  echo "$out" | awk -F';' -v rw="$rw" -v jobs="$jobs" -v irqs="$irqs" -v ios="$ios" '$1 == 3 {
    printf "rw=%s jobs=%d error=%d read_iops=%d read_kib_s=%d write_iops=%d write_kib_s=%d guest_irqs=%d disk_ios=%d", rw, jobs, $5, $8, $7, $49, $48, irqs, ios }'
  echo " irq_sources=${sources:-none}"
}

# "name total" of each line of /proc/interrupts (all CPUs summed; a device's name for
# numbered lines, LOC, RES, CAL, ... for the others).
irq_sources() {
  awk 'NR > 1 { n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i
    name = ($1 ~ /^[0-9]+:$/) ? $NF : $1; sub(/:$/, "", name); print name, n }' /proc/interrupts
}

# The CPU topology the guest sees: vendor, and per CPU and cache level which CPUs share it
# (the scheduler's and blk-mq's "shares a last-level cache" comes from here).
step_topology() {
  printf "vendor=%s family=%s model=%s cache_kb=%s topoext=%s cpus=%s" \
    "$(awk -F': ' '/^vendor_id/ { print $2; exit }' /proc/cpuinfo)" \
    "$(awk -F': ' '/^cpu family/ { print $2; exit }' /proc/cpuinfo)" \
    "$(awk -F': ' '/^model\t/ { print $2; exit }' /proc/cpuinfo)" \
    "$(awk -F': ' '/^cache size/ { print $2 + 0; exit }' /proc/cpuinfo)" \
    "$(grep -m1 -c '^flags.* topoext' /proc/cpuinfo)" "$(grep -c ^processor /proc/cpuinfo)"
  for c in /sys/devices/system/cpu/cpu[0-9]*; do
    for i in "$c"/cache/index*; do
      [ -d "$i" ] || continue
      printf " %s-L%s%s=%s" "${c##*/}" "$(cat "$i/level")" "$(cut -c1 "$i/type")" "$(cat "$i/shared_cpu_list")"
    done
  done
  # The scheduler's domains of CPU 0 (an MC domain spanning both CPUs = one shared LLC).
  mountpoint -q /sys/kernel/debug 2>/dev/null || mount -t debugfs none /sys/kernel/debug 2>/dev/null
  for d in /sys/kernel/debug/sched/domains/cpu0/domain* /proc/sys/kernel/sched_domain/cpu0/domain*; do
    [ -f "$d/name" ] && printf " sd-%s=%s" "${d##*/}" "$(cat "$d/name")"
  done
  printf " core_siblings=%s" "$(cat /sys/devices/system/cpu/cpu0/topology/core_siblings_list 2>/dev/null)"
  echo
}

# Interrupts the guest took from its virtio devices, all CPUs.
virtio_irqs() {
  awk '/virtio/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i } END { print n + 0 }' /proc/interrupts
}

# Requests the guest's virtio disks completed (reads, writes, discards, flushes).
disk_ios() {
  awk '$3 ~ /^vd[a-z]+$/ { n += $4 + $8 + ($15 ~ /^[0-9]+$/ ? $15 : 0) + ($19 ~ /^[0-9]+$/ ? $19 : 0) } END { print n + 0 }' /proc/diskstats
}

# N files of 1 MiB, each synced and announced (THINVM-IO k) as it lands, PAUSE seconds apart
# (default 0), then all checked against the chunk they were copied from (snapshots taken while
# it writes: the pause keeps the writes going while a snapshot is taken on a fast host).
step_writes() {
  n=${1%%:*}
  pause=${1#*:}
  [ "$pause" = "$1" ] && pause=0
  chunk
  want=$(md5sum < /tmp/chunk | cut -c1-32)
  k=1
  while [ "$k" -le "$n" ]; do
    cp /tmp/chunk "$DATA/w$k.bin" && sync || return 1
    echo "THINVM-IO $k" > /dev/console
    sleep "$pause"
    k=$((k + 1))
  done
  bad=0
  k=1
  while [ "$k" -le "$n" ]; do
    [ "$(md5sum < "$DATA/w$k.bin" | cut -c1-32)" = "$want" ] || bad=$((bad + 1))
    k=$((k + 1))
  done
  [ "$bad" = 0 ] && echo "THINVM-CHECK writes ok" || echo "THINVM-CHECK writes FAIL bad=$bad"
  echo "files=$n"
}

# crash:SEED (guest-images/crash-trials kills thinvm while this runs; it never ends by itself):
# in a loop, writes files of pseudo-random sizes into $DATA/crash, each fsynced with its
# directory and then announced as `THINVM-FLUSHED NAME MD5`, and after each an unflushed
# O_DIRECT write into a scratch file; zero-wipes part of the free
# space; deletes old files (`THINVM-DELETING NAME` first); fstrims; pauses so thinvm's idle
# work (freeing clusters, shrinking the image) runs. Each phase starts with THINVM-PHASE.
step_crash() {
  seed=${1:-1}
  dir=$DATA/crash
  mkdir -p "$dir" && sync "$DATA" || return 1
  chunk
  # Numbering continues after what a previous run left (there is none on a fresh overlay).
  i=$(ls "$dir" | sed -n 's/^f\([0-9]*\)$/\1/p' | sort -n | tail -1)
  i=${i:-0}
  r=$seed
  # v = a pseudo-random number below $1 (no subshell, so r advances).
  rnd() { r=$(( (r * 1103515245 + 12345) % 2147483648 )); v=$(( r % $1 )); }
  echo "THINVM-CRASH-START"
  while :; do
    echo "THINVM-PHASE write"
    for k in 1 2 3 4; do
      i=$((i + 1))
      rnd 508; kib=$((4 + v))
      rnd 16; skip=$v
      f=$dir/f$i
      { echo "thinvm crash file $i seed $seed"; dd if=/tmp/chunk bs=64k skip=$skip 2>/dev/null; cat /tmp/chunk; } |
        head -c $((kib * 1024)) | dd of="$f" bs=64k conv=fsync 2>/dev/null || return 1
      sync "$dir" || return 1
      echo "THINVM-FLUSHED f$i $(md5sum < "$f" | cut -c1-32)"
      # Unflushed writes in flight too: O_DIRECT into a 16 MiB scratch file, no fsync (thinvm
      # allocates clusters for them that only the next flush references).
      rnd 8; n=$((1 + v))
      rnd 248
      dd if=/tmp/chunk of="$dir/scratch" bs=64k count=$n seek=$v oflag=direct conv=notrunc 2>/dev/null
    done
    echo "THINVM-PHASE zero-wipe"
    rnd 12
    dd if=/dev/zero of="$dir/zero" bs=1M count=$((4 + v)) conv=fsync 2>/dev/null
    rm -f "$dir/zero"; sync
    echo "THINVM-PHASE delete"
    for old in $(ls "$dir" | sed -n 's/^f\([0-9]*\)$/\1/p' | sort -n | head -n -8); do
      echo "THINVM-DELETING f$old"
      rm -f "$dir/f$old"
    done
    sync
    echo "THINVM-PHASE fstrim"
    fstrim "$DATA" >/dev/null 2>&1
    echo "THINVM-PHASE idle"
    rnd 6
    sleep 0.$((2 + v))
  done
}

# crash-verify: after a crash, mounting the root file system replayed its journal; print
# `THINVM-SUM NAME MD5` for every file of $DATA/crash, then remount the root file system
# read-only so the host's e2fsck sees it clean (as after an orderly shutdown).
step_crash_verify() {
  dir=$DATA/crash
  [ -d "$dir" ] || { echo "no-crash-dir"; return 1; }
  for f in "$dir"/*; do
    [ -f "$f" ] || continue
    echo "THINVM-SUM ${f##*/} $(md5sum < "$f" | cut -c1-32)"
  done
  sync
  mount -o remount,ro "$DATA" || return 1
}

step_df() { df -k "$DATA" | awk 'NR == 2 { printf "used_kb=%s avail_kb=%s", $3, $4 }'; }

run_step() {
  name=${1%%:*}
  arg=${1#*:}
  [ "$arg" = "$1" ] && arg=
  t0=$(now_ms)
  case "$name" in
    boot) out=$(step_boot) ;;
    fill) out=$(step_fill "${arg:-64}") ;;
    rm) out=$(step_rm) ;;
    sync) out=$(sync) ;;
    zero-wipe) out=$(step_zero_wipe) ;;
    fstrim) out=$(step_fstrim) ;;
    zero-range) out=$(step_zero_range "${arg:-16}") ;;
    devtest) out=$(step_devtest) ;;
    df) out=$(step_df) ;;
    topology) out=$(step_topology) ;;
    blkbench) out=$(step_blkbench "$arg") ;;
    fio) out=$(step_fio "$arg") ;;
    raw-header) out=$(step_raw_header) ;;
    sector0) out=$(step_sector0) ;;
    peek) out=$(step_peek) ;;
    crash) step_crash "$arg"; out= ;;
    crash-verify) out=$(step_crash_verify) ;;
    sleep) sleep "${arg:-1}"; out= ;;
    agent) echo "THINVM-AGENT-READY"; while :; do sleep 3600; done ;;
    count) i=0; while :; do i=$((i + 1)); echo "THINVM-COUNT $i"; sleep "${arg:-0.5}"; done ;;
    writes) out=$(step_writes "${arg:-20}") ;;
    bench-server) echo "THINVM-BENCH-SERVER"; "$AGENT" bench-server --port "${arg:-5201}" ;;
    *) failed=$((failed + 1)); error "$name" "unknown-step"; return ;;
  esac
  rc=$?
  t1=$(now_ms)
  # Let the host see a settled image: everything flushed, deferred work done.
  sync
  sleep 0.3
  # Lines the step printed as checks go out as they are; the last word list is the result.
  echo "$out" | grep '^THINVM-' || true
  extra=$(echo "$out" | grep -v '^THINVM-' | tr '\n' ' ')
  if [ $rc -eq 0 ]; then
    result "$name" $((t1 - t0)) "$extra"
  else
    failed=$((failed + 1))
    error "$name" "exit-$rc:$(echo "$extra" | tr ' ' '_')"
  fi
}

steps=$(param thinvm.workload)
[ -n "$steps" ] || steps=boot
echo "thinvm-guest: workload $steps"
for s in $(echo "$steps" | tr ',' ' '); do
  run_step "$s"
done
finish
