//! Linux guests under `thinvm run`, where Linux can run: directly on hosts with hardware
//! KVM, inside the test rig (guest-images/rig) on software-nested hosts like these.
//! Slow (the first run builds the guest kernel, ~2 minutes): `#[ignore]`d in the fast suite,
//! run by `scripts/test` (`cargo test -p vmm --test linux_rig -- --ignored`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";

fn guest() -> guest_rig::Guest {
    guest_rig::build_guest().expect("building the default guest (guest-images/build-guest)")
}

#[test]
#[ignore = "slow: Linux guest in the rig; run by scripts/test"]
fn linux_boots_from_bzimage_and_pvh_vmlinux_with_two_cpus() {
    let g = guest();
    for kernel in [&g.bzimage, &g.vmlinux] {
        let script = format!(
            r#"d=$(mktemp -d "${{THINVM_SCRATCH:-/tmp}}/boot.XXXXXX"); cd "$d"
{thinvm} run --kernel {k} --initrd {i} --cpus 2 --memory 256M --cmdline '{CMDLINE} thinvm.workload=boot' </dev/null 2>vmm.log; echo "EXIT code=$?"
sed 's/^/VMM /' vmm.log; cd /; rm -rf "$d""#,
            thinvm = thinvm(),
            k = kernel.display(),
            i = g.initrd.display()
        );
        // (A 2-vCPU guest may die or stall on the rig's CPU: see linux_guest_may_die.)
        let out = linux_guest_may_die("linux_boots_with_two_cpus", &script, 400);
        let boot = fields(&out, "THINVM-BOOT-OK ");
        assert_eq!(boot.len(), 1, "{out}");
        assert_eq!(num(&boot[0], "cpus"), 2, "{out}");
        let mem = num(&boot[0], "mem_kb");
        assert!(
            (200_000..=262_144).contains(&mem),
            "guest saw {mem} KiB: {out}"
        );
        assert!(out.contains("THINVM-DONE"), "{out}");
        assert_eq!(num(&fields(&out, "EXIT ")[0], "code"), 0, "{out}");
    }
}

#[test]
#[ignore = "slow: Linux guest in the rig; run by scripts/test"]
fn linux_virtio_blk_driver_writes_zeroes_and_discards_on_an_overlay() {
    let g = guest();
    // Base: 64 MiB of 0x5a. The guest writes MiB 0 (0xab) and zeroes MiB 1-3 three ways.
    let script = format!(
        r#"set -e
d=$(mktemp -d "${{THINVM_SCRATCH:-/tmp}}/blk.XXXXXX"); cd "$d"
qemu-img create -q -f raw base.raw 64M
qemu-io -f raw -c 'write -P 0x5a 0 64M' base.raw >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw ov.qcow2
{thinvm} run --kernel {k} --initrd {i} --memory 256M --disk path=ov.qcow2,format=qcow2,serial=thinvm-devtest --cmdline '{CMDLINE} thinvm.workload=devtest' </dev/null
echo "EXIT code=$?"
qemu-img check ov.qcow2 >/dev/null && echo "QEMUCHECK rc=0" || echo "QEMUCHECK rc=$?"
qemu-io -c 'read -P 0xab 0 1M' -c 'read -P 0 1M 3M' -c 'read -P 0x5a 4M 60M' ov.qcow2 | grep -c 'verification failed' | sed 's/^/MISMATCHES n=/'
echo "SIZE alloc=$(( $(stat -c %b ov.qcow2) * 512 )) apparent=$(stat -c %s ov.qcow2)"
rm -rf "$d"
"#,
        thinvm = thinvm(),
        k = g.bzimage.display(),
        i = g.initrd.display()
    );
    let out = linux(&script, 900);
    assert!(out.contains("THINVM-CHECK readback ok"), "{out}");
    for m in 1..=3 {
        assert!(out.contains(&format!("THINVM-CHECK zeros-{m} ok")), "{out}");
    }
    assert!(!out.contains("FAIL"), "{out}");
    assert!(out.contains("serial=thinvm-devtest"), "{out}");
    assert_eq!(num(&fields(&out, "EXIT ")[0], "code"), 0, "{out}");
    assert_eq!(num(&fields(&out, "QEMUCHECK ")[0], "rc"), 0, "{out}");
    assert_eq!(
        num(&fields(&out, "MISMATCHES ")[0], "n"),
        0,
        "qemu-io saw other data: {out}"
    );
    // Only MiB 0 stays allocated (16 clusters) plus metadata: the zeroed MiBs were released.
    let size = &fields(&out, "SIZE ")[0];
    assert!(num(size, "alloc") <= (1 << 20) + 6 * 65536, "{out}");
    assert!(num(size, "apparent") <= (1 << 20) + 6 * 65536, "{out}");
}

