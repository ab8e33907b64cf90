//! A stand-in for kube-apiserver, for tests and benchmarks of `policy-agent run
//! --kubeconfig`: list and watch as the real API server does them, for the kinds the
//! agent watches (namespaces, pods, nodes, networkpolicies, services, endpointslices),
//! and Event creation (events.k8s.io/v1), recorded for tests to read.
//!
//! Semantics kept from the real server (see `/work/shared/DESIGN.md`, "What a real API
//! server does"):
//! - one global, monotonically increasing resourceVersion; every write takes the next one;
//! - lists return `metadata.resourceVersion` and page with `limit`/`continue` (a continue
//!   token from before a restart gets `410 Expired`); `resourceVersion` (`0` or unset:
//!   the current state) and `resourceVersionMatch` are accepted as kube-rs sends them;
//! - a watch from `resourceVersion=N` streams the ADDED/MODIFIED/DELETED events after N;
//!   with `allowWatchBookmarks=true` it also sends BOOKMARK events at an interval; it ends
//!   after `timeoutSeconds`; a watch from a version older than the retained event window
//!   (or from before a restart's new base) gets a single ERROR event holding the `410
//!   Expired` Status ("too old resource version: N (M)"), as the watch cache sends it;
//! - `fieldSelector` `metadata.name=`/`metadata.namespace=` and equality `labelSelector`s;
//! - objects keep whatever they were given (see [`objects`] for objects shaped as a real
//!   server returns them: managedFields, annotations, ownerReferences, status); the
//!   server sets `metadata.resourceVersion`, and `uid`, `creationTimestamp` and
//!   `generation` as the real one does. List items carry no `kind`/`apiVersion`, watch
//!   event objects do.
//!
//! Control from tests: [`ApiServer::apply`]/[`ApiServer::delete`], [`ApiServer::stop`]
//! (every connection dropped, the port refuses connections), [`ApiServer::restart`] with
//! a new version base (every older watch then gets 410), [`ApiServer::set_delay`] (a delay
//! before each response and each watch event). It serves plain HTTP on one address,
//! which kube-rs accepts in a kubeconfig ([`ApiServer::write_kubeconfig`]).

pub mod objects;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::netns::NetnsHandle;

/// The kinds the stand-in serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    Node,
    NetworkPolicy,
    Service,
    EndpointSlice,
    Event,
    /// Served only once [`ApiServer::install_cluster_policy_crd`] ran (404 before, as a
    /// cluster without the CRD answers).
    ClusterNetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Node,
        Kind::NetworkPolicy,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Event,
        Kind::ClusterNetworkPolicy,
    ];

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Pod | Kind::Node | Kind::Service => "v1",
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Event => "events.k8s.io/v1",
            Kind::ClusterNetworkPolicy => "policy.networking.k8s.io/v1alpha2",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Node => "Node",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Event => "Event",
            Kind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
            Kind::Node => "nodes",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Event => "events",
            Kind::ClusterNetworkPolicy => "clusternetworkpolicies",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node | Kind::ClusterNetworkPolicy)
    }

    /// The kind of an object from its `apiVersion` and `kind`.
    pub fn of(v: &Value) -> Option<Kind> {
        let (av, k) = (v.get("apiVersion")?.as_str()?, v.get("kind")?.as_str()?);
        Kind::ALL.into_iter().find(|kind| kind.api_version() == av && kind.name() == k)
    }

    fn from_path(api_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.api_version() == api_version && k.plural() == plural)
    }
}

/// An object as stored: its JSON without `apiVersion`/`kind` (as list items are written).
#[derive(Clone)]
struct Stored {
    body: Bytes,
}

struct LoggedEvent {
    rv: u64,
    kind: Kind,
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    /// The whole watch event line, newline included.
    line: Bytes,
}

struct Store {
    rv: u64,
    /// Watches from below this get 410: events up to it are gone (compacted, or from
    /// before a restart).
    compacted: u64,
    objects: BTreeMap<Kind, BTreeMap<(String, String), Stored>>,
    log: VecDeque<LoggedEvent>,
    window: usize,
    uid_counter: u64,
    recorded_events: Vec<Value>,
    delay: Duration,
    bookmark_interval: Duration,
    /// Requests served, per (method, kind plural, watch?).
    requests: BTreeMap<String, u64>,
    /// Whether the ClusterNetworkPolicy CRD is installed.
    cluster_policy_crd: bool,
}

