//! An in-process fake Kubernetes API server for the objects the driver uses
//! (PersistentVolumes, Nodes, VolumeAttachments, Events, Pods, and KubeVirt's VMIs and
//! migrations once `install_kubevirt` registers them for discovery). It honours resourceVersion
//! (409 on a stale guarded write), JSON merge patch, list + watch (replayed from its
//! history), 404, and injectable faults: 409 storms, 500s, latency, dropped watches.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::broadcast;

#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// The next N PATCH requests answer 409 Conflict.
    pub conflicts: usize,
    /// The next N non-watch requests answer 500.
    pub server_errors: usize,
    /// Added before every non-watch answer.
    pub latency: Duration,
    /// Per resource: every watch event of it is delivered this much later (in order),
    /// as from an API server whose watch cache lags under load.
    pub watch_lag: HashMap<String, Duration>,
    /// Resources whose watches deliver nothing while listed: a watch stuck silently
    /// (the connection stays open, no error, no bookmark).
    pub stalled: std::collections::HashSet<String>,
    /// The next N watches that resume from a resourceVersion answer 410 Gone ("too old
    /// resource version"), as when etcd compacted past it: the client must relist.
    pub expired_watches: usize,
}

type Key = (String, String, String); // resource, namespace, name

struct Inner {
    rv: AtomicU64,
    objects: Mutex<HashMap<Key, Value>>,
    history: Mutex<Vec<(u64, String, Value)>>,
    live: broadcast::Sender<(u64, String, Value)>,
    faults: Mutex<Faults>,
    patches: AtomicU64,
    /// Bumped to end every open watch (a dropped connection).
    watch_epoch: tokio::sync::watch::Sender<u64>,
    /// Every request as (method, path, query), to check RBAC against real calls.
    requests: Mutex<Vec<(String, String, String)>>,
    /// Whether kubevirt.io/v1 answers discovery.
    kubevirt: std::sync::atomic::AtomicBool,
    /// Whether resourceVersions are written as opaque tokens (see `render_rv`).
    opaque_rv: std::sync::atomic::AtomicBool,
}

#[derive(Clone)]
pub struct FakeKube {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    _shutdown: Arc<tokio::sync::oneshot::Sender<()>>,
}