/// fio in the guest on the overlay's ext4 root, 32 requests in flight (so the device runs
/// batches of writes, data in parallel): a verify run (random writes of 4-64 KiB, every
/// block read back and checked by crc32c), then a short random-write run of two fio jobs on
/// two vCPUs (two request queues, one per vCPU) and a sequential-read run, which must
/// report throughput. The image checks clean afterwards.
#[test]
#[ignore = "slow: Linux guest in the rig; run by scripts/test"]
fn fio_verifies_its_writes_in_the_guest_on_an_overlay() {
    let g = guest();
    let script = format!(
        r#"set -e
d=$(mktemp -d "${{THINVM_SCRATCH:-/tmp}}/fio.XXXXXX"); cd "$d"
qemu-img create -q -f qcow2 -b {base} -F qcow2 ov.qcow2
{thinvm} run --kernel {k} --initrd {i} --memory 256M --cpus 2 --disk path=ov.qcow2,format=qcow2 --serial stdio --cmdline "{CMDLINE} thinvm.root=vda thinvm.workload=fio:verify,fio:randwrite:2:2,fio:read:2" </dev/null 2>vmm.log | grep '^THINVM' || true
grep 'in batches' vmm.log | sed 's/.*writes \([0-9]*\) ([^,]*, \([0-9]*\) in batches.*/BATCHES writes=\1 batched=\2/'
qemu-img check ov.qcow2 >/dev/null && echo "QEMUCHECK rc=0" || echo "QEMUCHECK rc=$?"
rm -rf "$d"
"#,
        thinvm = thinvm(),
        base = g.base_qcow2.display(),
        k = g.bzimage.display(),
        i = g.initrd.display()
    );
    let out = linux(&script, 900);
    assert!(out.contains("THINVM-DONE"), "{out}");
    assert!(!out.contains("THINVM-ERROR"), "{out}");
    let runs = fields(&out, "THINVM-RESULT step=fio ");
    assert_eq!(runs.len(), 3, "{out}");
    for r in &runs {
        assert_eq!(num(r, "error"), 0, "{out}");
    }
    assert!(
        num(&runs[0], "write_iops") > 0 && num(&runs[0], "read_iops") > 0,
        "{out}"
    );
    assert!(num(&runs[1], "write_iops") > 0, "{out}");
    assert_eq!(num(&runs[1], "jobs"), 2, "{out}");
    assert!(num(&runs[2], "read_kib_s") > 0, "{out}");
    let b = &fields(&out, "BATCHES ")[0];
    assert!(num(b, "batched") > 0, "no write ran in a batch: {out}");
    assert_eq!(num(&fields(&out, "QEMUCHECK ")[0], "rc"), 0, "{out}");
}

/// fill + rm + RECLAIM on the guest's ext4 root. One boot per step, so each size is taken
/// at rest (the VM ended, the image closed).
fn reclaim_scenario(reclaim: &str) {
    let g = guest();
    let script = format!(
        r#"set -e
d=$(mktemp -d "${{THINVM_SCRATCH:-/tmp}}/e2e.XXXXXX"); cd "$d"
{thinvm} image create -q -b {base} -F qcow2 ov.qcow2
for step in df fill:96 rm {reclaim}; do
  {thinvm} run --kernel {k} --initrd {i} --memory 256M --cpus 2 --disk path=ov.qcow2,format=qcow2 --serial stdio --cmdline "{CMDLINE} thinvm.root=vda thinvm.workload=$step" </dev/null 2>vmm.log | grep '^THINVM' || true
  echo "SIZE step=${{step%%:*}} alloc=$(( $(stat -c %b ov.qcow2) * 512 )) apparent=$(stat -c %s ov.qcow2)"
done
qemu-img check ov.qcow2 >/dev/null && echo "QEMUCHECK rc=0" || echo "QEMUCHECK rc=$?"
qemu-img convert -O raw ov.qcow2 fs.raw
e2fsck -fn fs.raw >/dev/null 2>&1 && echo "FSCK rc=0" || echo "FSCK rc=$?"
rm -rf "$d"
"#,
        thinvm = thinvm(),
        base = g.base_qcow2.display(),
        k = g.bzimage.display(),
        i = g.initrd.display()
    );
    let out = linux(&script, 1800);
    assert_eq!(out.matches("THINVM-DONE").count(), 4, "{out}");
    assert!(!out.contains("THINVM-ERROR"), "{out}");
    let sizes = fields(&out, "SIZE ");
    let step = |name: &str| {
        sizes
            .iter()
            .find(|m| m.get("step").map(String::as_str) == Some(name))
            .unwrap_or_else(|| panic!("no size after {name}: {out}"))
    };
    let before_fill = num(step("df"), "alloc");
    let filled = step("fill");
    assert!(
        num(filled, "alloc") >= before_fill + (90 << 20),
        "fill did not allocate: {out}"
    );
    let after = step(reclaim);
    eprintln!("before fill {before_fill}, filled {filled:?}, after {reclaim} {after:?}");
    // Within a few clusters of the size before the fill, plus file-system metadata the
    // guest touched meanwhile (journal, bitmaps): 2 MiB.
    assert!(
        num(after, "alloc") <= before_fill + (2 << 20),
        "allocated after {reclaim}: {} vs {before_fill} before the fill\n{out}",
        num(after, "alloc")
    );
    assert!(
        num(after, "apparent") < num(filled, "apparent"),
        "the file did not shrink: {out}"
    );
    assert_eq!(num(&fields(&out, "QEMUCHECK ")[0], "rc"), 0, "{out}");
    assert_eq!(num(&fields(&out, "FSCK ")[0], "rc"), 0, "{out}");
}