impl Store {
    fn new() -> Store {
        Store {
            rv: 1000,
            compacted: 1000,
            objects: BTreeMap::new(),
            log: VecDeque::new(),
            window: 10_000,
            uid_counter: 0,
            recorded_events: Vec::new(),
            delay: Duration::ZERO,
            bookmark_interval: Duration::from_secs(10),
            requests: BTreeMap::new(),
            cluster_policy_crd: false,
        }
    }

    fn next_uid(&mut self) -> String {
        self.uid_counter += 1;
        let n = self.uid_counter;
        format!("{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}", (n * 2654435761) as u32, (n >> 16) as u16, n & 0xfff, (n >> 4) & 0xfff, n)
    }

    /// Creates or replaces an object; returns its new resourceVersion and the stored form.
    fn write(&mut self, kind: Kind, mut obj: Value) -> Result<u64, String> {
        let meta = obj.get_mut("metadata").and_then(Value::as_object_mut).ok_or("an object needs metadata")?;
        let name = meta.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()).ok_or("metadata.name is required")?.to_string();
        let namespace = if kind.namespaced() {
            let ns = meta.get("namespace").and_then(Value::as_str).unwrap_or("default").to_string();
            meta.insert("namespace".into(), json!(ns));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        let key = (namespace.clone(), name.clone());
        let old = self.objects.get(&kind).and_then(|m| m.get(&key)).map(|s| serde_json::from_slice::<Value>(&s.body).expect("stored JSON"));
        self.rv += 1;
        let rv = self.rv;
        let meta = obj["metadata"].as_object_mut().expect("checked");
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        match &old {
            Some(old) => {
                // Identity and creation stay; the generation moves when the spec does.
                for f in ["uid", "creationTimestamp"] {
                    if let Some(v) = old["metadata"].get(f) {
                        meta.insert(f.into(), v.clone());
                    }
                }
                let generation = old["metadata"]["generation"].as_u64().unwrap_or(1);
                let spec_changed = old.get("spec") != obj.get("spec");
                obj["metadata"]["generation"] = json!(if spec_changed { generation + 1 } else { generation });
            }
            None => {
                let uid = self.next_uid();
                let meta = obj["metadata"].as_object_mut().expect("checked");
                meta.entry("uid").or_insert(json!(uid));
                meta.entry("creationTimestamp").or_insert(json!(objects::timestamp(std::time::SystemTime::now())));
                meta.insert("generation".into(), json!(1));
            }
        }
        let labels = labels_of(&obj);
        let event_type = if old.is_some() { "MODIFIED" } else { "ADDED" };
        let map = obj.as_object_mut().expect("an object");
        map.remove("apiVersion");
        map.remove("kind");
        let body = Bytes::from(serde_json::to_vec(&obj).expect("JSON"));
        self.log_event(kind, event_type, &namespace, &name, labels, &body, rv);
        self.objects.entry(kind).or_default().insert(key, Stored { body });
        Ok(rv)
    }

    fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let stored = self.objects.get_mut(&kind)?.remove(&(namespace.to_string(), name.to_string()))?;
        self.rv += 1;
        let rv = self.rv;
        let mut obj: Value = serde_json::from_slice(&stored.body).expect("stored JSON");
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let labels = labels_of(&obj);
        let body = Bytes::from(serde_json::to_vec(&obj).expect("JSON"));
        self.log_event(kind, "DELETED", namespace, name, labels, &body, rv);
        Some(rv)
    }

    #[allow(clippy::too_many_arguments)]
    fn log_event(&mut self, kind: Kind, type_: &str, namespace: &str, name: &str, labels: BTreeMap<String, String>, body: &Bytes, rv: u64) {
        let line = event_line(type_, kind, body);
        self.log.push_back(LoggedEvent { rv, kind, namespace: namespace.to_string(), name: name.to_string(), labels, line });
        while self.log.len() > self.window {
            let gone = self.log.pop_front().expect("non-empty");
            self.compacted = gone.rv;
        }
    }
}

fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj["metadata"]["labels"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default()
}

