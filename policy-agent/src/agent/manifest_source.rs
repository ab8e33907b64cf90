//! `--manifests`: directories of YAML, turned into the same changes a watch of the API
//! would give.
//!
//! Only files that changed are read again: inotify (through `notify`) names them, and a
//! scan of the directories' file stamps (path, inode, size, mtime, ctime) finds them when
//! inotify cannot (no watcher, a lost event queue) and once in a while as a safety net.
//! What each file held is remembered as (kind, key) → digest, so a change to one file
//! costs one file's parse, not the whole directory's, and the memory kept is a few dozen
//! bytes per object, not the objects themselves.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use policy_model::cnp::ClusterNetworkPolicy;
use policy_model::{Change, Labels, Namespace, Node, ObjectKey, Pod};
use tracing::{debug, warn};

use crate::agent::services::ServiceChange;
use crate::manifests::{ManifestError, Manifests};

/// Kinds, in the order their changes are applied.
const NAMESPACE: u8 = 0;
const NODE: u8 = 1;
const POD: u8 = 2;
const POLICY: u8 = 3;
const CLUSTER_POLICY: u8 = 4;
const SERVICE: u8 = 5;
const SLICE: u8 = 6;

/// An object as read.
enum Object {
    Namespace(Namespace),
    Pod(Pod),
    /// With its labels, which ClusterNetworkPolicy `nodes` peers read.
    Node(Node, Labels),
    Policy(Box<k8s_openapi::api::networking::v1::NetworkPolicy>),
    ClusterPolicy(Box<ClusterNetworkPolicy>),
    Service(ServiceChange),
}

/// 128 bits of an object's content (two SipHash runs): equal digests, same object.
type Digest = (u64, u64);

fn digest(bytes: &[u8]) -> Digest {
    let run = |seed: u8| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        seed.hash(&mut h);
        bytes.hash(&mut h);
        h.finish()
    };
    (run(0), run(1))
}

impl Object {
    fn digest(&self) -> Digest {
        let bytes = match self {
            Object::Namespace(n) => serde_json::to_vec(n),
            Object::Pod(p) => serde_json::to_vec(p),
            Object::Node(n, labels) => serde_json::to_vec(&(n, labels)),
            Object::Policy(p) => serde_json::to_vec(p),
            Object::ClusterPolicy(p) => serde_json::to_vec(p),
            Object::Service(s) => Ok(format!("{s:?}").into_bytes()),
        };
        digest(&bytes.expect("model objects serialize"))
    }
}

/// A file, ordered as the objects' precedence goes: by directory (in the order given),
/// then path. When several files define one object, the last one wins.
type FileId = (usize, PathBuf);

/// The objects one file defines, by kind and key.
type FileObjects = BTreeMap<(u8, ObjectKey), Object>;

/// Which files define one object, with its digest in each, in precedence order (almost
/// always one file).
type Definitions = Vec<(Arc<FileId>, Digest)>;

/// What identifies one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp { inode: meta.ino(), len: meta.len(), mtime: (meta.mtime(), meta.mtime_nsec()), ctime: (meta.ctime(), meta.ctime_nsec()) }
    }
}

struct FileState {
    stamp: Stamp,
    /// The objects the file defines.
    objects: Box<[(u8, ObjectKey)]>,
    errors: Vec<ManifestError>,
}

/// Paths inotify reported, waiting to be looked at.
#[derive(Default)]
struct Pending {
    /// Path → whether the writer is done with it (closed, renamed, created or removed),
    /// and when it was last reported. A file still being written is left for a moment.
    paths: HashMap<PathBuf, (bool, Instant)>,
    /// Events were lost, or a directory changed: scan everything.
    rescan: bool,
}

struct Watch {
    _watcher: notify::RecommendedWatcher,
    pending: Arc<Mutex<Pending>>,
}

/// Without inotify, the directories are scanned at every poll; with it, this often.
const SAFETY_SCAN: Duration = Duration::from_secs(30);
/// A file reported modified but not closed is read anyway after this long.
const UNSETTLED_GRACE: Duration = Duration::from_millis(100);