#[test]
#[ignore = "slow: Linux guest in the rig; run by scripts/test"]
fn zero_wipe_in_the_guest_shrinks_the_overlay() {
    reclaim_scenario("zero-wipe");
}

#[test]
#[ignore = "slow: Linux guest in the rig; run by scripts/test"]
fn fstrim_in_the_guest_shrinks_the_overlay() {
    reclaim_scenario("fstrim");
}

#[test]
fn software_nested_hosts_get_a_one_line_warning_before_linux_boots() {
    if !guest_rig::host_is_software_nested() {
        eprintln!("SKIPPED software_nested_hosts_get_a_one_line_warning_before_linux_boots: this host's KVM is not software-nested");
        return;
    }
    if !kvm_or_skip("software_nested_hosts_get_a_one_line_warning_before_linux_boots") {
        return;
    }
    // A fake bzImage that loads like a kernel and whose entry points reset the VM at once
    // (through the i8042), so the whole run -- load, boot, end -- is covered in a moment.
    let dir = TempDir::new("nested");
    let fake = dir.join("bzImage");
    let mut img = vec![0u8; 0x4000];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe] = 0x55;
    img[0x1ff] = 0xaa;
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    img[0x211] = 1; // loadflags: LOADED_HIGH
                    // code32_start
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    // mov al, 0xfe; out 0x64, al (i8042 reset); hlt; jmp $-1 -- at the 32-bit entry (the
    // protected-mode kernel's start) and at the 64-bit one (start + 0x200).
    let reset = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];
    img[0x400..0x400 + reset.len()].copy_from_slice(&reset);
    img[0x600..0x600 + reset.len()].copy_from_slice(&reset);
    std::fs::write(&fake, &img).unwrap();
    let out = run_thinvm(
        &[
            "run",
            "--kernel",
            fake.to_str().unwrap(),
            "--serial",
            "none",
        ],
        60,
    );
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the fake kernel resets the VM: {err}"
    );
    let warning: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("software-nested"))
        .collect();
    assert_eq!(warning.len(), 1, "{err}");
    assert!(warning[0].contains("rig"), "{err}");
}