/// `{"type":T,"object":{"kind":..,"apiVersion":..,<body>}}\n`
fn event_line(type_: &str, kind: Kind, body: &[u8]) -> Bytes {
    let mut line = format!(r#"{{"type":"{type_}","object":{{"kind":"{}","apiVersion":"{}""#, kind.name(), kind.api_version()).into_bytes();
    // The body is a JSON object: `{` then its fields (if any).
    let rest = &body[1..];
    if rest.first() != Some(&b'}') {
        line.push(b',');
    }
    line.extend_from_slice(rest);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

fn status_response(code: u16, reason: &str, message: &str) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&status(code, reason, message)).expect("JSON")))
        .expect("response")
}

fn json_response(code: u16, body: impl Into<Body>) -> Response {
    Response::builder().status(code).header("content-type", "application/json").body(body.into()).expect("response")
}

/// What a list or watch selects.
#[derive(Debug, Clone, Default)]
struct Selection {
    namespace: Option<String>,
    name: Option<String>,
    labels: Vec<(String, bool, String)>,
}

impl Selection {
    fn matches(&self, namespace: &str, name: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self.name.as_deref().is_none_or(|n| n == name)
            && self.labels.iter().all(|(k, eq, v)| (labels.get(k) == Some(v)) == *eq)
    }

    fn parse(namespace: Option<String>, query: &BTreeMap<String, String>) -> Result<Selection, String> {
        let mut s = Selection { namespace, ..Selection::default() };
        for term in query.get("fieldSelector").map(String::as_str).unwrap_or_default().split(',').filter(|t| !t.is_empty()) {
            let (k, v) = term.split_once("==").or_else(|| term.split_once('=')).ok_or(format!("unsupported field selector {term:?}"))?;
            match k {
                "metadata.name" => s.name = Some(v.to_string()),
                "metadata.namespace" => s.namespace = Some(v.to_string()),
                other => return Err(format!("field label not supported: {other}")),
            }
        }
        for term in query.get("labelSelector").map(String::as_str).unwrap_or_default().split(',').filter(|t| !t.is_empty()) {
            if let Some((k, v)) = term.split_once("!=") {
                s.labels.push((k.to_string(), false, v.to_string()));
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                s.labels.push((k.to_string(), true, v.to_string()));
            } else {
                return Err(format!("unsupported label selector {term:?}"));
            }
        }
        Ok(s)
    }
}

struct Shared {
    store: Mutex<Store>,
    /// The latest resourceVersion, for watches to wake up on.
    latest: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type Binder = Arc<dyn Fn() -> std::io::Result<std::net::TcpListener> + Send + Sync>;

/// The stand-in: its own tokio runtime, serving until dropped (or stopped).
pub struct ApiServer {
    shared: Arc<Shared>,
    /// Taken on drop (shut down in the background: a drop may happen on a runtime's thread).
    rt: Option<tokio::runtime::Runtime>,
    binder: Binder,
    addr: SocketAddr,
    serving: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ApiServer {
    /// Serves on 127.0.0.1 (a free port) of the calling thread's network namespace.
    pub fn start_local() -> std::io::Result<ApiServer> {
        ApiServer::start_with(same_port(Arc::new(bind)))
    }

    /// Serves on 127.0.0.1 (a free port) inside network namespace `ns` (an emulated node:
    /// the agent running there reaches it on its own loopback).
    pub fn start_in(ns: &NetnsHandle) -> std::io::Result<ApiServer> {
        let ns = ns.clone();
        ApiServer::start_with(same_port(Arc::new(move |addr| {
            ns.run(move || bind(addr)).map_err(|e| std::io::Error::other(e.to_string()))?
        })))
    }

    fn start_with(binder: Binder) -> std::io::Result<ApiServer> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("api-standin").enable_all().build()?;
        let (latest, _) = watch::channel(0);
        let shared = Arc::new(Shared { store: Mutex::new(Store::new()), latest });
        let listener = binder()?;
        let addr = listener.local_addr()?;
        let s = ApiServer { shared, rt: Some(rt), binder, addr, serving: Mutex::new(None) };
        s.serve(listener)?;
        Ok(s)
    }

