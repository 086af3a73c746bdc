//! A real Linux kernel and real QEMU, from Debian packages only: what the kernel-lab
//! tests and `demo migration --vm` boot. The kernel is `linux-image-6.1.0-*-amd64`
//! (the newest ABI the package lists show, one package) fetched with `apt-get download`
//! and unpacked into a cache directory; guests are busybox-static plus the modules they
//! need, booted under TCG (KVM hangs on the machines this was built on). A [`Vm`] is a
//! QEMU process with its serial console captured and a QMP socket for migrations.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

/// Runs `cmd` to completion; its stdout, or what failed and its stderr.
pub fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The path of `tool`, or what to install.
pub fn need(tool: &str, package: &str) -> Result<PathBuf, String> {
    run(
        Command::new("sh").args(["-c", &format!("command -v {tool}")]),
        tool,
    )
    .map(|p| PathBuf::from(p.trim()))
    .map_err(|_| format!("{tool} is missing: apt-get install {package}"))
}

/// Debian's kernel, unpacked, with its modules.
pub struct Kernel {
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

impl Kernel {
    /// The kernel cached under `cache`, fetched first when it is not there.
    pub fn prepare(cache: &Path) -> Result<Kernel, String> {
        for (tool, pkg) in [
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("busybox", "busybox-static"),
            ("depmod", "kmod"),
            ("cpio", "cpio"),
            ("dpkg-deb", "dpkg"),
        ] {
            need(tool, pkg)?;
        }
        std::fs::create_dir_all(cache).map_err(|e| format!("{cache:?}: {e}"))?;
        let root = cache.join("linux");
        if Self::find(&root).is_none() {
            Self::fetch(cache, &root)?;
        }
        Self::find(&root).ok_or_else(|| "the kernel package held no vmlinuz".into())
    }

    fn find(root: &Path) -> Option<Kernel> {
        let boot = std::fs::read_dir(root.join("boot")).ok()?;
        boot.filter_map(Result::ok).map(|e| e.path()).find_map(|p| {
            let release = p
                .file_name()?
                .to_str()?
                .strip_prefix("vmlinuz-")?
                .to_owned();
            let modules = root.join("lib/modules").join(&release);
            modules.join("modules.dep").exists().then_some(Kernel {
                vmlinuz: p,
                modules,
            })
        })
    }

    fn fetch(cache: &Path, root: &Path) -> Result<(), String> {
        let listed = run(
            Command::new("apt-cache").args([
                "search",
                "--names-only",
                r"^linux-image-6\.1\.0-[0-9]+-amd64$",
            ]),
            "apt-cache search",
        )?;
        let newest = listed
            .lines()
            .filter_map(|l| {
                let name = l.split_whitespace().next()?;
                let abi: u32 = name
                    .strip_prefix("linux-image-6.1.0-")?
                    .strip_suffix("-amd64")?
                    .parse()
                    .ok()?;
                Some((abi, name.to_owned()))
            })
            .max()
            .ok_or("no linux-image-6.1.0-*-amd64 in the package lists: run apt-get update")?
            .1;
        tracing::info!(package = %newest, "fetching the lab kernel (one Debian package, ~70 MB)");
        run(
            Command::new("apt-get")
                .arg("download")
                .arg(&newest)
                .current_dir(cache),
            "apt-get download",
        )?;
        let deb = std::fs::read_dir(cache)
            .map_err(|e| e.to_string())?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or("apt-get download left no .deb")?;
        run(
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root),
            "dpkg-deb -x",
        )?;
        let _ = std::fs::remove_file(&deb);
        let release = std::fs::read_dir(root.join("lib/modules"))
            .map_err(|e| e.to_string())?
            .filter_map(Result::ok)
            .find_map(|e| e.file_name().into_string().ok())
            .ok_or("no modules in the kernel package")?;
        run(
            Command::new("depmod").arg("-b").arg(root).arg(&release),
            "depmod",
        )?;
        Ok(())
    }