/// The host file system fills up under a Linux guest: its overlay lives on a tmpfs with 24
/// MiB left and the guest writes 48 MiB into its root file system. With `werror=enospc`
/// (the default) the writes wait instead of failing; once the space is freed the guest
/// finishes, thinvm exits 0, the overlay checks clean and the guest's ext4 is clean.
#[test]
#[ignore = "slow: Linux guest in the rig; run by scripts/test"]
fn a_full_host_file_system_pauses_the_guest_until_space_returns() {
    let g = guest();
    let script = format!(
        r#"set -e
d=$(mktemp -d "${{THINVM_SCRATCH:-/tmp}}/full.XXXXXX"); cd "$d"
mkdir small; mount -t tmpfs -o size=96M thinvm-full small
qemu-img create -q -f qcow2 -b {base} -F qcow2 small/ov.qcow2
avail=$(df --output=avail -B1 small | tail -1)
head -c $((avail - (24 << 20))) /dev/zero > small/filler
{thinvm} run --kernel {k} --initrd {i} --memory 256M --disk path=small/ov.qcow2,format=qcow2 --serial stdio --cmdline "{CMDLINE} thinvm.root=vda thinvm.workload=fill:48" </dev/null >console.log 2>vmm.log &
pid=$!
n=0; until grep -q 'host file system is full' vmm.log; do n=$((n + 1)); [ $n -gt 1800 ] && break; sleep 0.1; done
sleep 3
echo "HELD errors=$(grep -c 'I/O error' console.log || true)"
rm -f small/filler
rc=0; wait $pid || rc=$?
echo "EXIT code=$rc"
grep '^THINVM' console.log || true
grep -E 'host space available again|host file system is full' vmm.log || true
qemu-img check small/ov.qcow2 >/dev/null && echo "QEMUCHECK rc=0" || echo "QEMUCHECK rc=$?"
qemu-img convert -O raw small/ov.qcow2 fs.raw
e2fsck -fn fs.raw >/dev/null 2>&1 && echo "FSCK rc=0" || echo "FSCK rc=$?"
umount small; rm -rf "$d"
"#,
        thinvm = thinvm(),
        base = g.base_qcow2.display(),
        k = g.bzimage.display(),
        i = g.initrd.display()
    );
    let out = linux(&script, 900);
    assert!(out.contains("host file system is full"), "{out}");
    assert!(out.contains("host space available again"), "{out}");
    assert_eq!(num(&fields(&out, "HELD ")[0], "errors"), 0, "{out}");
    assert_eq!(num(&fields(&out, "EXIT ")[0], "code"), 0, "{out}");
    assert!(out.contains("THINVM-DONE"), "{out}");
    assert!(!out.contains("THINVM-ERROR"), "{out}");
    assert_eq!(num(&fields(&out, "QEMUCHECK ")[0], "rc"), 0, "{out}");
    assert_eq!(num(&fields(&out, "FSCK ")[0], "rc"), 0, "{out}");
}

/// `thinvm run --exec` on the default guest (no --kernel: built and cached on first use, its
/// base image under --ephemeral), two boots: the command's stdout, stderr and exit status come
/// back (and thinvm's stdin reaches it, the console does not reach stdout); a command that
/// hangs is ended by --timeout with exit code 124 and the message saying so, after its first
/// output arrived (so the timeout stopped a running command, not a boot).
#[test]
#[ignore = "slow: Linux guest in the rig; run by scripts/test"]
fn exec_runs_a_command_in_the_default_guest() {
    guest();
    let script = format!(
        r#"d=$(mktemp -d "${{THINVM_SCRATCH:-/tmp}}/exec.XXXXXX"); cd "$d"
printf 'abc\ndef\nghi\n' | {thinvm} run --ephemeral --exec 'echo "out-line $(wc -l)"; echo err-line >&2; exit 7' >o1 2>e1
echo "EXEC1 code=$? out=$(grep -c '^out-line 3$' o1) err=$(grep -c '^err-line$' e1) lines=$(wc -l <o1)"
{thinvm} run --ephemeral --timeout 100 --exec 'echo started; sleep 1000' </dev/null >o2 2>e2
echo "EXEC2 code=$? started=$(grep -c '^started$' o2) said=$(grep -c 'timeout of 100 s' e2)"
cat e1 e2 | grep -v '^thinvm: disk' | head -20
cd /; rm -rf "$d"
"#,
        thinvm = thinvm()
    );
    let out = linux(&script, 900);
    let f = |k: &str| first_line(&out, k);
    let e1 = f("EXEC1");
    assert_eq!(num(&e1, "code"), 7, "{out}");
    assert_eq!(num(&e1, "out"), 1, "stdout, with stdin counted: {out}");
    assert_eq!(num(&e1, "err"), 1, "{out}");
    assert_eq!(
        num(&e1, "lines"),
        1,
        "only the command's output on stdout: {out}"
    );
    let e2 = f("EXEC2");
    assert_eq!(
        (num(&e2, "code"), num(&e2, "started"), num(&e2, "said")),
        (124, 1, 1),
        "{out}"
    );
}