    fn serve(&self, listener: std::net::TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let shared = self.shared.clone();
        let task = self.rt.as_ref().expect("runtime").spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            // Dropped with this task (a stop aborts it): every connection goes with it.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        let router = router(shared.clone());
                        connections.spawn(async move {
                            let service = hyper_util::service::TowerToHyperService::new(router);
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig naming this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {}\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\n    namespace: default\ncurrent-context: standin\nusers:\n- name: standin\n  user: {{}}\n",
            self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// Creates or replaces an object (any serializable Kubernetes object with `apiVersion`
    /// and `kind`); returns its resourceVersion.
    pub fn apply(&self, obj: &impl serde::Serialize) -> u64 {
        self.apply_json(serde_json::to_value(obj).expect("serializable object"))
    }

    /// Installs the ClusterNetworkPolicy CRD: its resource is served from now on.
    pub fn install_cluster_policy_crd(&self) {
        self.shared.lock().cluster_policy_crd = true;
    }

    /// [`ApiServer::apply`] from JSON.
    pub fn apply_json(&self, obj: Value) -> u64 {
        let kind = Kind::of(&obj).unwrap_or_else(|| panic!("the stand-in does not serve {}/{}", obj["apiVersion"], obj["kind"]));
        let rv = self.shared.lock().write(kind, obj).unwrap_or_else(|e| panic!("invalid object: {e}"));
        self.shared.latest.send_replace(rv);
        rv
    }

    /// Many objects under one lock (one wake-up of the watches).
    pub fn apply_all(&self, objects: impl IntoIterator<Item = Value>) -> u64 {
        let mut store = self.shared.lock();
        let mut rv = store.rv;
        for obj in objects {
            let kind = Kind::of(&obj).unwrap_or_else(|| panic!("the stand-in does not serve {}/{}", obj["apiVersion"], obj["kind"]));
            rv = store.write(kind, obj).unwrap_or_else(|e| panic!("invalid object: {e}"));
        }
        drop(store);
        self.shared.latest.send_replace(rv);
        rv
    }

    /// Deletes an object (`namespace` empty for cluster-scoped kinds); its resourceVersion.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let rv = self.shared.lock().delete(kind, namespace, name)?;
        self.shared.latest.send_replace(rv);
        Some(rv)
    }

    /// An object as stored (without `apiVersion`/`kind`).
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let store = self.shared.lock();
        let s = store.objects.get(&kind)?.get(&(namespace.to_string(), name.to_string()))?;
        Some(serde_json::from_slice(&s.body).expect("stored JSON"))
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.shared.lock().objects.get(&kind).map_or(0, BTreeMap::len)
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// The Events created (events.k8s.io/v1), as posted, in order.
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().recorded_events.clone()
    }

    /// Requests served so far, keyed `METHOD plural[ watch]`.
    pub fn requests(&self) -> BTreeMap<String, u64> {
        self.shared.lock().requests.clone()
    }

    /// A delay before each response and each watch event (a slow or overloaded server).
    pub fn set_delay(&self, d: Duration) {
        self.shared.lock().delay = d;
    }

    /// How often watches that asked for bookmarks get one (default 10 s).
    pub fn set_bookmark_interval(&self, d: Duration) {
        self.shared.lock().bookmark_interval = d;
        self.shared.latest.send_modify(|_| {});
    }

    /// How many events are kept for watches to resume from (default 10,000); older
    /// resourceVersions get 410.
    pub fn set_window(&self, events: usize) {
        let mut s = self.shared.lock();
        s.window = events.max(1);
        while s.log.len() > s.window {
            let gone = s.log.pop_front().expect("non-empty");
            s.compacted = gone.rv;
        }
    }

    /// Whether it is serving.
    pub fn running(&self) -> bool {
        self.serving.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Stops serving: the listener closes (connections are refused) and every connection,
    /// watches included, is dropped. The objects stay (etcd keeps them).
    pub fn stop(&self) {
        if let Some(task) = self.serving.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
            // Wait until the task (and its connections) are gone.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !task.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Serves again after a stop, on the same address, as if nothing happened (watches may
    /// resume from where they were).
    pub fn resume(&self) -> std::io::Result<()> {
        if self.running() {
            return Ok(());
        }
        let listener = retry_bind(&self.binder)?;
        self.serve(listener)
    }

    /// Stops (if serving) and starts again with a new version base: the resourceVersion
    /// jumps by `bump` and the event window is emptied, as when an API server's watch
    /// cache starts over: every watch from an older version gets `410 Expired`.
    pub fn restart(&self, bump: u64) -> std::io::Result<()> {
        self.stop();
        {
            let mut s = self.shared.lock();
            s.rv += bump;
            s.compacted = s.rv;
            s.log.clear();
        }
        self.resume()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A binder on 127.0.0.1: a free port the first time, the same one after a stop.
fn same_port(bind: Arc<dyn Fn(SocketAddr) -> std::io::Result<std::net::TcpListener> + Send + Sync>) -> Binder {
    let port = Arc::new(Mutex::new(0u16));
    Arc::new(move || {
        let p = *port.lock().unwrap_or_else(|e| e.into_inner());
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], p)))?;
        *port.lock().unwrap_or_else(|e| e.into_inner()) = listener.local_addr()?.port();
        Ok(listener)
    })
}

fn retry_bind(binder: &Binder) -> std::io::Result<std::net::TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        match binder() {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last.expect("tried"))
}

fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new().fallback(move |req: Request| handle(shared.clone(), req))
}

