//! A small Rust front end to `guest-images/`: builds the default Linux guest (kernel,
//! initramfs, base root file system) and runs commands where a Linux guest can run —
//! directly on a host with hardware KVM, or inside the test rig (QEMU's TCG emulating AMD
//! SVM) on software-nested hosts like thinvm's development machines.
//!
//! Used by thinvm's Linux tests and by `thinvm demo`:
//! ```no_run
//! let guest = guest_rig::build_guest().unwrap();
//! let out = guest_rig::run_linux_capable(&format!("ls {}", guest.base_qcow2.display()), 600).unwrap();
//! assert!(out.status.success());
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Errors of the rig helper.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    #[error("cannot run {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
}

pub type Result<T> = std::result::Result<T, RigError>;

/// The repository's `guest-images/` directory.
pub fn images_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.join("guest-images"))
        .unwrap_or_else(|| PathBuf::from("guest-images"))
}

/// Paths of the built default guest.
#[derive(Clone, Debug)]
pub struct Guest {
    pub bzimage: PathBuf,
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    pub base_qcow2: PathBuf,
}

/// Builds (or finds in the cache) the default guest; progress goes to stderr.
pub fn build_guest() -> Result<Guest> {
    let text = build_script("build-guest")?;
    let get = |k: &str| output_value(&text, "build-guest", k).map(PathBuf::from);
    Ok(Guest {
        bzimage: get("KERNEL_BZIMAGE")?,
        vmlinux: get("KERNEL_VMLINUX")?,
        initrd: get("INITRD")?,
        base_qcow2: get("BASE_QCOW2")?,
    })
}

/// Paths of the built stock Debian guest (guest-images/build-debian).
#[derive(Clone, Debug)]
pub struct DebianGuest {
    /// Debian's own kernel (vmlinuz from linux-image-amd64).
    pub kernel: PathBuf,
    /// The initramfs Debian's initramfs-tools made.
    pub initrd: PathBuf,
    /// The bookworm root file system (ext4) as a qcow2 base image.
    pub base_qcow2: PathBuf,
    /// The kernel command line to boot it with.
    pub cmdline: String,
}

