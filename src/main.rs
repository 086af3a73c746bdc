//! The composition root: parse the config, build the real implementations of every
//! trait, and serve until SIGTERM/SIGINT.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing::{error, info};

use std::time::Duration;

use handoff_csi::attachment::cluster::{ClusterView, RegisteredNodes, Standalone};
use handoff_csi::attachment::events::{EventSink, Fanout, LogSink};
use handoff_csi::attachment::fence::BackendFence;
use handoff_csi::attachment::report::{render_json, render_table};
use handoff_csi::attachment::store::AttachmentStore;
use handoff_csi::attachment::store::FileStore;
use handoff_csi::attachment::{
    spawn_reconciler, Always, AttachmentManager, BackgroundGate, Policy,
};
use handoff_csi::backend::file::FileBackend;
use handoff_csi::backend::open::BackendSettings;
use handoff_csi::backend::routeros::NQN_PREFIX as ROUTEROS_NQN_PREFIX;
use handoff_csi::backend::Backend;
use handoff_csi::config::{
    AttachmentStoreKind, AttachmentsArgs, Cli, Command, Config, DemoScenario, LogFormat, Mode,
    NbdClientArgs, OutputFormat, TargetArgs,
};
use handoff_csi::controller::ControllerService;
use handoff_csi::identity::{HealthCheck, IdentityService};
use handoff_csi::ids::NodeId;
use handoff_csi::kube::cache::ClusterCache;
use handoff_csi::kube::cluster::KubeCluster;
use handoff_csi::kube::events::KubeEvents;
use handoff_csi::kube::kubevirt::KubevirtCache;
use handoff_csi::kube::lease::BackgroundLease;
use handoff_csi::kube::pv_store::{PvStore, RetryPolicy};
use handoff_csi::metrics::{self, Metrics};
use handoff_csi::nbd::node::fuse_disk::{self, FuseDisk, Remote};
use handoff_csi::nbd::target::authority::{AttachmentAuthority, ExportKey};
use handoff_csi::nbd::target::fence::{Fencer, RemoteFencer};
use handoff_csi::nbd::target::server::NbdTarget;
use handoff_csi::nbd::{NbdPlane, NbdPlaneBackend};
use handoff_csi::node::command::CommandRunner;
use handoff_csi::node::lifecycle::NodeVolumes;
use handoff_csi::node::mount::SysMounter;
use handoff_csi::node::transport::dispatch::DataPlanes;
use handoff_csi::node::transport::loopdev::{LoopPaths, LoopTransport};
use handoff_csi::node::transport::nbd::{Launcher, NbdTransport};
use handoff_csi::node::transport::nvme::{DevFabrics, HostIdentity, NvmePaths, NvmeTransport};
use handoff_csi::node::transport::Transport;
use handoff_csi::server::{self, Services};
use handoff_csi::service::node::NodeService;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn init_tracing(config: &Config) -> Result<(), BoxError> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

/// Resolves once SIGTERM or SIGINT arrives.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "shutting down: finishing in-flight RPCs");
}

/// Sysfs reports resolved paths, so the data dir is compared in canonical form.
fn canonical(dir: &Path) -> std::path::PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

type Seams = (
    Arc<dyn AttachmentStore>,
    Arc<dyn ClusterView>,
    Arc<dyn EventSink>,
    Arc<dyn BackgroundGate>,
);

/// The PV-annotation store over synced watch caches (controller, target, `attachments`).
async fn pv_store(
    driver: &str,
    sync: Duration,
) -> Result<(kube::Client, Arc<ClusterCache>, Arc<PvStore>), BoxError> {
    let client = kube::Client::try_default().await?;
    let cache = ClusterCache::new(driver);
    cache.spawn_watches(client.clone());
    info!("waiting for PersistentVolume, Node and VolumeAttachment watches to sync");
    if !cache.wait_ready(sync).await {
        return Err(format!("Kubernetes watches did not sync within {sync:?}; check RBAC (get/list/watch on persistentvolumes, nodes, volumeattachments)").into());
    }
    let store = Arc::new(PvStore::new(
        kube::Api::all(client.clone()),
        cache.clone(),
        RetryPolicy::default(),
    ));
    Ok((client, cache, store))
}

