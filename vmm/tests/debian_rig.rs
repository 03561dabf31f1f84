//! The stock Debian guest (guest-images/build-debian: Debian's own kernel, an initramfs made
//! by initramfs-tools, a bookworm root file system with systemd) under `thinvm run`, where
//! Linux can run (inside the test rig on software-nested hosts). Slow -- the first build
//! takes minutes and needs root (debootstrap), each boot several minutes in the rig --
//! hence `#[ignore]`d; run by `scripts/test` (`cargo test -p vmm --test debian_rig --
//! --ignored`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

fn debian() -> guest_rig::DebianGuest {
    guest_rig::build_debian().expect("building the Debian guest (guest-images/build-debian)")
}

/// Boots the guest with `disks` (extra `--disk` options) and `workload`, the root disk a
/// fresh overlay `root.qcow2` in the current directory. thinvm's console input is a FIFO:
/// after each THINVM-RESULT line the guest waits (`thinvm.ack=1`) until the script has
/// printed `SIZE file=F alloc= apparent=` for each file in `watch` and sent it a line, so
/// every size is the one the step left; once more when thinvm ended. Shell fragment; prints
/// the THINVM-* lines, `EXIT code=N` if thinvm failed, and thinvm's guest and disk summary
/// lines as `VMM ...`.
fn boot_fragment(g: &guest_rig::DebianGuest, disks: &str, workload: &str, watch: &str) -> String {
    format!(
        r#"mkfifo console.in
# Read-write: neither side's open waits for the other.
exec 3<>console.in
{{ {thinvm} run --kernel {k} --initrd {i} --memory 512M --cpus 2 --disk path=root.qcow2,format=qcow2 {disks} --serial stdio --cmdline "{cmdline} thinvm.ack=1 thinvm.workload={workload}" <console.in 2>vmm.log || echo "EXIT code=$?"; }} | while IFS= read -r line; do
  line=${{line%$'\r'}}
  case $line in
    THINVM-* | EXIT*) echo "$line" ;;
  esac
  case $line in
    THINVM-RESULT*)
      for f in {watch}; do echo "SIZE file=$f alloc=$(( $(stat -c %b $f) * 512 )) apparent=$(stat -c %s $f)"; done
      echo go >&3 ;;
  esac
done
exec 3>&-
grep -E '^thinvm: (guest|disk)' vmm.log | sed 's/^/VMM /' || true
for f in {watch}; do echo "SIZE file=$f final=1 alloc=$(( $(stat -c %b $f) * 512 )) apparent=$(stat -c %s $f)"; done
"#,
        thinvm = thinvm(),
        k = g.kernel.display(),
        i = g.initrd.display(),
        cmdline = g.cmdline,
    )
}

/// Debian's kernel (no VIRTIO_MMIO_CMDLINE_DEVICES) finds its root disk through thinvm's ACPI
/// tables, systemd reaches multi-user.target, and on the ext4 root (a fresh overlay) each
/// way users give space back shrinks the overlay, allocated and apparent size: systemd's
/// fstrim.service after a deleted fill (deleting alone gives nothing back: the root is not
/// mounted with discard), a fill deleted under `mount -o discard`, and a zero-wipe (dd of
/// zeros over the free space) after a deleted fill. The guest's poweroff ends thinvm with
/// exit code 0; the overlay checks clean with qemu-img and its ext4 with e2fsck.
#[test]
#[ignore = "slow: stock Debian guest in the rig; run by scripts/test"]
fn debian_boots_to_multi_user_over_acpi_and_fstrim_discard_and_zero_wipe_shrink_the_overlay() {
    let g = debian();
    let script = format!(
        r#"set -e
d=$(mktemp -d "${{THINVM_SCRATCH:-/tmp}}/debian.XXXXXX"); cd "$d"
qemu-img create -q -f qcow2 -b {base} -F qcow2 root.qcow2
{boot}
qemu-img check root.qcow2 >/dev/null && echo "QEMUCHECK rc=0" || echo "QEMUCHECK rc=$?"
qemu-img convert -O raw root.qcow2 root.raw
e2fsck -fn root.raw >/dev/null 2>&1 && echo "FSCK rc=0" || echo "FSCK rc=$?"
cd /; rm -rf "$d"
"#,
        base = g.base_qcow2.display(),
        boot = boot_fragment(
            &g,
            "",
            "boot,fill:96,rm,fstrim-service,discard-mount:64,fill:64,rm,zero-wipe",
            "root.qcow2"
        ),
    );
    let out = linux(&script, 3600);
    eprintln!("{out}");
    assert!(!out.contains("EXIT code"), "thinvm failed: {out}");
    assert!(!out.contains("THINVM-ERROR"), "{out}");
    assert!(out.contains("VMM thinvm: guest powered off"), "{out}");
    let boot = &fields(&out, "THINVM-BOOT-OK ")[0];
    assert_eq!(boot["multi_user"], "active", "{out}");
    assert!(
        ["running", "degraded"].contains(&boot["state"].as_str()),
        "{out}"
    );
    let disks = fields(&out, "THINVM-DISK ");
    assert_eq!(disks.len(), 1, "{out}");
    assert_eq!(disks[0]["name"], "vda");
    assert_eq!(
        disks[0]["via"], "LNRO0005:00",
        "the disk was not found through ACPI: {out}"
    );
    let results = fields(&out, "THINVM-RESULT ");
    let steps: Vec<&str> = results.iter().map(|r| r["step"].as_str()).collect();
    assert_eq!(
        steps,
        [
            "boot",
            "fill",
            "rm",
            "fstrim-service",
            "discard-mount",
            "fill",
            "rm",
            "zero-wipe"
        ],
        "{out}"
    );
    assert!(
        num(&results[0], "total_ms") > 0,
        "systemd-analyze time: {out}"
    );
    assert!(
        num(&results[3], "bytes") > 0,
        "fstrim.service trimmed nothing: {out}"
    );
    assert!(
        num(&results[7], "bytes") > 0,
        "the zero-wipe wrote nothing: {out}"
    );
    // After each of the 8 steps, and once thinvm ended.
    let sizes = fields(&out, "SIZE ");
    assert_eq!(sizes.len(), 9, "{out}");
    let booted = &sizes[0];
    let grew = |i: usize, mib: u64, what: &str| {
        assert!(
            num(&sizes[i], "alloc") >= num(booted, "alloc") + (mib << 20),
            "{what}: allocated {} vs {} after the boot\n{out}",
            num(&sizes[i], "alloc"),
            num(booted, "alloc")
        );
    };
    // Back to the size after the boot, plus what the running system wrote meanwhile
    // (journal, file-system metadata): 8 MiB.
    let shrank = |i: usize, what: &str| {
        for k in ["alloc", "apparent"] {
            assert!(
                num(&sizes[i], k) <= num(booted, k) + (8 << 20),
                "{k} {what}: {} vs {} after the boot\n{out}",
                num(&sizes[i], k),
                num(booted, k)
            );
        }
    };
    grew(1, 90, "after filling 96 MiB");
    grew(
        2,
        90,
        "after deleting them (no discard: nothing given back yet)",
    );
    shrank(3, "after fstrim.service");
    shrank(4, "after a fill deleted under mount -o discard");
    grew(5, 60, "after filling 64 MiB");
    grew(6, 60, "after deleting them");
    shrank(7, "after the zero-wipe");
    shrank(8, "at the end");
    assert_eq!(num(&fields(&out, "QEMUCHECK ")[0], "rc"), 0, "{out}");
    assert_eq!(num(&fields(&out, "FSCK ")[0], "rc"), 0, "{out}");
}