/// Runs a build script from guest-images/ and returns its KEY=VALUE stdout lines.
fn build_script(name: &str) -> Result<String> {
    let script = images_dir().join(name);
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| RigError::Spawn {
            what: script.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(RigError::Failed {
            what: format!("guest-images/{name}"),
            detail: format!("exit status {}", out.status),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of `KEY=` in a build script's output.
fn output_value(text: &str, script: &str, key: &str) -> Result<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .ok_or_else(|| RigError::Failed {
            what: format!("guest-images/{script}"),
            detail: format!("no {key} in its output"),
        })
}

/// Builds (or finds in the cache) the stock Debian guest; progress goes to stderr. The first
/// build needs root (debootstrap) and takes about 10 minutes.
pub fn build_debian() -> Result<DebianGuest> {
    let text = build_script("build-debian")?;
    let get = |k: &str| output_value(&text, "build-debian", k);
    Ok(DebianGuest {
        kernel: PathBuf::from(get("KERNEL")?),
        initrd: PathBuf::from(get("INITRD")?),
        base_qcow2: PathBuf::from(get("BASE_QCOW2")?),
        cmdline: get("CMDLINE")?,
    })
}

/// Whether this host's /dev/kvm is a software-nested KVM that cannot run Linux user space.
pub fn host_is_software_nested() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
        || std::fs::read_to_string("/proc/modules")
            .map(|m| m.lines().any(|l| l.starts_with("kvm_pvm ")))
            .unwrap_or(false)
}

/// Whether /dev/kvm exists and opens.
pub fn host_has_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Where scratch files of a Linux-capable run should go (a tmpfs inside the rig).
pub fn scratch_dir() -> PathBuf {
    std::env::var_os("THINVM_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// The command (argv) that runs `script` with bash where Linux guests can run.
pub fn linux_capable_command(script: &str, timeout_secs: u64) -> Command {
    if host_is_software_nested() || !host_has_kvm() {
        let mut c = Command::new(images_dir().join("rig"));
        c.arg("--timeout")
            .arg(timeout_secs.to_string())
            .arg("--")
            .arg("bash")
            .arg("-c")
            .arg(script);
        c
    } else {
        let mut c = Command::new("timeout");
        c.arg(timeout_secs.to_string())
            .arg("bash")
            .arg("-c")
            .arg(script);
        c
    }
}

/// The line the rig prints on stdout when its emulated hardware failed and it runs the command
/// again in a fresh rig (see `guest-images/rig`).
pub const RIG_RETRY_MARKER: &str = "THINVM-RIG-RETRY";

/// The output of the last attempt: what follows the last [`RIG_RETRY_MARKER`] line, if any.
pub fn last_attempt(stdout: &[u8]) -> &[u8] {
    let marker = RIG_RETRY_MARKER.as_bytes();
    let mut start = 0;
    let mut pos = 0;
    for line in stdout.split_inclusive(|&b| b == b'\n') {
        pos += line.len();
        if line.trim_ascii_end() == marker {
            start = pos;
        }
    }
    &stdout[start..]
}

/// The prefix of the lines [`with_hang_watchdog`] prints.
pub const HANG_MARKER: &str = "THINVM-HANG";

/// `script` with a watchdog beside it: when the script still runs at three quarters of
/// `timeout_secs` (the rig or `timeout` would kill it, and everything in it, silently), every
/// `thinvm` the script started is shown (its threads: state, kernel wait channel, CPU time,
/// twice 3 s apart), asked for its report (SIGUSR1: what each vCPU is doing, each disk's
/// statistics and queue state), its stderr's last lines printed when stderr is a file, and
/// then stopped (SIGTERM), so that the script goes on and its test fails with all of that
/// in its output. Lines start with [`HANG_MARKER`].
pub fn with_hang_watchdog(script: &str, timeout_secs: u64) -> String {
    let after = timeout_secs.saturating_mul(3) / 4;
    format!(
        r#"__thinvm_descendants() {{
  local c
  for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do echo "$c"; __thinvm_descendants "$c"; done
}}
__thinvm_vmms() {{
  local p
  for p in $(__thinvm_descendants "$1"); do
    [ "$(cat /proc/"$p"/comm 2>/dev/null)" = thinvm ] && echo "$p"
  done
}}
__thinvm_threads() {{
  local t
  for t in /proc/"$1"/task/*; do
    echo "{HANG_MARKER} pid=$1 thread=$(cat "$t"/comm 2>/dev/null) state=$(cut -d' ' -f3 "$t"/stat 2>/dev/null) wchan=$(cat "$t"/wchan 2>/dev/null) cpu_ticks=$(awk '{{print $14 + $15}}' "$t"/stat 2>/dev/null)"
  done
}}
__thinvm_watchdog() {{
  # Wall-clock time, not a count of one-second sleeps: in the rig a loop turn costs far
  # more than its sleep when the machine is loaded, and counted turns once let a hung
  # guest outlive the rig's timeout with no report at all. Builtins only in the loop.
  local main=$1 p f now end state
  printf -v end '%(%s)T' -1; end=$((end + {after}))
  while :; do
    sleep 1
    # Gone, or a zombie its parent has not reaped yet.
    state=
    read -r _ _ state _ < /proc/"$main"/stat 2>/dev/null
    case $state in "" | Z) return 0 ;; esac
    printf -v now '%(%s)T' -1
    [ "$now" -lt "$end" ] || break
  done
  # The script's own stdout (the watchdog holds none while it waits, so that a reader
  # waiting for the end of the output is never held up by it).
  exec >/proc/"$main"/fd/1 2>&1 || return 0
  echo "{HANG_MARKER} still running after {after} s of the {timeout_secs} s allowed (load $(cut -d' ' -f1-3 /proc/loadavg)): each thinvm's state and report, then SIGTERM"
  for p in $(__thinvm_vmms "$main"); do
    echo "{HANG_MARKER} pid=$p: $(tr '\0' ' ' < /proc/"$p"/cmdline)"
    __thinvm_threads "$p"
    kill -USR1 "$p" 2>/dev/null
  done
  sleep 3
  for p in $(__thinvm_vmms "$main"); do
    __thinvm_threads "$p"
    f=$(readlink /proc/"$p"/fd/2)
    case $f in /*) [ -f "$f" ] && tail -n 100 "$f" | sed "s|^|{HANG_MARKER} pid=$p stderr: |" ;; esac
    kill -TERM "$p" 2>/dev/null
  done
}}
__thinvm_watchdog $$ </dev/null >/dev/null 2>&1 &
{script}"#
    )
}

/// Runs `script` (bash) where Linux guests can run, capturing its output (with
/// [`with_hang_watchdog`]). When the rig had to run it again, stdout holds the last attempt's
/// output only.
pub fn run_linux_capable(script: &str, timeout_secs: u64) -> Result<Output> {
    let mut out = linux_capable_command(&with_hang_watchdog(script, timeout_secs), timeout_secs)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RigError::Spawn {
            what: "the Linux test rig".into(),
            source,
        })?;
    let kept = last_attempt(&out.stdout).len();
    if kept != out.stdout.len() {
        out.stdout.drain(..out.stdout.len() - kept);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A script that would hang past its time is shown and its `thinvm` stopped: a stand-in
    /// VMM (a `sleep` whose process is named thinvm) that logs SIGUSR1 to its stderr file and
    /// ends on SIGTERM.
    #[test]
    fn the_watchdog_reports_and_stops_a_hung_thinvm() {
        let dir = std::env::temp_dir().join(format!("thinvm-watchdog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vmm = dir.join("thinvm");
        std::fs::write(
            &vmm,
            "#!/bin/bash\ntrap 'echo thinvm: vCPU 0: report >&2' USR1\ntrap 'exit 143' TERM\necho thinvm: started >&2\nwhile :; do sleep 0.1; done\n",
        )
        .unwrap();
        let script = format!(
            "cd {d} && chmod +x thinvm && (exec -a thinvm ./thinvm 2>vmm.log); echo \"EXIT code=$?\"",
            d = dir.display()
        );
        let out = Command::new("timeout")
            .arg("60")
            .arg("bash")
            .arg("-c")
            .arg(with_hang_watchdog(&script, 8))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(out.status.success(), "{stdout}");
        assert!(
            stdout.contains("THINVM-HANG still running after 6 s of the 8 s allowed"),
            "{stdout}"
        );
        assert!(stdout.contains("stderr: thinvm: started"), "{stdout}");
        assert!(
            stdout.contains("stderr: thinvm: vCPU 0: report"),
            "{stdout}"
        );
        assert!(stdout.contains("thread=thinvm state="), "{stdout}");
        assert!(stdout.contains("EXIT code=143"), "{stdout}");
    }

    /// The watchdog keeps wall-clock time: with every `sleep 1` of its loop taking 3 s (a
    /// loaded rig, where counted turns let a hung guest outlive the rig's timeout unreported)
    /// it still reports and stops the hung VMM at three quarters of the time allowed.
    #[test]
    fn the_watchdog_fires_on_time_when_its_loop_runs_slow() {
        let dir = std::env::temp_dir().join(format!("thinvm-watchdog-slow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("sleep"), "#!/bin/bash\nexec /bin/sleep 3\n").unwrap();
        std::fs::write(
            dir.join("thinvm"),
            "#!/bin/bash\ntrap : USR1\ntrap 'exit 143' TERM\nwhile :; do /bin/sleep 0.1; done\n",
        )
        .unwrap();
        // Executable before the script starts: its watchdog's first `sleep` must find this one.
        for f in ["sleep", "thinvm"] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let script = format!(
            "cd {d} && (exec -a thinvm ./thinvm); echo \"EXIT code=$?\"",
            d = dir.display()
        );
        let t = std::time::Instant::now();
        let out = Command::new("timeout")
            .arg("60")
            .arg("bash")
            .arg("-c")
            .arg(with_hang_watchdog(&script, 8))
            .env("PATH", format!("{}:/usr/bin:/bin", dir.display()))
            .output()
            .unwrap();
        let elapsed = t.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            stdout.contains("THINVM-HANG still running after 6 s"),
            "{stdout}"
        );
        assert!(stdout.contains("EXIT code=143"), "{stdout}");
        // Counted turns: 6 turns of 3 s, then 3 s of report before the SIGTERM (21 s).
        assert!(
            elapsed < std::time::Duration::from_secs(17),
            "{elapsed:?}: {stdout}"
        );
    }

    /// A script that ends in time prints nothing of the watchdog and is not held up by it.
    #[test]
    fn the_watchdog_stays_silent_when_the_script_ends_in_time() {
        let t = std::time::Instant::now();
        let out = Command::new("bash")
            .arg("-c")
            .arg(with_hang_watchdog("echo done", 600))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn only_the_last_attempt_of_a_retried_rig_run_is_kept() {
        assert_eq!(last_attempt(b"a\nb\n"), b"a\nb\n");
        assert_eq!(
            last_attempt(b"EXIT code=0\npanic\nTHINVM-RIG-RETRY\nEXIT code=1\n"),
            b"EXIT code=1\n"
        );
        assert_eq!(
            last_attempt(b"x\nTHINVM-RIG-RETRY\r\ny\nTHINVM-RIG-RETRY\nz"),
            b"z"
        );
        assert_eq!(
            last_attempt(b"THINVM-RIG-RETRY-NOT\nq\n"),
            b"THINVM-RIG-RETRY-NOT\nq\n"
        );
    }
}