/// The attachment store, cluster view and event sinks for the chosen mode.
async fn attachment_seams(config: &Config, metrics: &Metrics) -> Result<Seams, BoxError> {
    let mut sinks: Vec<Arc<dyn EventSink>> = vec![Arc::new(metrics.clone()), Arc::new(LogSink)];
    match config.attachment_store {
        AttachmentStoreKind::File => {
            let store = Arc::new(FileStore::open(&config.state_dir)?);
            let cluster: Arc<dyn ClusterView> = match config.registry() {
                Some(registry) => Arc::new(RegisteredNodes(registry)),
                None => Arc::new(Standalone),
            };
            Ok((store, cluster, Arc::new(Fanout(sinks)), Arc::new(Always)))
        }
        AttachmentStoreKind::Kube => {
            let (client, cache, store) =
                pv_store(&config.driver_name, Duration::from_secs(120)).await?;
            let kubevirt = KubevirtCache::new(config.kubevirt_completion_timeout_per_gib);
            kubevirt.spawn(client.clone());
            sinks.push(Arc::new(
                KubeEvents::new(client.clone(), cache.clone(), "handoff-csi")
                    .with_kubevirt(kubevirt.clone()),
            ));
            let lease = BackgroundLease::new(
                kube::Api::namespaced(client.clone(), &config.lease_namespace),
                config.lease_identity.clone(),
                config.lease_duration,
            );
            lease.spawn();
            Ok((
                store,
                Arc::new(KubeCluster::new(cache, kubevirt, client)),
                Arc::new(Fanout(sinks)),
                lease,
            ))
        }
    }
}

/// Serves NBD for published volumes until the process ends; re-checks live connections.
async fn serve_target(
    listen: std::net::SocketAddr,
    store: Arc<dyn AttachmentStore>,
    backend: Arc<dyn Backend>,
    key: Arc<ExportKey>,
) -> Result<Arc<NbdTarget>, BoxError> {
    let target = NbdTarget::new(Arc::new(AttachmentAuthority::new(store, backend, key)));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("NBD listen {listen}: {e}"))?;
    info!(%listen, "NBD target listening");
    tokio::spawn(target.clone().serve(listener, std::future::pending()));
    target.spawn_revalidation(Duration::from_secs(2));
    Ok(target)
}

/// The controller's NBD plane: a target in this process (`--nbd-listen`), or one on a
/// storage host (`--nbd-target`) fenced over HTTP with the shared key.
async fn nbd_plane(
    config: &Config,
    store: Arc<dyn AttachmentStore>,
    backend: Arc<dyn Backend>,
) -> Result<Option<Arc<NbdPlane>>, BoxError> {
    let key_file = config
        .nbd_key_file
        .clone()
        .unwrap_or_else(|| config.state_dir.join("nbd-export.key"));
    let (target, advertise, key): (Arc<dyn Fencer>, String, Arc<ExportKey>) =
        match (config.nbd_listen, &config.nbd_target) {
            (None, None) => return Ok(None),
            (Some(listen), _) => {
                if let Some(dir) = key_file.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let key = Arc::new(
                    ExportKey::load_or_create(&key_file)
                        .map_err(|e| format!("NBD key {}: {e}", key_file.display()))?,
                );
                let target = serve_target(listen, store, backend, key.clone()).await?;
                let advertise = config
                    .nbd_advertise
                    .clone()
                    .unwrap_or_else(|| listen.to_string());
                (target, advertise, key)
            }
            (None, Some(remote)) => {
                let key = Arc::new(ExportKey::load(&key_file).map_err(|e| {
                    format!(
                        "NBD key {} (shared with the target): {e}",
                        key_file.display()
                    )
                })?);
                let advertise = config
                    .nbd_advertise
                    .clone()
                    .ok_or("--nbd-target needs --nbd-advertise")?;
                (
                    Arc::new(RemoteFencer::new(remote.clone(), key.clone())),
                    advertise,
                    key,
                )
            }
        };
    Ok(Some(Arc::new(NbdPlane {
        target,
        key,
        advertise,
    })))
}

