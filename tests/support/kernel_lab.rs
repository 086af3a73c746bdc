//! A real Linux kernel under QEMU for the data planes this machine's kernel lacks
//! (nvme-tcp, nvmet, nbd, configfs). Everything comes from Debian packages: the kernel
//! is `linux-image-6.1.0-*-amd64` fetched once with `apt-get download` (the newest ABI
//! listed, one package), unpacked under `target/kernel-lab/`; the guest is busybox-static
//! plus the modules the scenarios need, booted under TCG (KVM hangs on these machines).
//!
//! The guest's root is an ext4 image (a virtio disk, so O_DIRECT works) holding the
//! driver binary and the running test binary at their host paths, with their shared
//! libraries: a scenario is an `#[ignore]`d test of the same file, run inside the guest
//! by the host test with `--ignored --exact`. The guest prints its exit status on the
//! serial console; the host returns it with the whole log.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use handoff_csi::lab::{run, Kernel};

/// Modules the scenarios use; their dependencies are resolved from modules.dep.
const MODULES: &[&str] = &[
    "kernel/crypto/crct10dif_generic.ko",
    "kernel/crypto/crc64_rocksoft_generic.ko",
    "kernel/crypto/crc32c_generic.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/fs/ext4/ext4.ko",
    "kernel/fs/configfs/configfs.ko",
    "kernel/drivers/nvme/target/nvmet.ko",
    "kernel/drivers/nvme/target/nvmet-tcp.ko",
    "kernel/drivers/nvme/host/nvme-tcp.ko",
    "kernel/drivers/block/loop.ko",
    "kernel/drivers/block/nbd.ko",
    "kernel/fs/nfsd/nfsd.ko",
    "kernel/fs/nfs/nfsv4.ko",
];

const EXIT_MARK: &str = "HANDOFF-LAB-EXIT=";

/// What libtirpc reads to find its transports (rpcbind, mountd).
const NETCONFIG: &str = "udp        tpi_clts      v     inet     udp     -       -\ntcp        tpi_cots_ord  v     inet     tcp     -       -\nudp6       tpi_clts      v     inet6    udp     -       -\ntcp6       tpi_cots_ord  v     inet6    tcp     -       -\nlocal      tpi_cots_ord  -     loopback -       -       -\nunix       tpi_cots_ord  -     loopback -       -       -\n";

pub struct Lab {
    /// Module parameters by module file name (e.g. nvme-core.ko → multipath=N).
    pub module_params: Vec<(String, String)>,
    /// More host programs copied into the guest root at their own paths, with their
    /// libraries (the lab shell's `HANDOFF_LAB_EXTRA`).
    pub extra: Vec<PathBuf>,
    dir: PathBuf,
    pub kernel: Kernel,
}

pub struct LabRun {
    pub exit: Option<i32>,
    pub log: String,
    pub elapsed: Duration,
}

impl Lab {
    /// Finds or fetches the kernel (cached under `target/kernel-lab/`); says why the lab
    /// cannot run when it cannot.
    pub fn prepare() -> Result<Lab, String> {
        handoff_csi::lab::need("mkfs.ext4", "e2fsprogs")?;
        handoff_csi::lab::need("rpc.nfsd", "nfs-kernel-server")?;
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/kernel-lab");
        let kernel = Kernel::prepare(&dir)?;
        Ok(Lab {
            module_params: Vec::new(),
            extra: Vec::new(),
            dir,
            kernel,
        })
    }