pub struct ManifestSource {
    dirs: Vec<PathBuf>,
    files: BTreeMap<Arc<FileId>, FileState>,
    /// Every object, with each file that defines it and its digest there.
    defined: HashMap<(u8, ObjectKey), Definitions>,
    last_errors: Vec<String>,
    watch: Option<Watch>,
    wake: Arc<tokio::sync::Notify>,
    last_scan: Option<Instant>,
}

/// One poll's result.
pub struct Poll {
    pub changes: Vec<Change>,
    pub services: Vec<ServiceChange>,
    /// Set when the set of invalid objects changed (so they are logged once, not every poll).
    pub errors: Option<Vec<ManifestError>>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

fn scan(dirs: &[PathBuf]) -> Result<BTreeMap<FileId, Stamp>, (PathBuf, std::io::Error)> {
    fn walk(index: usize, dir: &Path, out: &mut BTreeMap<FileId, Stamp>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            // Follows symlinks, as reading does.
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            if meta.is_dir() {
                walk(index, &path, out)?;
            } else if meta.is_file() && is_manifest(&path) {
                // Regular files only: reading a FIFO or a device would stall the agent.
                out.insert((index, path), Stamp::of(&meta));
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    for (i, d) in dirs.iter().enumerate() {
        walk(i, d, &mut out).map_err(|e| (d.clone(), e))?;
    }
    Ok(out)
}

impl ManifestSource {
    pub fn new(dirs: Vec<PathBuf>) -> ManifestSource {
        let wake = Arc::new(tokio::sync::Notify::new());
        let watch = match ManifestSource::watch(&dirs, wake.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "cannot watch the manifest directories; scanning them at every poll");
                None
            }
        };
        ManifestSource { dirs, files: BTreeMap::new(), defined: HashMap::new(), last_errors: Vec::new(), watch, wake, last_scan: None }
    }

    fn watch(dirs: &[PathBuf], wake: Arc<tokio::sync::Notify>) -> notify::Result<Watch> {
        use notify::event::{AccessKind, AccessMode, ModifyKind};
        use notify::{EventKind, RecursiveMode, Watcher};
        let pending = Arc::new(Mutex::new(Pending::default()));
        let p = pending.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let mut pending = p.lock().expect("pending lock");
            match event {
                Ok(ev) if ev.need_rescan() => pending.rescan = true,
                Ok(ev) => {
                    let settled = match ev.kind {
                        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                        EventKind::Access(_) => return,
                        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => true,
                        _ => false,
                    };
                    for path in ev.paths {
                        if is_manifest(&path) {
                            pending.paths.insert(path, (settled, Instant::now()));
                        } else if !path.extension().is_some_and(|e| e == "tmp" || e.to_string_lossy().ends_with('~')) {
                            // Maybe a directory (made, moved, removed): look at everything.
                            pending.rescan = true;
                        }
                    }
                }
                Err(_) => pending.rescan = true,
            }
            drop(pending);
            wake.notify_one();
        })?;
        for d in dirs {
            watcher.watch(d, RecursiveMode::Recursive)?;
        }
        Ok(Watch { _watcher: watcher, pending })
    }

    /// Resolves when inotify reported something (so the agent need not wait for its tick).
    pub fn changed(&self) -> Arc<tokio::sync::Notify> {
        self.wake.clone()
    }

    /// Which files to read again: from inotify's reports, or a scan of the stamps.
    fn candidates(&mut self) -> Result<BTreeMap<FileId, Option<Stamp>>, (PathBuf, std::io::Error)> {
        let mut rescan = self.last_scan.is_none_or(|t| t.elapsed() >= SAFETY_SCAN) || self.watch.is_none();
        let mut paths = Vec::new();
        if let Some(w) = &self.watch {
            let mut pending = w.pending.lock().expect("pending lock");
            rescan |= std::mem::take(&mut pending.rescan);
            let now = Instant::now();
            pending.paths.retain(|path, (settled, at)| {
                if *settled || rescan || now.duration_since(*at) >= UNSETTLED_GRACE {
                    paths.push(path.clone());
                    false
                } else {
                    true
                }
            });
            if !pending.paths.is_empty() {
                // Come back for the files still being written.
                self.wake.notify_one();
            }
        }
        let mut out = BTreeMap::new();
        if rescan {
            let now = scan(&self.dirs)?;
            self.last_scan = Some(Instant::now());
            for (id, state) in &self.files {
                if now.get(&**id) != Some(&state.stamp) {
                    out.insert((**id).clone(), now.get(&**id).copied());
                }
            }
            for (id, stamp) in now {
                if !self.files.contains_key(&id) {
                    out.insert(id, Some(stamp));
                }
            }
            return Ok(out);
        }
        for path in paths {
            // The directory it is under (the first, when nested: as a scan would find it).
            let Some(index) = self.dirs.iter().position(|d| path.starts_with(d)) else { continue };
            let id = (index, path);
            let stamp = std::fs::metadata(&id.1).ok().filter(|m| m.is_file()).map(|m| Stamp::of(&m));
            if self.files.get(&id).map(|f| f.stamp) != stamp {
                out.insert(id, stamp);
            }
        }
        Ok(out)
    }

    /// Reads one file into its objects (the last definition of each within the file wins).
    fn read(id: &FileId) -> (FileObjects, Vec<ManifestError>) {
        let mut m = Manifests::default();
        let name = id.1.display().to_string();
        let regular = std::fs::metadata(&id.1).map(|md| md.is_file()).unwrap_or(true);
        match if regular { std::fs::read_to_string(&id.1) } else { Err(std::io::Error::other("not a regular file")) } {
            Ok(text) => m.add_yaml(&name, &text),
            Err(e) => m.errors.push(ManifestError { source: name, object: None, message: format!("cannot read: {e}") }),
        }
        let mut errors = std::mem::take(&mut m.errors);
        let mut objects = BTreeMap::new();
        for (src, ns) in &m.namespaces {
            match Namespace::from_k8s(ns) {
                Ok(n) => {
                    objects.insert((NAMESPACE, ObjectKey::new("", &n.name)), Object::Namespace(n));
                }
                Err(e) => {
                    errors.push(ManifestError { source: src.clone(), object: Some(format!("Namespace {}", e.key)), message: e.to_string() })
                }
            }
        }
        for (src, node) in &m.nodes {
            match Node::from_k8s(node) {
                Ok(n) => {
                    let labels = policy_model::cnp::node_labels_from_k8s(node);
                    objects.insert((NODE, ObjectKey::new("", &n.name)), Object::Node(n, labels));
                }
                Err(e) => {
                    errors.push(ManifestError { source: src.clone(), object: Some(format!("Node {}", e.key)), message: e.to_string() })
                }
            }
        }
        for (src, pod) in &m.pods {
            match Pod::from_k8s(pod) {
                Ok(p) => {
                    objects.insert((POD, p.key.clone()), Object::Pod(p));
                }
                Err(e) => {
                    errors.push(ManifestError { source: src.clone(), object: Some(format!("Pod {}", e.key)), message: e.to_string() })
                }
            }
        }
        for (_, np) in m.policies {
            let key = ObjectKey::new(np.metadata.namespace.clone().unwrap_or_default(), np.metadata.name.clone().unwrap_or_default());
            objects.insert((POLICY, key), Object::Policy(Box::new(np)));
        }
        // Validated by the compiler, which reports a refused one (as for NetworkPolicies).
        for (_, cnp) in m.cluster_policies {
            let key = ObjectKey::new("", cnp.metadata.name.clone().unwrap_or_default());
            objects.insert((CLUSTER_POLICY, key), Object::ClusterPolicy(Box::new(cnp)));
        }
        for (_, svc) in &m.services {
            if let ServiceChange::UpsertService(key, ips) = ServiceChange::from_service(svc) {
                objects.insert((SERVICE, key.clone()), Object::Service(ServiceChange::UpsertService(key, ips)));
            }
        }
        for (_, slice) in &m.endpoint_slices {
            if let Some(c @ ServiceChange::UpsertSlice { .. }) = ServiceChange::from_slice(slice) {
                let ServiceChange::UpsertSlice { slice: key, .. } = &c else { unreachable!() };
                objects.insert((SLICE, key.clone()), Object::Service(c));
            }
        }
        (objects, errors)
    }

    fn winner(&self, id: &(u8, ObjectKey)) -> Option<(&FileId, Digest)> {
        self.defined.get(id).and_then(|files| files.last()).map(|(f, d)| (&**f, *d))
    }

    /// Reads what changed in the directories and returns the changes since the last call.
    pub fn poll(&mut self) -> Result<Poll, (PathBuf, std::io::Error)> {
        let candidates = self.candidates()?;
        if candidates.is_empty() {
            return Ok(Poll { changes: Vec::new(), services: Vec::new(), errors: None });
        }
        debug!(files = candidates.len(), "reading changed manifest files");
        // Objects the changed files define (before or after), with their winning version
        // before the change.
        let mut affected: BTreeMap<(u8, ObjectKey), Option<Digest>> = BTreeMap::new();
        let mut fresh: HashMap<(u8, ObjectKey), (FileId, Object)> = HashMap::new();
        let mut read: BTreeMap<FileId, (Option<Stamp>, FileObjects, Vec<ManifestError>)> = BTreeMap::new();
        for (id, stamp) in candidates {
            let (objects, errors) = if stamp.is_some() { ManifestSource::read(&id) } else { (BTreeMap::new(), Vec::new()) };
            for key in self.files.get(&id).into_iter().flat_map(|f| f.objects.iter()).chain(objects.keys()) {
                if !affected.contains_key(key) {
                    affected.insert(key.clone(), self.winner(key).map(|(_, d)| d));
                }
            }
            read.insert(id, (stamp, objects, errors));
        }
        for (id, (stamp, objects, errors)) in read {
            if let Some(old) = self.files.remove(&id) {
                for key in old.objects {
                    if let Some(files) = self.defined.get_mut(&key) {
                        files.retain(|(f, _)| **f != id);
                        if files.is_empty() {
                            self.defined.remove(&key);
                        }
                    }
                }
            }
            let Some(stamp) = stamp else { continue };
            let file = Arc::new(id);
            let mut keys = Vec::with_capacity(objects.len());
            for (key, obj) in objects {
                let files = self.defined.entry(key.clone()).or_default();
                let at = files.partition_point(|(f, _)| **f < *file);
                files.insert(at, (file.clone(), obj.digest()));
                keys.push(key.clone());
                // Files are read in precedence order: a later one replaces an earlier one.
                fresh.insert(key, ((*file).clone(), obj));
            }
            self.files.insert(file, FileState { stamp, objects: keys.into_boxed_slice(), errors });
        }

        let mut changes = Vec::new();
        let mut services = Vec::new();
        let mut upserts = Vec::new();
        for (key, before) in affected {
            let now = self.winner(&key).map(|(f, d)| (f.clone(), d));
            match now {
                None if before.is_some() => {
                    let (kind, k) = key;
                    match kind {
                        NAMESPACE => changes.push(Change::DeleteNamespace(k.name.to_string())),
                        NODE => {
                            changes.push(Change::UpsertNodeLabels { node: k.name.to_string(), labels: Labels::default() });
                            changes.push(Change::DeleteNode(k.name.to_string()))
                        }
                        POD => changes.push(Change::DeletePod(k)),
                        POLICY => changes.push(Change::DeletePolicy(k)),
                        CLUSTER_POLICY => changes.push(Change::DeleteClusterPolicy(k.name.to_string())),
                        SERVICE => services.push(ServiceChange::DeleteService(k)),
                        _ => services.push(ServiceChange::DeleteSlice(k)),
                    }
                }
                Some((file, d)) if before != Some(d) => {
                    // The winning version, read this round or (rarely: an unchanged file
                    // whose definition now wins) read again.
                    let obj = match fresh.remove(&key) {
                        Some((f, obj)) if f == file => Some(obj),
                        _ => ManifestSource::read(&file).0.remove(&key),
                    };
                    match obj {
                        Some(obj) => upserts.push(obj),
                        None => {
                            warn!(file = %file.1.display(), "a manifest file changed while being read; it is read again at the next poll")
                        }
                    }
                }
                _ => {}
            }
        }
        for obj in upserts {
            match obj {
                Object::Namespace(n) => changes.push(Change::UpsertNamespace(n)),
                Object::Node(n, labels) => {
                    changes.push(Change::UpsertNodeLabels { node: n.name.clone(), labels });
                    changes.push(Change::UpsertNode(n));
                }
                Object::Pod(p) => changes.push(Change::UpsertPod(p)),
                Object::Policy(p) => changes.push(Change::UpsertPolicy(p)),
                Object::ClusterPolicy(p) => changes.push(Change::UpsertClusterPolicy(p)),
                Object::Service(c) => services.push(c),
            }
        }

        let errors: Vec<ManifestError> = self.files.values().flat_map(|f| f.errors.iter().cloned()).collect();
        let rendered: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        let errors = if rendered != self.last_errors {
            self.last_errors = rendered;
            Some(errors)
        } else {
            None
        };
        Ok(Poll { changes, services, errors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        // A new inode each time, as editors and `kubectl` do: the stamp always changes.
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }

    fn pod(name: &str, label: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: {label}}}}}\nspec: {{nodeName: n1, containers: []}}\nstatus: {{podIPs: [{{ip: 10.0.0.1}}]}}\n"
        )
    }

    fn policy(name: &str, app: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec: {{podSelector: {{matchLabels: {{app: {app}}}}}}}\n"
        )
    }

    fn describe(p: &Poll) -> Vec<String> {
        p.changes
            .iter()
            .map(|c| match c {
                Change::UpsertPod(p) => format!("upsert pod {} {}", p.key, p.labels.get("app").unwrap_or_default()),
                Change::DeletePod(k) => format!("delete pod {k}"),
                Change::UpsertPolicy(p) => format!("upsert policy {}", p.metadata.name.as_deref().unwrap()),
                Change::DeletePolicy(k) => format!("delete policy {k}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// Polls until something changes (inotify reports asynchronously; the safety scan is
    /// not relied on within a test).
    fn next(s: &mut ManifestSource) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let p = s.poll().unwrap();
            if !p.changes.is_empty() || Instant::now() > deadline {
                return describe(&p);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn only_changed_objects_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &pod("a", "one"));
        write(dir.path(), "b.yaml", &format!("{}---\n{}", pod("b", "one"), policy("p", "one")));
        let mut s = ManifestSource::new(vec![dir.path().to_path_buf()]);
        assert_eq!(describe(&s.poll().unwrap()), ["upsert pod x/a one", "upsert pod x/b one", "upsert policy p"]);
        assert!(s.poll().unwrap().changes.is_empty());

        // One object of a two-object file changes: only it is reported.
        write(dir.path(), "b.yaml", &format!("{}---\n{}", pod("b", "two"), policy("p", "one")));
        assert_eq!(next(&mut s), ["upsert pod x/b two"]);
        // Rewritten with the same content: nothing.
        write(dir.path(), "a.yaml", &pod("a", "one"));
        std::thread::sleep(Duration::from_millis(50));
        assert!(s.poll().unwrap().changes.is_empty());
        // A file goes: its objects are deleted.
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        assert_eq!(next(&mut s), ["delete pod x/b", "delete policy x/p"]);
    }

    fn cluster_policy(name: &str, priority: u16) -> String {
        format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec: {{tier: Admin, priority: {priority}, subject: {{namespaces: {{}}}}, ingress: [{{name: r, action: Deny, from: [{{namespaces: {{}}}}]}}]}}\n"
        )
    }

    fn node(name: &str, zone: &str) -> String {
        format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{zone: {zone}}}}}\nstatus: {{addresses: [{{type: InternalIP, address: 10.250.0.1}}]}}\n")
    }

    fn describe_cnp(p: &Poll) -> Vec<String> {
        p.changes
            .iter()
            .map(|c| match c {
                Change::UpsertClusterPolicy(p) => format!("upsert cnp {} {:?}", p.metadata.name.as_deref().unwrap(), p.spec.priority),
                Change::DeleteClusterPolicy(n) => format!("delete cnp {n}"),
                Change::UpsertNodeLabels { node, labels } => format!("labels {node} {:?}", labels.get("zone")),
                Change::UpsertNode(n) => format!("node {}", n.name),
                Change::DeleteNode(n) => format!("delete node {n}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// ClusterNetworkPolicies (named without a namespace) and Node labels come and go as
    /// the files do; another group's kind of the same name is not ours.
    #[test]
    fn cluster_policies_and_node_labels() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "c.yaml", &cluster_policy("c", 5));
        write(dir.path(), "n.yaml", &node("n1", "a"));
        write(dir.path(), "other.yaml", &cluster_policy("o", 1).replace("policy.networking.k8s.io/v1alpha2", "example.com/v1"));
        let mut s = ManifestSource::new(vec![dir.path().to_path_buf()]);
        s.watch = None;
        assert_eq!(describe_cnp(&s.poll().unwrap()), ["labels n1 Some(\"a\")", "node n1", "upsert cnp c Some(5)"]);
        write(dir.path(), "c.yaml", &cluster_policy("c", 6));
        write(dir.path(), "n.yaml", &node("n1", "b"));
        assert_eq!(describe_cnp(&s.poll().unwrap()), ["labels n1 Some(\"b\")", "node n1", "upsert cnp c Some(6)"]);
        std::fs::remove_file(dir.path().join("c.yaml")).unwrap();
        std::fs::remove_file(dir.path().join("n.yaml")).unwrap();
        assert_eq!(describe_cnp(&s.poll().unwrap()), ["labels n1 None", "delete node n1", "delete cnp c"]);
    }

    #[test]
    fn the_last_file_defining_an_object_wins() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "1.yaml", &pod("a", "first"));
        write(dir.path(), "2.yaml", &pod("a", "second"));
        let mut s = ManifestSource::new(vec![dir.path().to_path_buf()]);
        assert_eq!(describe(&s.poll().unwrap()), ["upsert pod x/a second"]);
        // The winning definition goes: the other one applies again (read from its file).
        std::fs::remove_file(dir.path().join("2.yaml")).unwrap();
        assert_eq!(next(&mut s), ["upsert pod x/a first"]);
        // A change to the losing one alone... is now the winner's.
        write(dir.path(), "1.yaml", &pod("a", "third"));
        assert_eq!(next(&mut s), ["upsert pod x/a third"]);
    }

    #[test]
    fn scanning_finds_changes_without_inotify() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        write(&sub, "a.yaml", &pod("a", "one"));
        let mut s = ManifestSource::new(vec![dir.path().to_path_buf()]);
        s.watch = None;
        assert_eq!(describe(&s.poll().unwrap()), ["upsert pod x/a one"]);
        write(&sub, "a.yaml", &pod("a", "two"));
        assert_eq!(describe(&s.poll().unwrap()), ["upsert pod x/a two"]);
        std::fs::remove_dir_all(&sub).unwrap();
        assert_eq!(describe(&s.poll().unwrap()), ["delete pod x/a"]);
    }

    #[test]
    fn a_new_directory_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ManifestSource::new(vec![dir.path().to_path_buf()]);
        assert!(s.poll().unwrap().changes.is_empty());
        let staging = tempfile::tempdir().unwrap();
        write(staging.path(), "a.yaml", &pod("a", "one"));
        std::fs::rename(staging.path(), dir.path().join("moved-in")).unwrap();
        assert_eq!(next(&mut s), ["upsert pod x/a one"]);
    }
}