/// `handoff-csi target`: the NBD target on a storage host, with its fence endpoint.
async fn run_target(args: TargetArgs) -> Result<(), BoxError> {
    let backend: Arc<dyn Backend> = Arc::new(FileBackend::open(&args.data_dir)?);
    let store: Arc<dyn AttachmentStore> = match args.attachment_store {
        AttachmentStoreKind::File => Arc::new(FileStore::open(&args.state_dir)?),
        AttachmentStoreKind::Kube => {
            pv_store(&args.driver_name, Duration::from_secs(120))
                .await?
                .2
        }
    };
    let key = Arc::new(ExportKey::load(&args.nbd_key_file).map_err(|e| {
        format!(
            "--nbd-key-file {}: {e} (copy the controller's key)",
            args.nbd_key_file.display()
        )
    })?);
    let target = serve_target(args.listen, store, backend, key.clone()).await?;
    let fence = tokio::net::TcpListener::bind(args.fence_listen)
        .await
        .map_err(|e| format!("--fence-listen {}: {e}", args.fence_listen))?;
    info!(listen = %args.fence_listen, "fence endpoint listening");
    axum::serve(fence, handoff_csi::nbd::target::fence::router(target, key))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

/// The node's NVMe/TCP transport, for volumes of the nvmet and rds backends. Without a
/// stable host identity it is left out (and said so): connecting with a made-up one
/// would never match target ACLs.
fn nvme_transport(config: &Config, node_id: &NodeId) -> Option<Arc<dyn Transport>> {
    let n = &config.nvme;
    let own_dir = n
        .nvme_host_dir
        .clone()
        .unwrap_or_else(|| config.state_dir.join("nvme"));
    let host = match HostIdentity::load_or_create(Path::new("/etc/nvme"), &own_dir) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(dir = %own_dir.display(), error = %e, "NVMe/TCP data plane disabled on this node: no host identity");
            return None;
        }
    };
    info!(host_nqn = %host.nqn, "NVMe/TCP data plane ready (needs the nvme-tcp kernel module at connect time)");
    Some(Arc::new(
        NvmeTransport::new(
            NvmePaths::default(),
            Arc::new(DevFabrics("/dev/nvme-fabrics".into())),
            host,
            &[n.nvme_nqn_prefix.as_str(), ROUTEROS_NQN_PREFIX],
            n.nvme_connect_timeout,
        )
        .with_own_host(handoff_csi::export::node_host_nqn(node_id)),
    ))
}

/// The Controller service: the backend (wrapped by the NBD plane when it runs), the
/// attachment manager over its store and cluster, and the reconciler.
async fn controller_service(
    config: &Config,
    metrics: &Metrics,
    checks: &mut Vec<HealthCheck>,
) -> Result<ControllerService, BoxError> {
    let backend = handoff_csi::backend::open::open(BackendSettings::try_from(config)?)?;
    let (store, cluster, events, gate) = attachment_seams(config, metrics).await?;
    let nbd = nbd_plane(config, store.clone(), backend.clone()).await?;
    let policy = Policy {
        grace_period: config.attach_grace_period,
        allow_rwx_block_sharing: config.allow_rwx_block_sharing,
    };
    // Volumes on the NBD plane are exported and fenced by its target.
    let backend: Arc<dyn Backend> = match nbd {
        Some(plane) => Arc::new(NbdPlaneBackend::new(backend, plane)),
        None => backend,
    };
    let fence = Arc::new(BackendFence::new(backend.clone()));
    let attachments = Arc::new(
        AttachmentManager::load(store, cluster, events, policy)
            .await?
            .with_fence(fence),
    );
    spawn_reconciler(attachments.clone(), config.reconcile_interval, gate.clone());
    spawn_state_gauges(
        attachments.clone(),
        gate,
        metrics.clone(),
        config.reconcile_interval,
    );
    checks.push(HealthCheck::Backend(backend.clone()));
    let service = ControllerService::new(
        backend.clone(),
        attachments.clone(),
        metrics.clone(),
        config.topology_pool.clone(),
    );
    Ok(service)
}