    /// `wanted` (paths as in modules.dep) and everything they need, dependencies first.
    pub fn module_order(&self, wanted: &[&str]) -> Result<Vec<String>, String> {
        let dep = std::fs::read_to_string(self.modules.join("modules.dep"))
            .map_err(|e| format!("modules.dep: {e}"))?;
        let deps: HashMap<&str, Vec<&str>> = dep
            .lines()
            .filter_map(|l| {
                let (m, d) = l.split_once(':')?;
                Some((m, d.split_whitespace().collect()))
            })
            .collect();
        fn visit<'a>(
            m: &'a str,
            deps: &HashMap<&'a str, Vec<&'a str>>,
            seen: &mut BTreeSet<&'a str>,
            out: &mut Vec<String>,
        ) {
            if !seen.insert(m) {
                return;
            }
            // modules.dep lists indirect dependencies too; reversed, deepest first.
            for d in deps.get(m).into_iter().flatten().rev() {
                visit(d, deps, seen, out);
            }
            out.push(m.to_owned());
        }
        let (mut seen, mut out) = (BTreeSet::new(), Vec::new());
        for m in wanted {
            if deps.contains_key(m) {
                visit(m, &deps, &mut seen, &mut out);
            }
        }
        Ok(out)
    }

    /// Writes an initramfs of `root` (a directory) to `out`.
    pub fn pack(root: &Path, out: &Path) -> Result<(), String> {
        run(
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "find . | cpio -o -H newc --quiet > '{}'",
                    out.display()
                ))
                .current_dir(root),
            "cpio",
        )
        .map(drop)
    }

    /// Busybox and `modules` (with their dependencies) into `root`; returns the insmod
    /// lines for its init, `params` by module file name.
    pub fn install_base(
        &self,
        root: &Path,
        modules: &[&str],
        params: &[(String, String)],
    ) -> Result<String, String> {
        for d in ["bin", "dev", "proc", "sys", "tmp", "lib/modules"] {
            std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
        }
        let busybox = need("busybox", "busybox-static")?;
        std::fs::copy(&busybox, root.join("bin/busybox")).map_err(|e| e.to_string())?;
        let mut insmods = String::new();
        for m in self.module_order(modules)? {
            let file = Path::new(&m)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            std::fs::copy(self.modules.join(&m), root.join("lib/modules").join(&file))
                .map_err(|e| format!("module {m}: {e}"))?;
            let args: Vec<&str> = params
                .iter()
                .filter(|(f, _)| *f == file)
                .map(|(_, p)| p.as_str())
                .collect();
            insmods.push_str(&format!(
                "insmod /lib/modules/{file} {} || echo 'lab: insmod {file} failed'\n",
                args.join(" ")
            ));
        }
        Ok(insmods)
    }

    /// A VM guest's initramfs: busybox, the virtio block driver, and `script` run as
    /// its workload on /dev/vda (its state lives in guest RAM, so it migrates).
    pub fn vm_initrd(&self, work: &Path, script: &str) -> Result<PathBuf, String> {
        let _ = std::fs::remove_dir_all(work);
        let root = work.join("initramfs");
        let insmods = self.install_base(
            &root,
            &[
                "kernel/drivers/virtio/virtio_pci.ko",
                "kernel/drivers/block/virtio_blk.ko",
            ],
            &[],
        )?;
        let init = format!(
            "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\nmount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n{insmods}\nwhile [ ! -b /dev/vda ]; do sleep 0.2; done\necho VM-READY\n. /workload.sh\npoweroff -f\n"
        );
        write_exec(&root.join("init"), &init)?;
        std::fs::write(root.join("workload.sh"), script).map_err(|e| e.to_string())?;
        let initrd = work.join("initrd.cpio");
        Self::pack(&root, &initrd)?;
        let _ = std::fs::remove_dir_all(&root);
        Ok(initrd)
    }
}

pub fn write_exec(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).map_err(|e| e.to_string())?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())
}

/// The guest workload: round r first checks that every block still holds round r-1
/// (written before — across a migration, by the other host), then writes block i as
/// "HANDOFF gen=r block=i" with O_DIRECT, syncs, and reads every block back with O_DIRECT
/// against r. Only the guest's memory knows r. Prints `ROUND r VERIFIED` or what failed.
pub fn workload_script(blocks: u32) -> String {
    format!(
        r#"N={blocks}
r=0
check() {{
  i=0
  bad=0
  while [ $i -lt $N ]; do
    got=$(dd if=/dev/vda bs=4096 skip=$i count=1 iflag=direct 2>/dev/null | head -n 1)
    want=$(printf 'HANDOFF gen=%08d block=%04d' $1 $i)
    [ "$got" = "$want" ] || {{ bad=$((bad+1)); echo "STALE round=$1 block=$i got=[$got]"; }}
    i=$((i+1))
  done
}}
while :; do
  if [ $r -gt 0 ]; then
    check $r
    [ $bad -eq 0 ] || echo "ROUND $r FAILED on re-read bad=$bad"
  fi
  r=$((r+1))
  i=0
  while [ $i -lt $N ]; do
    printf 'HANDOFF gen=%08d block=%04d\n' $r $i > /tmp/blk
    dd if=/tmp/blk of=/dev/vda bs=4096 seek=$i count=1 conv=sync,notrunc oflag=direct 2>/dev/null || echo "WRITE-ERROR round=$r block=$i"
    i=$((i+1))
  done
  sync
  check $r
  if [ $bad -eq 0 ]; then echo "ROUND $r VERIFIED"; else echo "ROUND $r FAILED bad=$bad"; fi
done
"#
    )
}