fn kind_of(resource: &str) -> (&'static str, &'static str) {
    match resource {
        "persistentvolumes" => ("v1", "PersistentVolume"),
        "nodes" => ("v1", "Node"),
        "volumeattachments" => ("storage.k8s.io/v1", "VolumeAttachment"),
        "csinodes" => ("storage.k8s.io/v1", "CSINode"),
        "events" => ("v1", "Event"),
        "pods" => ("v1", "Pod"),
        "virtualmachineinstances" => ("kubevirt.io/v1", "VirtualMachineInstance"),
        "virtualmachineinstancemigrations" => ("kubevirt.io/v1", "VirtualMachineInstanceMigration"),
        "leases" => ("coordination.k8s.io/v1", "Lease"),
        _ => ("v1", "Unknown"),
    }
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

/// core/v1 validation limits the fake enforces as the API server does (422 Invalid).
const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;
const MAX_EVENT_NOTE_BYTES: usize = 1024;

fn validate(resource: &str, obj: &Value) -> Option<Response> {
    let annotations: usize = obj["metadata"]["annotations"]
        .as_object()
        .map(|a| {
            a.iter()
                .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
                .sum()
        })
        .unwrap_or(0);
    if annotations > MAX_ANNOTATIONS_BYTES {
        return Some(status(
            422,
            "Invalid",
            format!(
                "metadata.annotations: Too long: must have at most {MAX_ANNOTATIONS_BYTES} bytes"
            ),
        ));
    }
    if resource == "events" && !obj["eventTime"].is_null() {
        let note = obj["message"].as_str().map_or(0, str::len);
        if note > MAX_EVENT_NOTE_BYTES {
            return Some(status(
                422,
                "Invalid",
                format!("note: Too long: may not be more than {MAX_EVENT_NOTE_BYTES} bytes"),
            ));
        }
    }
    None
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Prefix of an opaque resourceVersion token.
const OPAQUE_RV: &str = "opaque.";

impl Inner {
    fn next_rv(&self) -> u64 {
        self.rv.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// A resourceVersion as clients see it. The API server promises nothing about its
    /// form: in opaque mode it is `opaque.` + a countdown, so it parses as no number and
    /// each new version sorts *before* the older ones (a client that orders them by
    /// their text keeps the oldest).
    fn render_rv(&self, rv: u64) -> String {
        if self.opaque_rv.load(Ordering::SeqCst) {
            format!("{OPAQUE_RV}{:020}", u64::MAX - rv)
        } else {
            rv.to_string()
        }
    }

    /// The revision a client's resourceVersion names (None: not one this server wrote).
    fn parse_rv(&self, token: &str) -> Option<u64> {
        match token.strip_prefix(OPAQUE_RV) {
            Some(countdown) if self.opaque_rv.load(Ordering::SeqCst) => {
                countdown.parse::<u64>().ok().map(|c| u64::MAX - c)
            }
            _ if self.opaque_rv.load(Ordering::SeqCst) => None,
            _ => token.parse().ok(),
        }
    }

    fn record(&self, resource: &str, kind: &str, obj: &Value, rv: u64) {
        let event = json!({"type": kind, "object": obj});
        self.history
            .lock()
            .push((rv, resource.to_owned(), event.clone()));
        let _ = self.live.send((rv, resource.to_owned(), event));
    }

    fn put(&self, resource: &str, ns: &str, mut obj: Value) -> Value {
        let (api_version, kind) = kind_of(resource);
        let rv = self.next_rv();
        let meta = obj["metadata"]
            .as_object_mut()
            .expect("object has metadata");
        if !meta.contains_key("name") {
            let prefix = meta
                .get("generateName")
                .and_then(Value::as_str)
                .unwrap_or("obj-")
                .to_owned();
            meta.insert("name".into(), json!(format!("{prefix}{rv}")));
        }
        meta.insert("resourceVersion".into(), json!(self.render_rv(rv)));
        meta.entry("uid").or_insert(json!(format!("uid-{rv}")));
        if !ns.is_empty() {
            meta.insert("namespace".into(), json!(ns));
        }
        obj["apiVersion"] = json!(api_version);
        obj["kind"] = json!(kind);
        let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
        let existed = self
            .objects
            .lock()
            .insert((resource.into(), ns.into(), name), obj.clone())
            .is_some();
        self.record(
            resource,
            if existed { "MODIFIED" } else { "ADDED" },
            &obj,
            rv,
        );
        obj
    }

    /// Applies the next injected fault for this kind of request, if any.
    async fn fault(&self, is_patch: bool) -> Option<Response> {
        let (latency, error, conflict) = {
            let mut f = self.faults.lock();
            let error = f.server_errors > 0;
            if error {
                f.server_errors -= 1;
            }
            let conflict = is_patch && !error && f.conflicts > 0;
            if conflict {
                f.conflicts -= 1;
            }
            (f.latency, error, conflict)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if error {
            return Some(status(500, "InternalError", "injected server error".into()));
        }
        if conflict {
            return Some(status(409, "Conflict", "injected conflict".into()));
        }
        None
    }
}

type Shared = State<Arc<Inner>>;

async fn list_or_watch(
    State(inner): Shared,
    UrlPath(resource): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    list_or_watch_ns(inner, resource, String::new(), q).await
}

async fn list_or_watch_in(
    State(inner): Shared,
    UrlPath((ns, resource)): UrlPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    list_or_watch_ns(inner, resource, ns, q).await
}

async fn list_or_watch_ns(
    inner: Arc<Inner>,
    resource: String,
    ns: String,
    q: HashMap<String, String>,
) -> Response {
    if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
        let asked = q
            .get("resourceVersion")
            .map(String::as_str)
            .filter(|v| !v.is_empty() && *v != "0");
        // A resourceVersion this server never wrote is one it cannot resume from.
        let unknown = asked.is_some_and(|v| inner.parse_rv(v).is_none());
        let since: u64 = asked.and_then(|v| inner.parse_rv(v)).unwrap_or(0);
        let expired = unknown
            || since > 0 && {
                let mut f = inner.faults.lock();
                let e = f.expired_watches > 0;
                if e {
                    f.expired_watches -= 1;
                }
                e
            };
        if expired {
            // What the API server sends: an ERROR event carrying a 410 Status.
            let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                "status": "Failure", "code": 410, "reason": "Expired",
                "message": format!("too old resource version: {}", asked.unwrap_or_default())}});
            return Response::builder()
                .header("content-type", "application/json")
                .body(Body::from(format!("{gone}\n")))
                .unwrap();
        }
        return watch(inner, resource, since);
    }
    if let Some(r) = inner.fault(false).await {
        return r;
    }
    let (api_version, kind) = kind_of(&resource);
    let objects = inner.objects.lock();
    let items: Vec<&Value> = objects
        .iter()
        .filter(|((r, n, _), _)| *r == resource && (ns.is_empty() || *n == ns))
        .map(|(_, v)| v)
        .collect();
    let rv = inner.render_rv(inner.rv.load(Ordering::SeqCst));
    axum::Json(
        json!({"apiVersion": api_version, "kind": format!("{kind}List"),
        "metadata": {"resourceVersion": rv}, "items": items}),
    )
    .into_response()
}

