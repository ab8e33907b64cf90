//! The stand-in itself: list paging, watch from a version, 410 after a restart or beyond
//! the window, bookmarks, timeouts, stop, Events; over plain HTTP and through kube-rs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use kube::runtime::watcher;
use serde_json::{Value, json};

use super::{ApiServer, Kind};

fn ns(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"team": "a"}}})
}

fn pod(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i"}]}, "status": {"phase": "Running", "podIPs": [{"ip": "10.244.0.1"}]}})
}

/// GET over HTTP/1.0: the status and the whole body (until the server closes).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.split(' ').nth(1).unwrap().parse().unwrap(), body.to_string())
}

/// Opens a watch and returns a reader of its event lines.
fn open_watch(addr: SocketAddr, path: &str) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            return r;
        }
        assert!(!line.is_empty(), "connection closed in the headers");
    }
}

fn next_event(r: &mut BufReader<TcpStream>) -> Option<Value> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => None,
        Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))),
        Err(e) => panic!("reading a watch: {e}"),
    }
}

#[test]
fn lists_page_with_continue_and_one_version() {
    let api = ApiServer::start_local().unwrap();
    api.apply_all((0..1200).map(|i| pod("x", &format!("p{i:04}"))));
    api.apply_json(ns("x"));
    let rv = api.resource_version();
    let mut names = Vec::new();
    let mut path = "/api/v1/pods?limit=500&resourceVersion=0&resourceVersionMatch=NotOlderThan".to_string();
    let mut pages = 0;
    loop {
        let (code, body) = get(api.addr(), &path);
        assert_eq!(code, 200, "{body}");
        let list: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(list["kind"], "PodList");
        assert_eq!(list["metadata"]["resourceVersion"], rv.to_string());
        for item in list["items"].as_array().unwrap() {
            assert!(item.get("kind").is_none(), "list items carry no kind");
            assert!(item["metadata"]["uid"].is_string() && item["metadata"]["creationTimestamp"].is_string());
            names.push(item["metadata"]["name"].as_str().unwrap().to_string());
        }
        pages += 1;
        // Written between pages: the list stays at its version.
        api.apply_json(pod("y", &format!("late{pages}")));
        match list["metadata"]["continue"].as_str() {
            Some(c) => path = format!("/api/v1/pods?limit=500&continue={c}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names.len(), 1200 + 2, "the later pods in y sort after x and appear on the last page: {}", names.len());
    assert_eq!(names.iter().filter(|n| n.starts_with('p')).count(), 1200);
    // Cluster-scoped, a field selector, a namespaced path.
    let (_, body) = get(api.addr(), "/api/v1/namespaces?fieldSelector=metadata.name%3Dx");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["items"].as_array().unwrap().len(), 1);
    let (_, body) = get(api.addr(), "/api/v1/namespaces/y/pods");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["items"].as_array().unwrap().len(), 3);
    // A continue token from before a restart has expired.
    let (_, body) = get(api.addr(), "/api/v1/pods?limit=10");
    let token = serde_json::from_str::<Value>(&body).unwrap()["metadata"]["continue"].as_str().unwrap().to_string();
    api.restart(1_000_000).unwrap();
    let (code, body) = get(api.addr(), &format!("/api/v1/pods?limit=10&continue={token}"));
    assert_eq!(code, 410, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["reason"], "Expired");
}

#[test]
fn watches_stream_events_after_a_version_and_410_when_it_is_gone() {
    let api = ApiServer::start_local().unwrap();
    api.apply_json(pod("x", "a"));
    let from = api.resource_version();
    let rv_b = api.apply_json(pod("x", "b"));
    let mut w = open_watch(api.addr(), &format!("/api/v1/pods?watch=true&resourceVersion={from}"));
    let mut a2 = pod("x", "a");
    a2["metadata"]["labels"]["v"] = json!("2");
    api.apply_json(a2);
    api.apply_json(ns("x")); // another kind: not in this watch
    api.delete(Kind::Pod, "x", "b").unwrap();
    let seen: Vec<(String, String, String)> = (0..3)
        .map(|_| {
            let e = next_event(&mut w).unwrap();
            assert_eq!(e["object"]["kind"], "Pod");
            assert_eq!(e["object"]["apiVersion"], "v1");
            (
                e["type"].as_str().unwrap().to_string(),
                e["object"]["metadata"]["name"].as_str().unwrap().to_string(),
                e["object"]["metadata"]["resourceVersion"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(seen[0], ("ADDED".into(), "b".into(), rv_b.to_string()));
    assert_eq!((seen[1].0.as_str(), seen[1].1.as_str()), ("MODIFIED", "a"));
    assert_eq!((seen[2].0.as_str(), seen[2].1.as_str()), ("DELETED", "b"));
    assert!(seen[2].2.parse::<u64>().unwrap() > seen[1].2.parse::<u64>().unwrap());

    // A restart with a new base: the stream is cut, and a resumed watch gets 410.
    api.restart(1_000_000).unwrap();
    assert!(next_event(&mut w).is_none(), "the restart dropped the watch");
    let mut w = open_watch(api.addr(), &format!("/api/v1/pods?watch=true&resourceVersion={from}"));
    let e = next_event(&mut w).unwrap();
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["object"]["kind"], "Status");
    assert_eq!(e["object"]["code"], 410);
    assert_eq!(e["object"]["reason"], "Expired");
    assert!(e["object"]["message"].as_str().unwrap().starts_with(&format!("too old resource version: {from} (")), "{e}");
    assert!(next_event(&mut w).is_none(), "the stream ends after the error");

    // Beyond the retained window, too.
    api.set_window(5);
    let old = api.resource_version();
    for i in 0..10 {
        api.apply_json(pod("x", &format!("w{i}")));
    }
    let e = next_event(&mut open_watch(api.addr(), &format!("/api/v1/pods?watch=1&resourceVersion={old}"))).unwrap();
    assert_eq!(e["object"]["code"], 410, "{e}");
}

#[test]
fn bookmarks_timeouts_and_stop() {
    let api = ApiServer::start_local().unwrap();
    api.set_bookmark_interval(Duration::from_millis(200));
    api.apply_json(ns("x"));
    let rv = api.resource_version();
    let t0 = Instant::now();
    let mut w =
        open_watch(api.addr(), &format!("/api/v1/namespaces?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=1"));
    let e = next_event(&mut w).unwrap();
    assert_eq!(e["type"], "BOOKMARK");
    assert_eq!(e["object"]["metadata"]["resourceVersion"], rv.to_string());
    while next_event(&mut w).is_some() {}
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "timeoutSeconds=1 ended the watch after {took:?}");
    // Without allowWatchBookmarks: none.
    let mut w = open_watch(api.addr(), &format!("/api/v1/namespaces?watch=true&resourceVersion={rv}&timeoutSeconds=1"));
    assert!(next_event(&mut w).is_none());

    api.stop();
    assert!(TcpStream::connect(api.addr()).is_err(), "a stopped server refuses connections");
    api.resume().unwrap();
    assert_eq!(get(api.addr(), "/api/v1/namespaces").0, 200);
    assert_eq!(get(api.addr(), "/api/v1/secrets").0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_lists_watches_relists_after_410_and_records_events() {
    let api = tokio::task::spawn_blocking(|| ApiServer::start_local().unwrap()).await.unwrap();
    let api = std::sync::Arc::new(api);
    api.apply_all((0..700).map(|i| pod("x", &format!("p{i}"))));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let pods: kube::Api<core::Pod> = kube::Api::all(client.clone());
    let mut stream = watcher(pods, watcher::Config::default()).boxed();
    let mut listed = 0;
    loop {
        match stream.next().await.unwrap().unwrap() {
            watcher::Event::InitApply(p) => {
                assert!(p.metadata.uid.is_some());
                listed += 1;
            }
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(listed, 700, "kube-rs paged through the whole list (500 a page)");
    let a = api.clone();
    tokio::task::spawn_blocking(move || a.apply_json(pod("x", "new"))).await.unwrap();
    match stream.next().await.unwrap().unwrap() {
        watcher::Event::Apply(p) => assert_eq!(p.metadata.name.as_deref(), Some("new")),
        other => panic!("expected the new pod, got {other:?}"),
    }
    let a = api.clone();
    tokio::task::spawn_blocking(move || a.restart(1_000_000).unwrap()).await.unwrap();
    // The cut watch is resumed from its version, which the restarted server has not: 410.
    let mut saw_410 = false;
    loop {
        match stream.next().await.unwrap() {
            Err(watcher::Error::WatchError(s)) if s.code == 410 => saw_410 = true,
            Err(_) => {}
            Ok(watcher::Event::Init) => assert!(saw_410, "a relist follows the 410"),
            Ok(watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::InitDone) => break,
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    let lists = api.requests()["GET pods"];
    assert_eq!(lists, 2 + 2, "two pages, then two again after the 410: {:?}", api.requests());

    // Events through kube's recorder.
    let recorder = kube::runtime::events::Recorder::new(
        client,
        kube::runtime::events::Reporter { controller: "policy-agent".into(), instance: Some("node-1".into()) },
    );
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("networking.k8s.io/v1".into()),
        kind: Some("NetworkPolicy".into()),
        name: Some("bad".into()),
        namespace: Some("x".into()),
        ..Default::default()
    };
    let ev = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Warning,
        reason: "Invalid".into(),
        note: Some("spec.ingress[0]: bad".into()),
        action: "Enforce".into(),
        secondary: None,
    };
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();
    let events = api.events();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["regarding"]["name"], "bad");
    assert_eq!(events[0]["reason"], "Invalid");
    assert_eq!(events[1]["series"]["count"], 2, "the second is a patch of the first: {}", events[1]);
}