/// A QEMU guest whose disk is `disk`, its serial console captured line by line.
pub struct Vm {
    pub name: String,
    child: Child,
    qmp: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Vm {
    /// Boots `kernel` with `initrd` (or waits for an incoming migration on `incoming`).
    pub fn start(
        kernel: &Kernel,
        initrd: &Path,
        disk: &Path,
        dir: &Path,
        name: &str,
        incoming: Option<u16>,
    ) -> Result<Vm, String> {
        let qmp = dir.join(format!("qmp-{name}.sock"));
        let _ = std::fs::remove_file(&qmp);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "256"])
            .args([
                "-nodefaults",
                "-nographic",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&kernel.vmlinuz)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1 rdinit=/init"])
            .arg("-drive")
            // cache=none: the guest's writes reach the device, as KubeVirt configures
            // shared block disks for migration.
            .arg(format!(
                "file={},if=virtio,format=raw,cache=none,aio=threads,file.locking=off",
                disk.display()
            ))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if let Some(port) = incoming {
            cmd.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("qemu-system-x86_64: {e}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("piped");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !qmp.exists() {
            if Instant::now() > deadline {
                return Err(format!("QMP socket of {name} never appeared"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Vm {
            name: name.into(),
            child,
            qmp,
            lines,
        })
    }

    /// One QMP command on a fresh session; its answer (events skipped).
    pub fn qmp(&self, execute: &str, arguments: Value) -> Result<Value, String> {
        let s = UnixStream::connect(&self.qmp).map_err(|e| format!("QMP {}: {e}", self.name))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        let mut r = BufReader::new(s);
        let answer = |r: &mut BufReader<UnixStream>| -> Result<Value, String> {
            loop {
                let mut l = String::new();
                if r.read_line(&mut l).map_err(|e| e.to_string())? == 0 {
                    return Err("QMP closed".into());
                }
                let v: Value = serde_json::from_str(&l).map_err(|e| e.to_string())?;
                if v.get("event").is_none() {
                    return Ok(v);
                }
            }
        };
        answer(&mut r)?; // greeting
        writeln!(w, "{}", json!({"execute": "qmp_capabilities"})).map_err(|e| e.to_string())?;
        answer(&mut r)?;
        let mut cmd = json!({ "execute": execute });
        if !arguments.is_null() {
            cmd["arguments"] = arguments;
        }
        writeln!(w, "{cmd}").map_err(|e| e.to_string())?;
        answer(&mut r)
    }

    /// Migrates to a target listening on `port` (again while it does not listen yet);
    /// returns query-migrate's final answer.
    pub fn migrate(&self, port: u16, timeout: Duration) -> Result<Value, String> {
        for _ in 0..50 {
            let r = self.qmp("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
            if let Some(e) = r.get("error") {
                return Err(format!("migrate: {e}"));
            }
            let done = self.wait_migration(timeout)?;
            let refused = done["error-desc"]
                .as_str()
                .is_some_and(|e| e.contains("Connection refused"));
            if !refused {
                return Ok(done);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!("the target never listened on {port}"))
    }

    /// Polls query-migrate until the migration ends.
    pub fn wait_migration(&self, timeout: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.qmp("query-migrate", Value::Null)?;
            let status = r["return"]["status"].as_str().unwrap_or("").to_owned();
            if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
                return Ok(r["return"].clone());
            }
            if Instant::now() > deadline {
                return Err(format!("migration still {status} after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Rounds the guest verified so far, and any line reporting a failure.
    pub fn rounds(&self) -> (Vec<u64>, Vec<String>) {
        let lines = self.lines.lock();
        let verified = lines
            .iter()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("ROUND ")?
                    .strip_suffix(" VERIFIED")?
                    .parse()
                    .ok()
            })
            .collect();
        let failed = lines
            .iter()
            .filter(|l| l.contains("FAILED") || l.contains("STALE") || l.contains("WRITE-ERROR"))
            .cloned()
            .collect();
        (verified, failed)
    }

    pub fn last_round(&self) -> u64 {
        self.rounds().0.last().copied().unwrap_or(0)
    }

    /// Waits for a verified round past `round`; an error on any failure line.
    pub fn wait_rounds_past(&self, round: u64, timeout: Duration) -> Result<u64, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let (verified, failed) = self.rounds();
            if !failed.is_empty() {
                return Err(format!("{}: {failed:?}", self.name));
            }
            if let Some(last) = verified.last().copied().filter(|r| *r > round) {
                return Ok(last);
            }
            if Instant::now() > deadline {
                let tail: Vec<String> = self.lines.lock().iter().rev().take(10).cloned().collect();
                return Err(format!(
                    "{}: no round past {round} verified within {timeout:?}: {tail:?}",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Ends QEMU now (a target killed mid-migration, or cleanup).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}