/// Snapshot a running Linux guest, restore it: the clone's counter goes on from where the
/// snapshot was taken (not from 1), and a snapshot from another thinvm version is refused.
/// (`--exec` into a restored clone, i.e. the guest agent answering after the vsock transport
/// reset, did not answer in the rig when this was written: not asserted here.)
#[test]
#[ignore = "slow: Linux guest in the rig; run by scripts/test"]
fn a_restored_linux_guest_goes_on_counting() {
    let g = guest();
    let script = format!(
        r#"d=$(mktemp -d "${{THINVM_SCRATCH:-/tmp}}/snap.XXXXXX"); cd "$d"
{thinvm} run --kernel {k} --initrd {i} --memory 256M --disk path={base} --ephemeral --vsock cid=3,uds=$d/v.sock --api-socket $d/api --serial file=orig.log --cmdline "{CMDLINE} thinvm.root=vda thinvm.workload=count:0.3" </dev/null 2>orig.err &
pid=$!
until tr -d '\r' <orig.log 2>/dev/null | grep -q '^THINVM-COUNT 5$' || [ $SECONDS -gt 900 ]; do sleep 0.5; done
{thinvm} ctl $d/api snapshot snap >ctl.out 2>&1; echo "SNAP code=$?"
at=$(grep -c THINVM-COUNT orig.log)
sleep 3
after=$(grep -c THINVM-COUNT orig.log)
kill $pid; wait $pid
echo "ORIG at=$at after=$after"
{thinvm} restore snap --ephemeral --serial file=clone.log --timeout 8 </dev/null 2>clone.err
echo "CLONE code=$? first=$(tr -d '\r' <clone.log | grep THINVM-COUNT | head -1 | cut -d' ' -f2) last=$(tr -d '\r' <clone.log | grep THINVM-COUNT | tail -1 | cut -d' ' -f2)"
sed -i 's/"thinvm_version":"[^"]*"/"thinvm_version":"0.0.0"/' snap/state.json
{thinvm} restore snap --ephemeral --serial file=never.log </dev/null 2>refused.err
echo "REFUSED code=$? said=$(grep -c 'taken by thinvm 0.0.0\|by thinvm 0.0.0' refused.err) started=$(test -e never.log && echo 1 || echo 0)"
cat ctl.out refused.err clone.err | head -20
cd /; rm -rf "$d"
"#,
        thinvm = thinvm(),
        k = g.vmlinux.display(),
        i = g.initrd.display(),
        base = g.base_qcow2.display(),
    );
    let out = linux(&script, 1800);
    let f = |k: &str| first_line(&out, k);
    assert_eq!(num(&f("SNAP"), "code"), 0, "{out}");
    let orig = f("ORIG");
    let at = num(&orig, "at");
    assert!(
        num(&orig, "after") > at,
        "the original stopped counting: {out}"
    );
    let clone = f("CLONE");
    assert_eq!(num(&clone, "code"), 124, "{out}");
    // The snapshot was taken after COUNT 5 and before `thinvm ctl` returned (`at` lines
    // then; the guest is paused while the snapshot is written, which takes seconds here).
    let first = num(&clone, "first");
    assert!(
        first > 5 && first <= at + 1,
        "the clone started at {first}, the snapshot was between 5 and {at}: {out}"
    );
    assert!(num(&clone, "last") > first, "{out}");
    let refused = f("REFUSED");
    assert_eq!(num(&refused, "code"), 1, "{out}");
    assert_eq!(num(&refused, "said"), 1, "{out}");
    assert_eq!(num(&refused, "started"), 0, "{out}");
}

