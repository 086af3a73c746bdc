//! Test harness: runs the real `handoff-csi` binary on a private socket with its own
//! data and state dirs, hands out gRPC clients, and cleans up every mount and loop
//! device under its temp dir when dropped, even when the test failed.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use handoff_csi::csi;
use handoff_csi::csi::controller_client::ControllerClient;
use handoff_csi::csi::identity_client::IdentityClient;
use handoff_csi::csi::node_client::NodeClient;
use tonic::transport::Channel;

pub const MIB: i64 = 1 << 20;

/// Privileged tests need root for loop devices and mounts. CI runs as root. Elsewhere
/// they fail loudly, unless HANDOFF_ALLOW_UNPRIVILEGED_SKIP=1 turns that into a printed skip.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let msg =
        format!("{test}: needs root (loop devices, mkfs, mount); run the suite as root as CI does");
    if std::env::var("HANDOFF_ALLOW_UNPRIVILEGED_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIPPED {msg}");
        return false;
    }
    panic!("{msg}, or set HANDOFF_ALLOW_UNPRIVILEGED_SKIP=1 to skip privileged tests");
}

pub mod attacher;
pub mod fake_kube;
pub mod kernel_lab;
pub mod kubevirt_sim;
pub mod lab_steps;
pub mod netns;
pub mod routeros;
pub mod steps;

pub struct DriverOptions {
    pub mode: &'static str,
    pub node_id: String,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A data dir shared with other drivers (multi-node tests); default: private.
    pub data_dir: Option<PathBuf>,
    /// Network namespace to run in (a test host of a NetLab).
    pub netns: Option<String>,
    /// Node ids registered on the data dir before start, as if their node plugins ran
    /// there (a standalone controller refuses nodes that never registered).
    pub known_nodes: Vec<&'static str>,
    /// Runs the driver in a mount namespace of its own with this NFS mount (source,
    /// target, options) over the host's: another machine's view of the same share.
    pub own_nfs_mount: Option<(String, PathBuf, String)>,
    /// Runs the driver chrooted into this root filesystem (an unpacked image), with the
    /// driver's own dir bound in at the same path so every path means the same inside.
    pub chroot: Option<PathBuf>,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            mode: "all",
            node_id: "node-a".into(),
            extra_args: vec![],
            env: vec![],
            data_dir: None,
            netns: None,
            known_nodes: vec!["node-a", "node-b", "node-c"],
            own_nfs_mount: None,
            chroot: None,
        }
    }
}

pub struct Driver {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Option<Child>,
    options: DriverOptions,
}

impl Driver {
    pub async fn start() -> Driver {
        Self::start_with(DriverOptions::default()).await
    }

    pub async fn start_with(options: DriverOptions) -> Driver {
        let dir = tempfile::Builder::new()
            .prefix("handoff-test-")
            .tempdir()
            .expect("temp dir");
        let socket = dir.path().join("csi.sock");
        let mut d = Driver {
            dir,
            socket,
            child: None,
            options,
        };
        let known = d.options.known_nodes.clone();
        d.register_nodes(&known);
        d.spawn().await;
        d
    }