/// A parsed request path.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        ["namespaces", ns, plural] => (Some(ns.to_string()), *plural, None),
        ["namespaces", ns, plural, name] => (Some(ns.to_string()), *plural, Some(name.to_string())),
        [plural, name] => (None, *plural, Some(name.to_string())),
        _ => return None,
    };
    let kind = Kind::from_path(&api_version, plural)?;
    if namespace.is_some() && !kind.namespaced() {
        return None;
    }
    Some(Target { kind, namespace, name })
}

async fn handle(shared: Arc<Shared>, req: Request) -> Response {
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let method = req.method().clone();
    let served = |t: &Target| t.kind != Kind::ClusterNetworkPolicy || shared.lock().cluster_policy_crd;
    let Some(target) = parse_path(req.uri().path()).filter(served) else {
        return status_response(404, "NotFound", &format!("the server could not find the requested resource ({})", req.uri().path()));
    };
    let is_watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let delay = {
        let mut s = shared.lock();
        *s.requests.entry(format!("{method} {}{}", target.kind.plural(), if is_watch { " watch" } else { "" })).or_insert(0) += 1;
        s.delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match (method, target.name.clone()) {
        (Method::GET, None) if is_watch => watch_response(shared, target, &query),
        (Method::GET, None) => list(&shared, target, &query),
        (Method::GET, Some(name)) => {
            let s = shared.lock();
            let ns = target.namespace.clone().unwrap_or_default();
            match s.objects.get(&target.kind).and_then(|m| m.get(&(ns, name.clone()))) {
                Some(o) => json_response(200, with_type(target.kind, &o.body)),
                None => status_response(404, "NotFound", &format!("{} \"{name}\" not found", target.kind.plural())),
            }
        }
        (Method::POST, None) => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return status_response(400, "BadRequest", &e.to_string()),
            };
            create(&shared, target, &body)
        }
        (Method::PATCH, Some(name)) => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return status_response(400, "BadRequest", &e.to_string()),
            };
            patch(&shared, target, &name, &body)
        }
        (m, _) => status_response(405, "MethodNotAllowed", &format!("{m} is not supported by the stand-in")),
    }
}

/// The stored body with `kind` and `apiVersion` put back.
fn with_type(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut out = format!(r#"{{"kind":"{}","apiVersion":"{}""#, kind.name(), kind.api_version()).into_bytes();
    if body.get(1) != Some(&b'}') {
        out.push(b',');
    }
    out.extend_from_slice(&body[1..]);
    out
}

fn create(shared: &Shared, target: Target, body: &[u8]) -> Response {
    let mut obj: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status_response(400, "BadRequest", &format!("decoding the object: {e}")),
    };
    if let Some(ns) = &target.namespace {
        obj["metadata"]["namespace"] = json!(ns);
    }
    obj["apiVersion"] = json!(target.kind.api_version());
    obj["kind"] = json!(target.kind.name());
    let mut s = shared.lock();
    if let Some(generate) = obj["metadata"]["generateName"].as_str().filter(|_| obj["metadata"]["name"].is_null()) {
        let name = format!("{generate}{:05x}", s.rv % 0xfffff);
        obj["metadata"]["name"] = json!(name);
    }
    let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let ns = target.namespace.clone().unwrap_or_default();
    if s.objects.get(&target.kind).is_some_and(|m| m.contains_key(&(ns.clone(), name.clone()))) {
        return status_response(409, "AlreadyExists", &format!("{} \"{name}\" already exists", target.kind.plural()));
    }
    let rv = match s.write(target.kind, obj.clone()) {
        Ok(rv) => rv,
        Err(e) => return status_response(422, "Invalid", &e),
    };
    if target.kind == Kind::Event {
        s.recorded_events.push(obj);
    }
    let stored = s.objects[&target.kind][&(ns, name)].body.clone();
    drop(s);
    shared.latest.send_replace(rv);
    json_response(201, with_type(target.kind, &stored))
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn patch(shared: &Shared, target: Target, name: &str, body: &[u8]) -> Response {
    let p: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status_response(400, "BadRequest", &format!("decoding the patch: {e}")),
    };
    let ns = target.namespace.clone().unwrap_or_default();
    let mut s = shared.lock();
    let Some(old) = s.objects.get(&target.kind).and_then(|m| m.get(&(ns.clone(), name.to_string()))) else {
        return status_response(404, "NotFound", &format!("{} \"{name}\" not found", target.kind.plural()));
    };
    let mut obj: Value = serde_json::from_slice(&old.body).expect("stored JSON");
    merge(&mut obj, &p);
    obj["apiVersion"] = json!(target.kind.api_version());
    obj["kind"] = json!(target.kind.name());
    obj["metadata"]["name"] = json!(name);
    let rv = match s.write(target.kind, obj.clone()) {
        Ok(rv) => rv,
        Err(e) => return status_response(422, "Invalid", &e),
    };
    if target.kind == Kind::Event {
        s.recorded_events.push(obj);
    }
    let stored = s.objects[&target.kind][&(ns, name.to_string())].body.clone();
    drop(s);
    shared.latest.send_replace(rv);
    json_response(200, with_type(target.kind, &stored))
}