/// A snapshot taken while the guest writes to its root disk (each write synced): the
/// original and a clone both finish the writes and find every file intact, the clone's
/// overlay and the snapshot's layer check clean and so does the clone's ext4; the clone keeps
/// the debug-exit device (both end with the workload's status through it). Isolation between
/// clones: `exec_into_restored_clones_each_on_its_own_disk`.
#[test]
#[ignore = "slow: Linux guest in the rig; run by scripts/test"]
fn a_snapshot_taken_mid_io_restores_consistent_and_clones_are_isolated() {
    let g = guest();
    let script = format!(
        r#"d=$(mktemp -d "${{THINVM_SCRATCH:-/tmp}}/midio.XXXXXX"); cd "$d"
{thinvm} run --kernel {k} --initrd {i} --memory 256M --disk path={base} --ephemeral --debug-exit --vsock cid=3,uds=$d/v.sock --api-socket $d/api --serial file=orig.log --timeout 600 --cmdline "{CMDLINE} thinvm.root=vda thinvm.workload=writes:24:0.3" </dev/null 2>orig.err &
pid=$!
until {{ [ -f orig.log ] && tr -d '\r' <orig.log | grep -q '^THINVM-IO 4$'; }} || [ $SECONDS -gt 900 ]; do sleep 0.2; done
{thinvm} ctl $d/api snapshot snap >ctl.out 2>&1; echo "SNAP code=$? at=$(grep -c THINVM-IO orig.log)"
wait $pid; echo "ORIG code=$? check=$(grep -c 'THINVM-CHECK writes ok' orig.log)"
{thinvm} restore snap --serial file=clone.log --timeout 600 </dev/null 2>clone.err
echo "CLONE code=$? check=$(grep -c 'THINVM-CHECK writes ok' clone.log) first=$(tr -d '\r' <clone.log | grep THINVM-IO | head -1 | cut -d' ' -f2)"
echo "ORIG-TAIL $(tr -d '\r' <orig.log | tail -4 | tr '\n' '|') $(tail -n 2 orig.err | tr '\n' '|')"
echo "CLONE-TAIL $(tr -d '\r' <clone.log | tail -4 | tr '\n' '|') $(tail -n 2 clone.err | tr '\n' '|')"
ov=$(ls snap/clone-*.qcow2 | head -1)
qemu-img check "$ov" >/dev/null 2>&1; c1=$?
qemu-img check snap/disk0.qcow2 >/dev/null 2>&1; c2=$?
qemu-img convert -O raw "$ov" fs.raw && e2fsck -fn fs.raw >/dev/null 2>&1; c3=$?
echo "IMAGES overlay=$c1 layer=$c2 fsck=$c3"
rm -f fs.raw
cat ctl.out; tail -3 clone.err
cd /; rm -rf "$d"
"#,
        thinvm = thinvm(),
        k = g.vmlinux.display(),
        i = g.initrd.display(),
        base = g.base_qcow2.display(),
    );
    let out = linux(&script, 2400);
    let f = |k: &str| first_line(&out, k);
    let snap = f("SNAP");
    assert_eq!(num(&snap, "code"), 0, "{out}");
    assert!(
        num(&snap, "at") < 24,
        "the snapshot came after the writes: {out}"
    );
    // (v << 1) | 1 with v = 0 failed steps.
    let orig = f("ORIG");
    assert_eq!((num(&orig, "code"), num(&orig, "check")), (1, 1), "{out}");
    let clone = f("CLONE");
    assert_eq!((num(&clone, "code"), num(&clone, "check")), (1, 1), "{out}");
    // The clone goes on after the snapshot's point (after IO 4, before `ctl` returned).
    let first = num(&clone, "first");
    assert!(first > 4 && first <= num(&snap, "at") + 1, "{out}");
    let images = f("IMAGES");
    for k in ["overlay", "layer", "fsck"] {
        assert_eq!(num(&images, k), 0, "{k}: {out}");
    }
}

/// `--exec` into clones of a snapshot of a Linux guest whose agent was listening: one clone
/// writes a file on its own overlay of the frozen disk, then two more run at once (one with an
/// overlay, one `--ephemeral`) and neither sees the file; each gets its command's output and
/// status. The
/// clones' overlays and the snapshot's layer check clean.
#[test]
#[ignore = "slow: Linux guest in the rig; run by scripts/test"]
fn exec_into_restored_clones_each_on_its_own_disk() {
    let g = guest();
    let script = format!(
        r#"d=$(mktemp -d "${{THINVM_SCRATCH:-/tmp}}/execclone.XXXXXX"); cd "$d"
{thinvm} run --kernel {k} --initrd {i} --memory 256M --disk path={base} --ephemeral --vsock cid=3,uds=$d/v.sock --api-socket $d/api --serial file=orig.log --cmdline "{CMDLINE} thinvm.root=vda thinvm.workload=agent" </dev/null 2>orig.err &
pid=$!
until {{ [ -f orig.log ] && grep -q THINVM-AGENT-READY orig.log; }} || [ $SECONDS -gt 900 ]; do sleep 0.2; done
{thinvm} ctl $d/api snapshot snap >ctl.out 2>&1; echo "SNAP code=$?"
kill $pid; wait $pid
timeout 600 {thinvm} restore snap --exec 'echo clone-a > /mark && sync && cat /mark; exit 3' </dev/null >a.out 2>a.err
echo "CLONEA code=$? mark=$(grep -c '^clone-a$' a.out)"
timeout 600 {thinvm} restore snap --exec 'cat /mark 2>/dev/null || echo no-mark; exit 4' </dev/null >b.out 2>b.err & b=$!
timeout 600 {thinvm} restore snap --ephemeral --exec 'cat /mark 2>/dev/null || echo no-mark; exit 5' </dev/null >c.out 2>c.err & c=$!
wait $b; cb=$?; wait $c; cc=$?
echo "CLONEB code=$cb nomark=$(grep -c '^no-mark$' b.out)"
echo "CLONEC code=$cc nomark=$(grep -c '^no-mark$' c.out) overlays=$(ls snap/clone-*.qcow2 | wc -l)"
bad=0; for f in snap/clone-*.qcow2 snap/disk0.qcow2; do qemu-img check "$f" >/dev/null 2>&1 || bad=$((bad + 1)); done
echo "IMAGES bad=$bad"
for f in a.err b.err c.err; do echo "== $f: $(tail -n 3 $f | tr '\n' '|')"; done
cd /; rm -rf "$d"
"#,
        thinvm = thinvm(),
        k = g.vmlinux.display(),
        i = g.initrd.display(),
        base = g.base_qcow2.display(),
    );
    let out = linux(&script, 2400);
    let f = |k: &str| first_line(&out, k);
    assert_eq!(num(&f("SNAP"), "code"), 0, "{out}");
    let (a, b, c) = (f("CLONEA"), f("CLONEB"), f("CLONEC"));
    assert_eq!((num(&a, "code"), num(&a, "mark")), (3, 1), "{out}");
    assert_eq!((num(&b, "code"), num(&b, "nomark")), (4, 1), "{out}");
    assert_eq!((num(&c, "code"), num(&c, "nomark")), (5, 1), "{out}");
    // Two clones with overlays of their own; the ephemeral one left none behind.
    assert_eq!(num(&c, "overlays"), 2, "{out}");
    assert_eq!(num(&f("IMAGES"), "bad"), 0, "{out}");
}

