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
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

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

pub mod fake_kube;

pub struct DriverOptions {
    pub mode: &'static str,
    pub node_id: String,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            mode: "all",
            node_id: "node-a".into(),
            extra_args: vec![],
            env: vec![],
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
        d.spawn().await;
        d
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("driver running").id()
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_handoff-csi"));
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
            .args(&self.options.extra_args)
            .envs(self.options.env.iter().cloned())
            .stdin(Stdio::null());
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
        let socket = self.socket.clone();
        Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    tokio::net::UnixStream::connect(socket)
                        .await
                        .map(TokioIo::new)
                }
            }))
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

    /// SIGKILL and start again on the same dirs: a crash and a restart.
    pub async fn crash_and_restart(&mut self) {
        if self.child.is_some() {
            self.stop(nix::sys::signal::Signal::SIGKILL);
        }
        self.spawn().await;
    }
}

/// Every mount under `root`, deepest first (so nested mounts go before their parents).
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts
}

/// Loop devices whose backing file lies under `root`.
pub fn loops_under(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
            if Path::new(backing.trim_end().trim_end_matches(" (deleted)")).starts_with(root) {
                found.push(PathBuf::from("/dev").join(name));
            }
        }
    }
    found
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop(nix::sys::signal::Signal::SIGKILL);
        }
        let root = std::fs::canonicalize(self.dir.path()).unwrap_or(self.dir.path().to_path_buf());
        for m in mounts_under(&root) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        for dev in loops_under(&root) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
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

/// A 4 KiB-aligned buffer, as O_DIRECT requires.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size checked by Layout users; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, len }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

/// A deterministic pattern for block `index`, so a read can be checked without a copy.
pub fn fill_pattern(buf: &mut [u8], seed: u64, index: u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let v = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64);
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
}

pub fn open_direct(path: &Path, write: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}
