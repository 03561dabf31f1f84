#!/usr/bin/env python3
"""Runs one VM command for the benchmarks and reports, as one JSON line:
time to the first console byte, time to a marker line, the VMM's memory overhead (RSS
minus the guest-RAM mapping) when the marker appears, all THINVM-* lines, the console's last
40 lines of any kind (a guest's panic), exit code.

  vmrun.py --marker TEXT [--kill-after-marker] [--mem-mib N] [--until TEXT] -- CMD ...

--until TEXT: keep reading until TEXT (e.g. THINVM-DONE) before killing (QEMU microvm does
not exit when its guest reboots inside the rig).
--watch FILE: at each THINVM-RESULT line, FILE's allocated and apparent size (bytes) are
recorded ("sizes": one [allocated, apparent] per result line, in order), then a line is sent
to the VM's console (a guest booted with thinvm.ack=1 waits for it before its next step).
--timeout SECS (default 600): a run still going then is stopped ("timed_out": true); thinvm
is first asked for its report (SIGUSR1) and stopped with SIGTERM, so "stderr_tail" (60 lines
then, 5 otherwise) says what its vCPUs and disk queues were doing.
--kvm-stats: at each THINVM-MARK and THINVM-RESULT line, the host KVM's counters of the VM
(debugfs, /sys/kernel/debug/kvm/PID-FD: exits, exits to user space for MMIO and port I/O,
halts, injected interrupts, ... summed over the vCPUs) are recorded ("kvm": one [line,
{counter: value}] per such line), so a benchmark can say what one guest request cost in
exits under each VMM."""
import argparse, glob, json, os, select, signal, subprocess, sys, time

KVM_DEBUGFS = "/sys/kernel/debug/kvm"

def kvm_counters(pid):
    """The KVM counters of process pid's VM (the first one it has), or None."""
    dirs = sorted(glob.glob(f"{KVM_DEBUGFS}/{pid}-*"))
    if not dirs:
        return None
    out = {}
    for path in glob.glob(f"{dirs[0]}/*"):
        try:
            with open(path) as f:
                out[os.path.basename(path)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out

def overhead_kib(pid, mem_mib):
    """(RSS, RSS minus guest RAM, anonymous memory minus guest RAM) in KiB: the guest RAM
    mapping is the one of at least mem_mib with the most resident memory. Anonymous memory
    is the process's own (heap, stacks, written data); the code of the VMM and its libraries
    is file-backed, the same page-cache pages in every VM: what one more VM costs."""
    maps = []  # [size, rss, anonymous]
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 2:
                    continue
                if parts[0] == "Size:":
                    maps.append([int(parts[1]), 0, 0])
                elif parts[0] == "Rss:" and maps:
                    maps[-1][1] = int(parts[1])
                elif parts[0] == "Anonymous:" and maps:
                    maps[-1][2] = int(parts[1])
    except OSError:
        return None, None, None
    total = sum(m[1] for m in maps)
    anonymous = sum(m[2] for m in maps)
    guest = max((m for m in maps if m[0] >= mem_mib * 1024), key=lambda m: m[1], default=[0, 0, 0])
    return total, total - guest[1], anonymous - guest[2]

ap = argparse.ArgumentParser()
ap.add_argument("--marker", required=True)
ap.add_argument("--until")
ap.add_argument("--kill-after-marker", action="store_true")
ap.add_argument("--mem-mib", type=int, default=256)
ap.add_argument("--timeout", type=float, default=600)
ap.add_argument("--watch")
ap.add_argument("--kvm-stats", action="store_true")
ap.add_argument("cmd", nargs=argparse.REMAINDER)
a = ap.parse_args()
cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
if a.kvm_stats and not os.path.isdir(KVM_DEBUGFS):
    subprocess.run(["mount", "-t", "debugfs", "debugfs", "/sys/kernel/debug"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
t0 = time.monotonic()
p = subprocess.Popen(cmd, stdin=subprocess.PIPE if a.watch else subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
first = marker = None
rss = ovh = anon = None
buf = b""
lines = []
console_tail = []
sizes = []
kvm = []
until = a.until or a.marker
done = False
os.set_blocking(p.stdout.fileno(), False)
# stderr is read as it comes too: a VMM that logs more than a pipe holds must not block.
os.set_blocking(p.stderr.fileno(), False)
errbuf = b""
timed_out = False
while not done:
    if time.monotonic() - t0 > a.timeout:
        timed_out = True
        break
    r, _, _ = select.select([p.stdout, p.stderr], [], [], 0.5)
    if p.stderr in r:
        errbuf = (errbuf + (p.stderr.read() or b""))[-65536:]
    if p.stdout not in r:
        if p.poll() is not None:
            break
        continue
    chunk = p.stdout.read()
    if not chunk:
        break
    now = time.monotonic() - t0
    if first is None:
        first = now
    buf += chunk
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        text = line.decode(errors="replace").strip()
        if text:
            console_tail = (console_tail + [text])[-40:]
        if text.startswith("THINVM-"):
            lines.append(text)
        if a.kvm_stats and text.startswith(("THINVM-MARK", "THINVM-RESULT")):
            kvm.append([text, kvm_counters(p.pid)])
        if a.watch and text.startswith("THINVM-RESULT"):
            try:
                st = os.stat(a.watch)
                sizes.append([st.st_blocks * 512, st.st_size])
            except OSError:
                sizes.append([None, None])
            try:
                p.stdin.write(b"go\n")
                p.stdin.flush()
            except OSError:
                pass
        if marker is None and a.marker in text:
            marker = now
            rss, ovh, anon = overhead_kib(p.pid, a.mem_mib)
        if until in text:
            done = True
if timed_out and p.poll() is None and os.path.basename(cmd[0]) == "thinvm":
    # A stalled run: thinvm's report (SIGUSR1: what each vCPU is doing, each disk's queue
    # state) and its final statistics (SIGTERM) go to its stderr, kept below.
    p.send_signal(signal.SIGUSR1)
    time.sleep(3)
    p.send_signal(signal.SIGTERM)
elif (a.kill_after_marker or timed_out) and p.poll() is None:
    p.send_signal(signal.SIGTERM)
try:
    code = p.wait(timeout=30)
except subprocess.TimeoutExpired:
    p.kill()
    code = p.wait()
os.set_blocking(p.stderr.fileno(), True)
errbuf += p.stderr.read() or b""
err = errbuf.decode(errors="replace").strip().splitlines()
print(json.dumps({"first_byte_s": first, "marker_s": marker, "rss_kib": rss,
                  "overhead_kib": ovh, "anon_kib": anon, "exit": code, "wall_s": time.monotonic() - t0,
                  "lines": lines, "console_tail": console_tail, "sizes": sizes, "kvm": kvm, "timed_out": timed_out,
                  "stderr_tail": err[-60:] if timed_out else err[-5:],
                  # thinvm's per-disk statistics at exit (what the guest sent: discards,
                  # write-zeroes, ...), one line per disk.
                  "disk_stats": [l for l in err if l.startswith("thinvm: disk ") and ": reads " in l]}))