    /// Copies `file` into `root` at its own path, with the shared libraries it needs.
    fn install_elf(root: &Path, file: &Path) -> Result<(), String> {
        Self::copy_at(root, file)?;
        let ldd = run(Command::new("ldd").arg(file), "ldd").unwrap_or_default();
        for line in ldd.lines() {
            let lib = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line
                    .split_whitespace()
                    .next()
                    .filter(|p| p.starts_with('/')),
            };
            if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
                Self::copy_at(root, Path::new(lib))?;
            }
        }
        Ok(())
    }

    fn copy_at(root: &Path, file: &Path) -> Result<(), String> {
        let dest = root.join(file.strip_prefix("/").unwrap_or(file));
        if dest.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(dest.parent().unwrap()).map_err(|e| e.to_string())?;
        // Debug info is most of a debug test binary (hundreds of MB) and the guest needs
        // none of it; copied whole where objcopy is missing or refuses the file.
        let stripped = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(file)
            .arg(&dest)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stripped {
            std::fs::copy(file, &dest).map_err(|e| format!("copy {file:?}: {e}"))?;
        }
        let mode = std::fs::metadata(file)
            .map_err(|e| e.to_string())?
            .permissions();
        std::fs::set_permissions(&dest, mode).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Bytes of the files under `dir` (the guest root before it becomes an image).
    fn bytes_under(dir: &Path) -> u64 {
        let mut total = 0;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                match entry.file_type() {
                    Ok(t) if t.is_dir() => stack.push(entry.path()),
                    Ok(t) if t.is_file() => total += entry.metadata().map(|m| m.len()).unwrap_or(0),
                    _ => {}
                }
            }
        }
        total
    }

    /// Builds the guest (initramfs + root disk) for this test binary and boots it; the
    /// guest runs `script` (sh) in its root and powers off.
    pub fn boot(&self, name: &str, script: &str, timeout: Duration) -> Result<LabRun, String> {
        let work = self.dir.join(format!("run-{name}"));
        let _ = std::fs::remove_dir_all(&work);
        let (initrd_dir, root) = (work.join("initramfs"), work.join("root"));
        let insmods = self
            .kernel
            .install_base(&initrd_dir, MODULES, &self.module_params)?;
        std::fs::create_dir_all(initrd_dir.join("newroot")).map_err(|e| e.to_string())?;
        let busybox = handoff_csi::lab::need("busybox", "busybox-static")?;
        let init = format!(
            r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
{insmods}
mount -t configfs none /sys/kernel/config
mount -t ext4 -o rw /dev/vda /newroot || {{ echo 'lab: no root disk'; echo {EXIT_MARK}125; poweroff -f; }}
for d in proc sys dev sys/kernel/config; do mkdir -p /newroot/$d; mount --bind /$d /newroot/$d; done
mkdir -p /newroot/dev/pts /newroot/run /newroot/tmp
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs run /newroot/run
chroot /newroot /bin/busybox sh -c 'ip link set lo up; . /lab-run.sh'
echo {EXIT_MARK}$?
sync
poweroff -f
"#
        );
        handoff_csi::lab::write_exec(&initrd_dir.join("init"), &init)?;
        let initrd = work.join("initrd.cpio");
        Kernel::pack(&initrd_dir, &initrd)?;
        // The root: busybox, the driver, this test binary, their libraries, the script.
        std::fs::create_dir_all(root.join("bin")).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(root.join("tmp")).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(root.join("etc")).map_err(|e| e.to_string())?;
        std::fs::copy(&busybox, root.join("bin/busybox")).map_err(|e| e.to_string())?;
        for tool in [
            "sh", "ip", "mount", "umount", "ls", "cat", "sleep", "dd", "mkdir", "losetup",
            "blockdev",
        ] {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(tool));
        }
        Self::install_elf(&root, Path::new(env!("CARGO_BIN_EXE_handoff-csi")))?;
        for d in ["var/lib/nfs/v4recovery", "run/rpcbind", "srv"] {
            std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
        }
        std::fs::write(root.join("etc/exports"), "").map_err(|e| e.to_string())?;
        for f in ["etc/services", "etc/protocols"] {
            let _ = std::fs::copy(Path::new("/").join(f), root.join(f));
        }
        for f in ["var/lib/nfs/etab", "var/lib/nfs/rmtab"] {
            std::fs::write(root.join(f), "").map_err(|e| e.to_string())?;
        }
        std::fs::write(root.join("etc/netconfig"), NETCONFIG).map_err(|e| e.to_string())?;
        // The filesystem tools the node plugin runs, and an NFS server and client for
        // the file backend on NFS (nfs-kernel-server), from the host with their libraries.
        for tool in [
            "mkfs.ext4",
            "resize2fs",
            "e2fsck",
            "blkid",
            "mkfs.xfs",
            "xfs_growfs",
            "rpc.nfsd",
            "rpc.mountd",
            "exportfs",
            "rpcbind",
            "mount.nfs",
        ] {
            if let Ok(path) = run(
                Command::new("sh").args(["-c", &format!("command -v {tool}")]),
                tool,
            ) {
                let path = PathBuf::from(path.trim());
                let real = std::fs::canonicalize(&path).unwrap_or(path.clone());
                Self::install_elf(&root, &real)?;
                if real != path {
                    Self::copy_at(&root, &real)?;
                    let dest = root.join(path.strip_prefix("/").unwrap_or(&path));
                    std::fs::create_dir_all(dest.parent().unwrap()).map_err(|e| e.to_string())?;
                    let _ = std::fs::copy(&real, &dest);
                }
            }
        }
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        Self::install_elf(&root, &me)?;
        for extra in &self.extra {
            Self::install_elf(&root, extra)?;
        }
        std::fs::write(
            root.join("lab-run.sh"),
            format!("export PATH=/bin:/sbin:/usr/bin:/usr/sbin TMPDIR=/tmp HANDOFF_IN_KERNEL_LAB=1 RUST_BACKTRACE=1\ncd /tmp\n{script}\n"),
        )
        .map_err(|e| e.to_string())?;
        let disk = work.join("root.ext4");
        // Sparse: the host pays for what is written into it (the root's files, the
        // guest's volumes), so a host short of that is named before mkfs fails inside.
        let size_mb = 3 * 1024;
        let content = Self::bytes_under(&root);
        let free = nix::sys::statvfs::statvfs(&work)
            .map(|s| s.blocks_available() * s.fragment_size())
            .map_err(|e| e.to_string())?;
        let needed = content + (512 << 20);
        if free < needed {
            return Err(format!(
                "the kernel lab needs {} MiB free under {} for the guest root image and has {} MiB",
                needed >> 20,
                work.display(),
                free >> 20
            ));
        }
        if content + (512 << 20) > (size_mb as u64) << 20 {
            return Err(format!(
                "the guest root ({} MiB) does not fit the {size_mb} MiB image",
                content >> 20
            ));
        }
        run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-d"])
                .arg(&root)
                .arg(&disk)
                .arg(format!("{size_mb}M")),
            "mkfs.ext4 -d",
        )?;
        let _ = std::fs::remove_dir_all(&root);
        let result = self.qemu(&initrd, &disk, timeout);
        // The root image holds copies of the binaries (hundreds of MB): not kept.
        let _ = std::fs::remove_dir_all(&work);
        result
    }

    fn qemu(&self, initrd: &Path, disk: &Path, timeout: Duration) -> Result<LabRun, String> {
        let started = Instant::now();
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "1536"])
            .args([
                "-nodefaults",
                "-nographic",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&self.kernel.vmlinuz)
            .arg("-initrd")
            .arg(initrd)
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,cache=none,aio=threads",
                disk.display()
            ))
            .args(["-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("qemu-system-x86_64: {e}"))?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut log = String::new();
        let mut exit = None;
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            match rx.recv_timeout(left.min(Duration::from_secs(1))) {
                Ok(line) => {
                    if let Some(code) = line.trim().strip_prefix(EXIT_MARK) {
                        exit = code.trim().parse().ok();
                    }
                    log.push_str(&line);
                    log.push('\n');
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if started.elapsed() >= timeout {
                        let _ = child.kill();
                        log.push_str(&format!("\nlab: guest killed after {timeout:?}\n"));
                        break;
                    }
                }
            }
        }
        let _ = child.wait();
        Ok(LabRun {
            exit,
            log,
            elapsed: started.elapsed(),
        })
    }

    /// Boots a guest that runs the named `#[ignore]`d tests of this test binary.
    pub fn run_tests(
        &self,
        name: &str,
        tests: &[&str],
        timeout: Duration,
    ) -> Result<LabRun, String> {
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut script = String::new();
        for t in tests {
            script.push_str(&format!(
                "echo 'lab: running {t}'\n{} --ignored --exact {t} --test-threads=1 --nocapture || exit $?\n",
                me.display()
            ));
        }
        self.boot(name, &script, timeout)
    }
}

/// Inside the guest, for the guest halves of lab scenarios.
pub fn in_lab() -> bool {
    std::env::var("HANDOFF_IN_KERNEL_LAB").as_deref() == Ok("1")
}