/// `continue` tokens: `<list resourceVersion>/<namespace>/<name>` of the last item sent.
fn list(shared: &Shared, target: Target, query: &BTreeMap<String, String>) -> Response {
    let selection = match Selection::parse(target.namespace.clone(), query) {
        Ok(s) => s,
        Err(e) => return status_response(400, "BadRequest", &e),
    };
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    let s = shared.lock();
    let (list_rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            if query.get("resourceVersion").is_some_and(|r| !r.is_empty()) {
                return status_response(400, "BadRequest", "specifying resource version is not allowed when using continue");
            }
            let mut parts = token.splitn(3, '/');
            let (Some(rv), Some(ns), Some(name)) = (parts.next().and_then(|r| r.parse::<u64>().ok()), parts.next(), parts.next()) else {
                return status_response(400, "BadRequest", "invalid continue token");
            };
            if rv < s.compacted {
                return status_response(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                );
            }
            (rv, Some((ns.to_string(), name.to_string())))
        }
        None => {
            // resourceVersion "" or "0" (any), or an exact/not-older-than version: the
            // current state satisfies all but an exact match on an old version.
            if let (Some(rv), Some("Exact")) =
                (query.get("resourceVersion").and_then(|r| r.parse::<u64>().ok()), query.get("resourceVersionMatch").map(String::as_str))
                && rv != s.rv
            {
                return status_response(410, "Expired", &format!("too old resource version: {rv} ({})", s.compacted + 1));
            }
            (s.rv, None)
        }
    };
    let empty = BTreeMap::new();
    let objects = s.objects.get(&target.kind).unwrap_or(&empty);
    let range = match &after {
        Some(k) => objects.range((std::ops::Bound::Excluded(k.clone()), std::ops::Bound::Unbounded)),
        None => objects.range::<(String, String), _>(..),
    };
    let mut items: Vec<Bytes> = Vec::new();
    let mut last = None;
    let mut more = false;
    for ((ns, name), o) in range {
        if !selection.matches(ns, name, &labels_from_body(&o.body, &selection)) {
            continue;
        }
        if limit.is_some_and(|l| items.len() >= l) {
            more = true;
            break;
        }
        items.push(o.body.clone());
        last = Some((ns.clone(), name.clone()));
    }
    drop(s);
    let mut meta = json!({"resourceVersion": list_rv.to_string()});
    if more && let Some((ns, name)) = last {
        meta["continue"] = json!(format!("{list_rv}/{ns}/{name}"));
    }
    let head = format!(
        r#"{{"kind":"{}List","apiVersion":"{}","metadata":{},"items":["#,
        target.kind.name(),
        target.kind.api_version(),
        serde_json::to_string(&meta).expect("JSON")
    );
    let mut body = Vec::with_capacity(head.len() + items.iter().map(|i| i.len() + 1).sum::<usize>() + 2);
    body.extend_from_slice(head.as_bytes());
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"]}");
    json_response(200, body)
}