    /// The driver's dir as the host sees it inside the chroot's root filesystem.
    pub fn chrooted_dir(&self) -> Option<PathBuf> {
        let root = self.options.chroot.as_ref()?;
        Some(root.join(self.dir.path().strip_prefix("/").unwrap()))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.options
            .data_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Registers node ids as if their node plugins had started on this data dir (the
    /// standalone controller refuses to publish to a node that never registered).
    pub fn register_nodes(&self, ids: &[&str]) {
        let registry = handoff_csi::registry::NodeRegistry::new(
            handoff_csi::registry::NodeRegistry::default_dir(&self.data_dir()),
        );
        for id in ids {
            registry
                .register(&handoff_csi::ids::NodeId::parse(id).unwrap())
                .unwrap();
        }
    }

    pub fn node_id(&self) -> &str {
        &self.options.node_id
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("driver running").id()
    }

    async fn spawn(&mut self) {
        // Chrooted, the image's own binary runs (the path is resolved after the chroot).
        let program = match &self.options.chroot {
            Some(_) => Path::new("/usr/local/bin/handoff-csi"),
            None => Path::new(env!("CARGO_BIN_EXE_handoff-csi")),
        };
        let mut cmd = Command::new(program);
        cmd.arg("--mode")
            .arg(self.options.mode)
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--node-id")
            .arg(&self.options.node_id)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--log-level")
            .arg("error")
            .arg("--kubelet-dir")
            .arg(self.dir.path())
            .args(&self.options.extra_args)
            .args(
                (!self.options.extra_args.iter().any(|a| a == "--nbd-run-dir"))
                    .then(|| ["--nbd-run-dir".into(), self.dir.path().join("nbd")])
                    .into_iter()
                    .flatten()
                    .collect::<Vec<PathBuf>>(),
            )
            .envs(self.options.env.iter().cloned())
            .stdin(Stdio::null());
        if let Some(ns) = &self.options.netns {
            netns::enter(&mut cmd, ns);
        }
        if let Some(root) = self.options.chroot.clone() {
            use std::os::unix::process::CommandExt;
            let inside = self.chrooted_dir().unwrap();
            if !mounts_under(&inside).contains(&inside) {
                std::fs::create_dir_all(&inside).unwrap();
                nix::mount::mount(
                    Some(self.dir.path()),
                    &inside,
                    None::<&str>,
                    nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
                    None::<&str>,
                )
                .expect("bind the driver's dir into the image");
            }
            // SAFETY: chroot and chdir run in the child between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::unistd::chroot(&root)?;
                    nix::unistd::chdir("/")?;
                    Ok(())
                });
            }
        }
        if let Some((source, target, opts)) = self.options.own_nfs_mount.clone() {
            use nix::mount::{mount, MsFlags};
            use std::os::unix::process::CommandExt;
            // SAFETY: unshare and mount run in the child between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
                    mount(
                        None::<&str>,
                        "/",
                        None::<&str>,
                        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                        None::<&str>,
                    )?;
                    mount(
                        Some(source.as_str()),
                        &target,
                        Some("nfs4"),
                        MsFlags::empty(),
                        Some(opts.as_str()),
                    )?;
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn handoff-csi");
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("handoff-csi exited during start-up with {status}");
            }
            if tokio::net::UnixStream::connect(&self.socket).await.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "driver socket never came up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn channel(&self) -> Channel {
        handoff_csi::client::connect(&self.socket)
            .await
            .expect("connect to driver socket")
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    /// Sends a signal and waits for the process to exit; returns its status.
    pub fn stop(&mut self, signal: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("driver running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Starts the process again if it died (a crash harness killed it).
    pub async fn ensure_running(&mut self) {
        if !self.is_running() {
            self.child = None;
            self.spawn().await;
        }
    }

    /// SIGKILL and start again on the same dirs: a crash and a restart.
    pub async fn crash_and_restart(&mut self) {
        if self.child.is_some() {
            self.stop(nix::sys::signal::Signal::SIGKILL);
        }
        self.spawn().await;
    }
}

#[allow(unused_imports)]
pub use handoff_csi::demo::loops_backed_under as loops_under;

/// Every mount under `root`.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect()
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop(nix::sys::signal::Signal::SIGKILL);
        }
        if let Some(inside) = self.chrooted_dir() {
            // What the driver attached and mounted inside the image, then the bind (the
            // loop devices first: their paths are only ours while the bind is there).
            handoff_csi::demo::detach_loops_under(&inside);
            handoff_csi::demo::release_kernel_resources(&inside);
            let _ = nix::mount::umount2(&inside, nix::mount::MntFlags::MNT_DETACH);
        }
        let root = std::fs::canonicalize(self.dir.path()).unwrap_or(self.dir.path().to_path_buf());
        handoff_csi::demo::release_kernel_resources(&root);
        if let Some(data) = &self.options.data_dir {
            handoff_csi::demo::release_kernel_resources(data);
        }
    }
}