/// The Node service: the node's transports (file, NBD, NVMe/TCP), its mounts and its
/// registration.
fn node_service(
    config: &Config,
    node_id: &NodeId,
    metrics: &Metrics,
    checks: &mut Vec<HealthCheck>,
) -> Result<NodeService, BoxError> {
    // The node does not create the data dir: on a cluster it is a shared filesystem,
    // and creating it locally would hide a missing mount (Probe reports it instead).
    let file: Arc<dyn Transport> = Arc::new(LoopTransport::new(
        &canonical(&config.data_dir),
        LoopPaths::default(),
        node_id.as_str(),
    ));
    let nbd = NbdTransport::new(
        &config.nbd_run_dir,
        LoopPaths::default(),
        node_id.as_str(),
        std::env::current_exe()?,
        config.nbd_io_timeout,
        match &config.nbd_keeper_socket {
            Some(socket) => Launcher::Keeper(socket.clone()),
            None => Launcher::Direct,
        },
        config.nbd_client.into(),
    )
    .map(|t| Arc::new(t) as Arc<dyn Transport>)
    .map_err(|e| {
        tracing::warn!(run_dir = %config.nbd_run_dir.display(), error = %e, "NBD data plane disabled on this node")
    })
    .ok();
    let mut planes = DataPlanes::new(file, nbd);
    if let Some(nvme) = nvme_transport(config, node_id) {
        planes = planes.with_nvme(nvme);
    }
    let transport: Arc<dyn Transport> = Arc::new(planes);
    let mounter = Arc::new(
        SysMounter::new(CommandRunner::new(config.tool_timeout)).confined_to(&config.kubelet_dir),
    );
    checks.push(HealthCheck::Transport(transport.clone()));
    let volumes = NodeVolumes::new(transport, mounter, config.max_concurrent_stage);
    let registry = config.registry();
    if let Some(registry) = &registry {
        registry.register(node_id).map_err(|e| {
            format!(
                "registering node {node_id} in {} (--node-registry): {e}",
                registry.dir().display()
            )
        })?;
    }
    Ok(NodeService::new(
        node_id.clone(),
        volumes,
        metrics.clone(),
        config.topology_pool.clone(),
        &config.kubelet_dir,
    )
    .with_registry(registry))
}

/// Keeps the state gauges current every `interval`: volumes published per node (from
/// the attachment state, for the node-plugin-down alert) and whether this replica holds
/// the background lease.
fn spawn_state_gauges(
    attachments: Arc<AttachmentManager>,
    gate: Arc<dyn BackgroundGate>,
    metrics: Metrics,
    interval: Duration,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            metrics.set_leader(gate.may_act());
            match attachments.snapshot().await {
                Ok(states) => {
                    let mut per_node = std::collections::BTreeMap::new();
                    for node in states.iter().flat_map(|s| s.node_ids()) {
                        *per_node.entry(node.to_string()).or_insert(0) += 1;
                    }
                    metrics.set_attached_volumes(&per_node);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "attachment state unreadable; attached_volumes keeps its last values")
                }
            }
        }
    });
}

async fn run(config: Config, node_id: NodeId) -> Result<(), BoxError> {
    let metrics = Metrics::new();
    metrics.identify(
        match config.mode {
            Mode::Controller => "controller",
            Mode::Node => "node",
            Mode::All => "all",
        },
        node_id.as_str(),
    );
    let mut checks = Vec::new();

    let controller = if config.mode.serves_controller() {
        Some(controller_service(&config, &metrics, &mut checks).await?)
    } else {
        None
    };
    let node = if config.mode.serves_node() {
        Some(node_service(&config, &node_id, &metrics, &mut checks)?)
    } else {
        None
    };

    let identity = IdentityService::new(
        config.driver_name.clone(),
        controller.is_some(),
        checks,
        metrics.clone(),
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    if let Some(addr) = config.metrics_addr {
        let (m, rx) = (metrics.clone(), stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, m, stopped(rx)).await {
                error!(%addr, error = %e, "metrics endpoint failed");
            }
        });
    }

    info!(
        mode = ?config.mode,
        node_id = %node_id,
        driver = %config.driver_name,
        data_dir = %config.data_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "handoff-csi starting"
    );
    metrics.set_ready(true);
    let services = Services {
        identity,
        controller,
        node,
    };
    server::serve(
        &config.endpoint,
        config.socket_mode,
        services,
        stopped(stop_rx),
        server::DRAIN_GRACE,
    )
    .await?;
    Ok(())
}