/// The format-probing attack (QEMU's CVE-2008-2004 class), end to end in a Linux guest.
/// Boot 1: a raw data disk given without format=; the guest copies a qcow2 header that
/// names a host file over its start with dd: the write fails in the guest, ordinary and zero
/// writes there work, the disk stays raw. Boot 2: the disk given with format=raw: the header
/// lands, and `thinvm image info` (like qemu-img) sees a qcow2 image over the host file.
/// Then boots without format= (plain and --ephemeral) are refused with the clear message,
/// and the file's contents never reach a guest.
#[test]
#[ignore = "slow: Linux guest in the rig; run by scripts/test"]
fn a_guest_cannot_turn_format_probing_against_the_host() {
    let g = guest();
    let script = format!(
        r#"set -e
d=$(mktemp -d "${{THINVM_SCRATCH:-/tmp}}/probe.XXXXXX"); cd "$d"
echo "thinvm-host-secret-$$" > secret.txt
sum0=$(md5sum < secret.txt)
qemu-img create -q -f qcow2 -b "$d/secret.txt" -F raw header.qcow2 1M
qemu-img create -q -f raw disk.raw 16M
vm() {{ rc=0; {thinvm} run --kernel {k} --initrd {i} --memory 256M "$@" </dev/null 2>vmm.log || rc=$?; }}
hdr="--disk path=header.qcow2,format=raw,readonly=on"
vm --disk path=disk.raw $hdr --cmdline "{CMDLINE} thinvm.workload=raw-header,sector0"
echo "EXIT boot=1 code=$rc warned=$(grep -c 'probing found raw' vmm.log || true)"
echo "INFO boot=1 format=$(qemu-img info disk.raw | sed -n 's/^file format: //p')"
vm --disk path=disk.raw,format=raw $hdr --cmdline "{CMDLINE} thinvm.workload=raw-header"
echo "EXIT boot=2 code=$rc"
echo "INFO boot=2 format=$({thinvm} image info disk.raw | sed -n 's/^file format: //p') backing=$({thinvm} image info disk.raw | sed -n 's/^backing file: //p')"
for eph in "" --ephemeral; do
  vm $eph --disk path=disk.raw --cmdline "{CMDLINE} thinvm.workload=peek"
  echo "EXIT boot=3$eph code=$rc refused=$(grep -c 'no format was given' vmm.log || true) names=$(grep -c "$d/secret.txt" vmm.log || true)"
  sed 's/^/VMMLOG /' vmm.log
done
[ "$(md5sum < secret.txt)" = "$sum0" ] && echo "SECRET unchanged=1" || echo "SECRET unchanged=0"
rm -rf "$d"
"#,
        thinvm = thinvm(),
        k = g.bzimage.display(),
        i = g.initrd.display()
    );
    let out = linux(&script, 1200);
    let step = |name: &str| {
        let all = fields(&out, &format!("THINVM-RESULT step={name} "));
        assert!(!all.is_empty(), "no {name} result: {out}");
        all
    };
    let exit = |boot: &str| {
        fields(&out, "EXIT ")
            .into_iter()
            .find(|m| m.get("boot").map(String::as_str) == Some(boot))
            .unwrap_or_else(|| panic!("no exit of boot {boot}: {out}"))
    };
    let info = |boot: &str| {
        fields(&out, "INFO ")
            .into_iter()
            .find(|m| m.get("boot").map(String::as_str) == Some(boot))
            .unwrap_or_else(|| panic!("no info after boot {boot}: {out}"))
    };
    // Boot 1: probed raw. The header write fails in the guest; sector 0 still takes
    // ordinary data, zeros and write-zeroes; the disk stays raw.
    let headers = step("raw-header");
    assert_ne!(
        num(&headers[0], "header_rc"),
        0,
        "the header write succeeded: {out}"
    );
    assert_eq!(num(&headers[0], "magic"), 0, "{out}");
    let s0 = &step("sector0")[0];
    for k in ["write_rc", "zero_rc", "write_zeroes_rc"] {
        assert_eq!(num(s0, k), 0, "{k}: {out}");
    }
    for k in ["write_back", "zero_back", "write_zeroes_back"] {
        assert_eq!(num(s0, k), 1, "{k}: {out}");
    }
    assert_eq!(num(&exit("1"), "code"), 0, "{out}");
    assert_eq!(num(&exit("1"), "warned"), 1, "{out}");
    assert_eq!(info("1")["format"], "raw", "{out}");
    // Boot 2: format=raw given: the guest may write it, and the disk now names the file.
    assert_eq!(headers.len(), 2, "{out}");
    assert_eq!(num(&headers[1], "header_rc"), 0, "{out}");
    assert_eq!(num(&headers[1], "magic"), 1, "{out}");
    assert_eq!(num(&exit("2"), "code"), 0, "{out}");
    assert_eq!(info("2")["format"], "qcow2", "{out}");
    assert!(info("2")["backing"].ends_with("/secret.txt"), "{out}");
    // Boot 3, plain and ephemeral: refused before the guest runs, naming the file.
    for boot in ["3", "3--ephemeral"] {
        let e = exit(boot);
        assert_eq!(num(&e, "code"), 1, "boot {boot}: {out}");
        assert_eq!(num(&e, "refused"), 1, "boot {boot}: {out}");
        assert_eq!(num(&e, "names"), 1, "boot {boot}: {out}");
    }
    assert!(out.contains("format=qcow2 on --disk"), "{out}");
    assert!(
        fields(&out, "THINVM-RESULT step=peek ").is_empty(),
        "a guest ran on the disk: {out}"
    );
    assert!(
        !out.contains("thinvm-host-secret-"),
        "the secret reached the console: {out}"
    );
    assert_eq!(num(&fields(&out, "SECRET ")[0], "unchanged"), 1, "{out}");
}