/// Labels, parsed only when a label selector needs them.
fn labels_from_body(body: &[u8], selection: &Selection) -> BTreeMap<String, String> {
    if selection.labels.is_empty() {
        return BTreeMap::new();
    }
    serde_json::from_slice::<Value>(body).map(|v| labels_of(&v)).unwrap_or_default()
}

struct WatchState {
    shared: Arc<Shared>,
    kind: Kind,
    selection: Selection,
    cursor: u64,
    queue: VecDeque<Bytes>,
    latest: watch::Receiver<u64>,
    bookmarks: bool,
    next_bookmark: tokio::time::Instant,
    deadline: Option<tokio::time::Instant>,
    done: bool,
}

fn watch_response(shared: Arc<Shared>, target: Target, query: &BTreeMap<String, String>) -> Response {
    let selection = match Selection::parse(target.namespace.clone(), query) {
        Ok(s) => s,
        Err(e) => return status_response(400, "BadRequest", &e),
    };
    let from = query.get("resourceVersion").and_then(|r| r.parse::<u64>().ok()).filter(|r| *r > 0);
    let bookmarks = matches!(query.get("allowWatchBookmarks").map(String::as_str), Some("true" | "1"));
    let timeout = query.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).map(Duration::from_secs);
    let s = shared.lock();
    let mut queue = VecDeque::new();
    let cursor = match from {
        Some(rv) if rv < s.compacted => {
            // What the watch cache sends: HTTP 200, one ERROR event, end of stream.
            let line = serde_json::to_vec(&json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {rv} ({})", s.compacted + 1))})).expect("JSON");
            let mut line = line;
            line.push(b'\n');
            drop(s);
            return json_response(200, line);
        }
        Some(rv) => rv,
        None => {
            // No version (or "0"): the current objects as ADDED, then what follows.
            for ((ns, name), o) in s.objects.get(&target.kind).into_iter().flatten() {
                if selection.matches(ns, name, &labels_from_body(&o.body, &selection)) {
                    queue.push_back(event_line("ADDED", target.kind, &o.body));
                }
            }
            s.rv
        }
    };
    let interval = s.bookmark_interval;
    drop(s);
    let now = tokio::time::Instant::now();
    let state = WatchState {
        latest: shared.latest.subscribe(),
        shared,
        kind: target.kind,
        selection,
        cursor,
        queue,
        bookmarks,
        next_bookmark: now + interval,
        deadline: timeout.map(|t| now + t),
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(line) = st.queue.pop_front() {
                let delay = st.shared.lock().delay;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                return Some((Ok::<Bytes, std::io::Error>(line), st));
            }
            if st.done {
                return None;
            }
            st.collect();
            if !st.queue.is_empty() {
                continue;
            }
            let deadline = st.deadline;
            tokio::select! {
                changed = st.latest.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(st.next_bookmark), if st.bookmarks => {
                    let (rv, interval) = { let s = st.shared.lock(); (s.rv, s.bookmark_interval) };
                    st.collect();
                    if st.queue.is_empty() && !st.done {
                        st.cursor = st.cursor.max(rv);
                        let line = format!(
                            "{{\"type\":\"BOOKMARK\",\"object\":{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{}\"}}}}}}\n",
                            st.kind.name(), st.kind.api_version(), st.cursor
                        );
                        st.queue.push_back(Bytes::from(line));
                    }
                    st.next_bookmark = tokio::time::Instant::now() + interval;
                }
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    return None;
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream.boxed()))
        .expect("response")
}

impl WatchState {
    /// Queues the events after the cursor (or the 410 if they are gone).
    fn collect(&mut self) {
        let s = self.shared.lock();
        if self.cursor < s.compacted {
            let line = serde_json::to_vec(&json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {} ({})", self.cursor, s.compacted + 1))})).expect("JSON");
            let mut line = line;
            line.push(b'\n');
            self.queue.push_back(Bytes::from(line));
            self.done = true;
            return;
        }
        let start = s.log.partition_point(|e| e.rv <= self.cursor);
        for e in s.log.range(start..) {
            if e.kind == self.kind && self.selection.matches(&e.namespace, &e.name, &e.labels) {
                self.queue.push_back(e.line.clone());
            }
        }
        self.cursor = self.cursor.max(s.rv);
    }
}

#[cfg(test)]
mod tests;