/// `handoff-csi attachments`: the table, read from the same store the controller uses.
async fn print_attachments(args: AttachmentsArgs) -> Result<(), BoxError> {
    let states = match args.store {
        AttachmentStoreKind::File => FileStore::open(&args.state_dir)?.load_all().await?,
        AttachmentStoreKind::Kube => {
            let (_, _, store) = pv_store(&args.driver_name, Duration::from_secs(60)).await?;
            store.load_all().await?
        }
    };
    let now = chrono::Utc::now();
    match args.output {
        OutputFormat::Table => print!("{}", render_table(&states, now)),
        OutputFormat::Json => println!("{}", render_json(&states, now)),
    }
    Ok(())
}

/// `handoff-csi nbd-client`: serves the export through FUSE until unmounted, or drives
/// the kernel's nbd device until it is disconnected.
fn nbd_client(args: NbdClientArgs) -> Result<(), BoxError> {
    let mut export = String::new();
    std::io::stdin().read_line(&mut export)?;
    let export = export.trim().to_owned();
    if export.is_empty() {
        return Err("nbd-client reads the export name from standard input; got nothing".into());
    }
    let remote = Remote {
        address: args.address,
        export,
        io_timeout: args.io_timeout,
    };
    if let Some(backend) = args.kernel_backend {
        handoff_csi::nbd::node::kernel::check_backend(&backend)?;
        let supervise = handoff_csi::nbd::node::kernel::Supervise {
            remote,
            backend,
            read_only: args.read_only,
            files: handoff_csi::nbd::node::kernel::SupervisorFiles::new(&args.mountpoint),
            sys: handoff_csi::nbd::node::kernel::SysBlock::default(),
        };
        return Ok(supervise.run()?);
    }
    let disk = FuseDisk::connect(remote)?;
    info!(mountpoint = %args.mountpoint.display(), "NBD export connected; serving it through FUSE");
    fuse_disk::serve(disk, &args.mountpoint)?;
    Ok(())
}

fn run_command(command: Command) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the async runtime");
    let result: Result<(), BoxError> = runtime.block_on(async {
        match command {
            Command::Demo {
                scenario: DemoScenario::Migration { blocks, vm, hops },
            } => {
                let binary = std::env::current_exe()?;
                if vm {
                    handoff_csi::demo::vm::migration(&binary, hops)
                        .await
                        .map(drop)
                } else {
                    handoff_csi::demo::migration(&binary, blocks)
                        .await
                        .map(drop)
                }
            }
            Command::Attachments(args) => print_attachments(args).await,
            Command::Target(args) => run_target(args).await,
            Command::NbdKeeper(args) => {
                let binary = std::env::current_exe()?;
                Ok(
                    handoff_csi::nbd::node::keeper::serve(&args.socket, &args.run_dir, binary)
                        .await?,
                )
            }
            Command::NbdClient(args) => {
                tokio::task::spawn_blocking(move || nbd_client(args)).await?
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handoff-csi: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        if matches!(
            command,
            Command::NbdClient(_) | Command::Target(_) | Command::NbdKeeper(_)
        ) {
            // A long-running helper: its reconnects and fencing are worth a log line.
            let _ = init_tracing(&cli.server);
        }
        return run_command(command);
    }
    let config = cli.server;
    let node_id = match config.validate() {
        Ok(id) => id,
        Err(msg) => {
            eprintln!("handoff-csi: {msg}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = init_tracing(&config) {
        eprintln!("handoff-csi: --log-level: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("handoff-csi: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, node_id)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "handoff-csi failed");
            ExitCode::FAILURE
        }
    }
}