pub fn block_cap(mode: csi::volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Block(
            csi::volume_capability::BlockVolume {},
        )),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn mount_cap(
    mode: csi::volume_capability::access_mode::Mode,
    fs_type: &str,
) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: fs_type.into(),
                ..Default::default()
            },
        )),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn rwo_block() -> csi::VolumeCapability {
    block_cap(csi::volume_capability::access_mode::Mode::SingleNodeWriter)
}

pub fn rwo_mount(fs: &str) -> csi::VolumeCapability {
    mount_cap(
        csi::volume_capability::access_mode::Mode::SingleNodeWriter,
        fs,
    )
}

pub fn create_request(
    name: &str,
    bytes: i64,
    cap: csi::VolumeCapability,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        parameters: HashMap::new(),
        ..Default::default()
    }
}

pub fn publish_request(
    volume_id: &str,
    node_id: &str,
    cap: csi::VolumeCapability,
) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node_id.into(),
        volume_capability: Some(cap),
        readonly: false,
        ..Default::default()
    }
}

pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// A controller and node plugins as separate processes on one shared data dir: several
/// "nodes" on one machine, the stand-in for a cluster on shared storage.
pub struct LocalCluster {
    pub controller: Driver,
    pub nodes: Vec<Driver>,
    // Declared last: dropped after the drivers have released their devices.
    pub shared: tempfile::TempDir,
}

impl LocalCluster {
    pub async fn start(node_names: &[&str], controller_args: Vec<String>) -> LocalCluster {
        Self::start_with(node_names, controller_args, vec![]).await
    }

    /// `node_args` go to every node plugin.
    pub async fn start_with(
        node_names: &[&str],
        controller_args: Vec<String>,
        node_args: Vec<String>,
    ) -> LocalCluster {
        let shared = tempfile::Builder::new()
            .prefix("handoff-test-shared-")
            .tempdir()
            .unwrap();
        let data = std::fs::canonicalize(shared.path()).unwrap().join("data");
        let controller = Driver::start_with(DriverOptions {
            mode: "controller",
            node_id: "controller".into(),
            extra_args: controller_args,
            data_dir: Some(data.clone()),
            ..Default::default()
        })
        .await;
        let mut nodes = Vec::new();
        for name in node_names {
            nodes.push(
                Driver::start_with(DriverOptions {
                    mode: "node",
                    node_id: name.to_string(),
                    data_dir: Some(data.clone()),
                    extra_args: node_args.clone(),
                    ..Default::default()
                })
                .await,
            );
        }
        LocalCluster {
            controller,
            nodes,
            shared,
        }
    }

    pub fn node(&self, name: &str) -> &Driver {
        self.nodes
            .iter()
            .find(|d| d.node_id() == name)
            .expect("node started")
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Driver {
        self.nodes
            .iter_mut()
            .find(|d| d.node_id() == name)
            .expect("node started")
    }

    /// The controller's persisted attachment state of `volume`, as JSON.
    pub fn stored_state(&self, volume: &str) -> Option<serde_json::Value> {
        let path = self
            .controller
            .state_dir()
            .join("attachments")
            .join(format!("{volume}.json"));
        let bytes = std::fs::read(path).ok()?;
        Some(serde_json::from_slice(&bytes).unwrap())
    }
}

pub fn stored_nodes(state: &serde_json::Value) -> Vec<String> {
    state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap().to_owned())
        .collect()
}

/// A free TCP port on loopback for a metrics endpoint.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET over plain HTTP/1.1; returns (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// A seeded xorshift generator: fuzz and crash harnesses replay a failure from its seed.
pub struct Rng(u64);

#[allow(dead_code)]
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}