fn watch(inner: Arc<Inner>, resource: String, since: u64) -> Response {
    let resource_name = resource.clone();
    // Subscribe before reading history so nothing falls between the two.
    let live = inner.live.subscribe();
    let mut epoch = inner.watch_epoch.subscribe();
    let backlog: Vec<Value> = inner
        .history
        .lock()
        .iter()
        .filter(|(rv, r, _)| *rv > since && *r == resource)
        .map(|(_, _, e)| e.clone())
        .collect();
    let last_replayed = inner.rv.load(Ordering::SeqCst);
    let replay = futures::stream::iter(
        backlog
            .into_iter()
            .map(Ok::<Value, std::convert::Infallible>),
    );
    let live = futures::stream::unfold(live, move |mut rx| {
        let resource = resource.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok((rv, r, e)) if r == resource && rv > last_replayed.max(since) => {
                        return Some((Ok(e), rx))
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    let faults_of = inner.clone();
    let resource_of = resource_name.clone();
    let stream = replay
        .chain(live)
        .then(move |e| {
            let (inner, resource) = (faults_of.clone(), resource_of.clone());
            async move {
                let lag = inner.faults.lock().watch_lag.get(&resource).copied();
                if let Some(lag) = lag {
                    tokio::time::sleep(lag).await;
                }
                while inner.faults.lock().stalled.contains(&resource) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                e
            }
        })
        .map(|e| e.map(|v| Bytes::from(format!("{v}\n"))))
        .take_until(async move {
            let _ = epoch.changed().await;
        });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn get_one(
    State(inner): Shared,
    UrlPath((resource, name)): UrlPath<(String, String)>,
) -> Response {
    get_ns(inner, resource, String::new(), name).await
}

async fn get_in(
    State(inner): Shared,
    UrlPath((ns, resource, name)): UrlPath<(String, String, String)>,
) -> Response {
    get_ns(inner, resource, ns, name).await
}

async fn get_ns(inner: Arc<Inner>, resource: String, ns: String, name: String) -> Response {
    if let Some(r) = inner.fault(false).await {
        return r;
    }
    match inner
        .objects
        .lock()
        .get(&(resource.clone(), ns, name.clone()))
    {
        Some(obj) => axum::Json(obj.clone()).into_response(),
        None => status(404, "NotFound", format!("{resource} \"{name}\" not found")),
    }
}

async fn create(State(inner): Shared, UrlPath(resource): UrlPath<String>, body: Bytes) -> Response {
    create_ns(inner, resource, String::new(), body).await
}

async fn create_in(
    State(inner): Shared,
    UrlPath((ns, resource)): UrlPath<(String, String)>,
    body: Bytes,
) -> Response {
    create_ns(inner, resource, ns, body).await
}

async fn create_ns(inner: Arc<Inner>, resource: String, ns: String, body: Bytes) -> Response {
    if let Some(r) = inner.fault(false).await {
        return r;
    }
    let Ok(obj) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "body is not JSON".into());
    };
    if let Some(invalid) = validate(&resource, &obj) {
        return invalid;
    }
    // The API server refuses a create over an existing name (a lost race).
    if let Some(name) = obj["metadata"]["name"].as_str() {
        let key = (resource.clone(), ns.clone(), name.to_owned());
        if inner.objects.lock().contains_key(&key) {
            return status(
                409,
                "AlreadyExists",
                format!("{resource} \"{name}\" already exists"),
            );
        }
    }
    (
        StatusCode::CREATED,
        axum::Json(inner.put(&resource, &ns, obj)),
    )
        .into_response()
}

async fn patch(
    State(inner): Shared,
    UrlPath((resource, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch_ns(inner, resource, String::new(), name, headers, body).await
}

async fn patch_in(
    State(inner): Shared,
    UrlPath((ns, resource, name)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch_ns(inner, resource, ns, name, headers, body).await
}

async fn patch_ns(
    inner: Arc<Inner>,
    resource: String,
    ns: String,
    name: String,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    inner.patches.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = inner.fault(true).await {
        return r;
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type != "application/merge-patch+json" {
        return status(
            415,
            "UnsupportedMediaType",
            format!("only merge patch is supported, got {content_type}"),
        );
    }
    let Ok(mut patch) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "patch is not JSON".into());
    };
    let key = (resource.clone(), ns, name.clone());
    let mut objects = inner.objects.lock();
    let Some(current) = objects.get(&key) else {
        return status(404, "NotFound", format!("{resource} \"{name}\" not found"));
    };
    let current_rv = current["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    if let Some(wanted) = patch["metadata"]
        .as_object_mut()
        .and_then(|m| m.remove("resourceVersion"))
    {
        if wanted.as_str() != Some(current_rv.as_str()) {
            return status(409, "Conflict", format!(
                "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ));
        }
    }
    let mut next = current.clone();
    merge(&mut next, &patch);
    if let Some(invalid) = validate(&resource, &next) {
        return invalid;
    }
    let rv = inner.next_rv();
    next["metadata"]["resourceVersion"] = json!(inner.render_rv(rv));
    objects.insert(key, next.clone());
    drop(objects);
    inner.record(&resource, "MODIFIED", &next, rv);
    axum::Json(next).into_response()
}

async fn delete(
    State(inner): Shared,
    UrlPath((resource, name)): UrlPath<(String, String)>,
) -> Response {
    if let Some(r) = inner.fault(false).await {
        return r;
    }
    let removed = inner
        .objects
        .lock()
        .remove(&(resource.clone(), String::new(), name.clone()));
    match removed {
        Some(obj) => {
            let rv = inner.next_rv();
            inner.record(&resource, "DELETED", &obj, rv);
            axum::Json(obj).into_response()
        }
        None => status(404, "NotFound", format!("{resource} \"{name}\" not found")),
    }
}

/// GET /apis/kubevirt.io/v1: an APIResourceList when KubeVirt is "installed".
async fn kubevirt_discovery(State(inner): Shared) -> Response {
    if !inner.kubevirt.load(Ordering::SeqCst) {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
        );
    }
    let resource = |name: &str, singular: &str, kind: &str| {
        json!({"name": name, "singularName": singular, "namespaced": true, "kind": kind,
            "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]})
    };
    axum::Json(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "kubevirt.io/v1",
        "resources": [
            resource("virtualmachineinstances", "virtualmachineinstance", "VirtualMachineInstance"),
            resource("virtualmachineinstancemigrations", "virtualmachineinstancemigration", "VirtualMachineInstanceMigration"),
        ]}))
    .into_response()
}

async fn log_request(
    State(inner): Shared,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let uri = req.uri();
    inner.requests.lock().push((
        req.method().to_string(),
        uri.path().to_owned(),
        uri.query().unwrap_or("").to_owned(),
    ));
    next.run(req).await
}

impl FakeKube {
    pub async fn start() -> FakeKube {
        let (live, _) = broadcast::channel(65536);
        let inner = Arc::new(Inner {
            rv: AtomicU64::new(1000),
            objects: Mutex::new(HashMap::new()),
            history: Mutex::new(Vec::new()),
            live,
            faults: Mutex::new(Faults::default()),
            patches: AtomicU64::new(0),
            watch_epoch: tokio::sync::watch::channel(0).0,
            requests: Mutex::new(Vec::new()),
            kubevirt: std::sync::atomic::AtomicBool::new(false),
            opaque_rv: std::sync::atomic::AtomicBool::new(false),
        });
        let cluster = Router::new()
            .route("/{resource}", get(list_or_watch).post(create))
            .route(
                "/{resource}/{name}",
                get(get_one).patch(patch).delete(delete),
            );
        let app = Router::new()
            .nest("/api/v1", cluster.clone())
            .nest("/apis/storage.k8s.io/v1", cluster)
            .route(
                "/api/v1/namespaces/{ns}/{resource}",
                get(list_or_watch_in).post(create_in),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/{resource}",
                get(list_or_watch_in).post(create_in),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/{resource}/{name}",
                get(get_in).patch(patch_in),
            )
            .route("/apis/kubevirt.io/v1", get(kubevirt_discovery))
            .route("/apis/kubevirt.io/v1/{resource}", get(list_or_watch))
            .route(
                "/apis/kubevirt.io/v1/namespaces/{ns}/{resource}",
                get(list_or_watch_in),
            )
            .layer(axum::middleware::from_fn_with_state(
                inner.clone(),
                log_request,
            ))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        FakeKube {
            addr,
            inner,
            _shutdown: Arc::new(tx),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server.
    pub fn write_kubeconfig(&self, path: &Path) {
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, yaml).unwrap();
    }

    pub fn put(&self, resource: &str, obj: Value) -> Value {
        self.inner.put(resource, "", obj)
    }

    /// Creates or replaces a namespaced object (a watch sees ADDED or MODIFIED).
    pub fn put_in(&self, resource: &str, ns: &str, obj: Value) -> Value {
        self.inner.put(resource, ns, obj)
    }

    pub fn remove_in(&self, resource: &str, ns: &str, name: &str) {
        let removed = self.inner.objects.lock().remove(&(
            resource.to_owned(),
            ns.to_owned(),
            name.to_owned(),
        ));
        if let Some(obj) = removed {
            let rv = self.inner.next_rv();
            self.inner.record(resource, "DELETED", &obj, rv);
        }
    }

    /// Makes kubevirt.io/v1 VMIs and migrations discoverable.
    pub fn install_kubevirt(&self) {
        self.inner.kubevirt.store(true, Ordering::SeqCst);
    }

    /// Every object of a cluster-scoped resource.
    pub fn list(&self, resource: &str) -> Vec<Value> {
        self.inner
            .objects
            .lock()
            .iter()
            .filter(|((r, ns, _), _)| r == resource && ns.is_empty())
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn get(&self, resource: &str, name: &str) -> Option<Value> {
        self.inner
            .objects
            .lock()
            .get(&(resource.to_owned(), String::new(), name.to_owned()))
            .cloned()
    }

    pub fn get_in(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.inner
            .objects
            .lock()
            .get(&(resource.to_owned(), ns.to_owned(), name.to_owned()))
            .cloned()
    }

    pub fn remove(&self, resource: &str, name: &str) {
        let removed = self.inner.objects.lock().remove(&(
            resource.to_owned(),
            String::new(),
            name.to_owned(),
        ));
        if let Some(obj) = removed {
            let rv = self.inner.next_rv();
            self.inner.record(resource, "DELETED", &obj, rv);
        }
    }

    /// Every Event object created in any namespace.
    pub fn events(&self) -> Vec<Value> {
        self.inner
            .objects
            .lock()
            .iter()
            .filter(|((r, _, _), _)| r == "events")
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// From now on resourceVersions are opaque tokens that are no number and do not
    /// sort in the order written: a client may only pass them back (as a watch's start
    /// or a write's precondition), as the API conventions say.
    pub fn use_opaque_resource_versions(&self) {
        self.inner.opaque_rv.store(true, Ordering::SeqCst);
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.inner.faults.lock() = faults;
    }

    pub fn patch_count(&self) -> u64 {
        self.inner.patches.load(Ordering::SeqCst)
    }

    /// Every request received so far: (method, path, query).
    pub fn requests(&self) -> Vec<(String, String, String)> {
        self.inner.requests.lock().clone()
    }

    pub fn drop_watches(&self) {
        self.inner.watch_epoch.send_modify(|e| *e += 1);
    }
}

pub fn pv(name: &str, driver: &str, handle: &str) -> Value {
    json!({"metadata": {"name": name}, "spec": {
        "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
        "csi": {"driver": driver, "volumeHandle": handle},
        "claimRef": {"namespace": "vms", "name": format!("claim-{name}"), "uid": format!("claim-uid-{name}")}}})
}

pub fn node(name: &str) -> Value {
    json!({"metadata": {"name": name}})
}

/// The CSINode kubelet writes for Node `node` once the driver registered with `node_id`.
pub fn csinode(node: &str, driver: &str, node_id: &str) -> Value {
    json!({"metadata": {"name": node}, "spec": {"drivers": [
        {"name": driver, "nodeID": node_id, "topologyKeys": ["topology.handoff.csi.dev/pool"]}]}})
}

pub fn volume_attachment(driver: &str, pv_name: &str, node: &str, attached: bool) -> Value {
    json!({"metadata": {"name": format!("csi-{pv_name}-{node}")}, "spec": {
        "attacher": driver, "nodeName": node, "source": {"persistentVolumeName": pv_name}},
        "status": {"attached": attached}})
}

/// A running VMI in namespace `vms` with its disk on `claim`.
pub fn vmi(name: &str, claim: &str, node: &str, memory: &str) -> Value {
    json!({"metadata": {"name": name, "uid": format!("vmi-uid-{name}")},
        "spec": {"domain": {"resources": {"requests": {"memory": memory}}},
            "volumes": [{"name": "disk", "persistentVolumeClaim": {"claimName": claim}}]},
        "status": {"nodeName": node, "phase": "Running"}})
}

/// A virt-launcher pod of VMI `vm` using `claim` on `node`, labelled and owned as
/// KubeVirt does it (the deprecated `vm.kubevirt.io/name` label holds the guest's host
/// name, not the VM's name).
pub fn launcher_pod(name: &str, vm: &str, claim: &str, node: &str) -> Value {
    json!({"metadata": {"name": name, "labels": {
            "kubevirt.io": "virt-launcher",
            "kubevirt.io/created-by": format!("vmi-uid-{vm}"),
            "vm.kubevirt.io/name": "guest-hostname"},
            "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                "name": vm, "uid": format!("vmi-uid-{vm}"), "controller": true}]},
        "spec": {"nodeName": node, "containers": [{"name": "compute"}],
            "volumes": [{"name": "disk", "persistentVolumeClaim": {"claimName": claim}}]},
        "status": {"phase": "Running"}})
}