/// Whole-VMM faults: `thinvm run` is SIGKILLed at seeded random moments while the guest
/// writes and fsyncs files, zero-wipes, deletes and fstrims (guest-images/crash-trials; 3
/// trials here, v3 and v2 overlays, the long run is in docs/benchmarks.md). After each kill
/// qemu-img check finds no corruption (leaks are repaired by `image check -r leaks`), the
/// guest's ext4 is clean after its journal replay, and every file the guest had flushed reads
/// back with its checksum.
#[test]
#[ignore = "slow: Linux guest in the rig; run by scripts/test"]
fn sigkill_while_the_guest_writes_wipes_and_trims_loses_no_flushed_data() {
    let g = guest();
    // On the host's file system (visible inside the rig), so a rig that starts again resumes.
    let results = TempDir::new("crash-trials");
    let script = format!(
        "{trials} --here --trials 3 --seed 2026 --max-delay 15 --out {out} --thinvm {thinvm} --kernel {k} --initrd {i} --base {base}",
        trials = guest_rig::images_dir().join("crash-trials").display(),
        out = results.path().display(),
        thinvm = thinvm(),
        k = g.bzimage.display(),
        i = g.initrd.display(),
        base = g.base_qcow2.display()
    );
    let out = linux(&script, 1800);
    let tally = fields(&out, "CRASH-TRIALS ");
    assert_eq!(tally.len(), 1, "{out}");
    assert_eq!(num(&tally[0], "trials"), 3, "{out}");
    assert_eq!(num(&tally[0], "failed"), 0, "{out}");
    assert!(num(&tally[0], "flushed-files-verified") > 0, "{out}");
    let trials: Vec<&str> = out.lines().filter(|l| l.starts_with("TRIAL ")).collect();
    assert_eq!(trials.len(), 3, "{out}");
    assert!(trials.iter().all(|l| l.contains(" ok (")), "{out}");
}
