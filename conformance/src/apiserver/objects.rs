//! Objects shaped as a real API server returns them: besides what the agent uses, the
//! metadata a cluster piles on (managedFields of several managers with their fieldsV1,
//! kubectl's last-applied-configuration annotation, ownerReferences) and full pod specs
//! and statuses (containers with images, resources, probes, mounts and env; conditions,
//! container statuses, host and pod IPs, QoS class). Sizes are those of real objects:
//! about 7 KiB of JSON per pod of a Deployment.

use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy_model::{Namespace, Pod};
use serde_json::{Map, Value, json};

/// RFC 3339 in UTC, seconds precision, as the API writes `metav1.Time`.
pub fn timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn now() -> String {
    timestamp(SystemTime::now())
}

/// The fieldsV1 of a managedFields entry that owns every field of `v`: objects become
/// `f:<field>` maps, lists of named objects `k:{"name":..}` entries, other lists and
/// scalars `{}`.
pub fn fields_v1(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                out.insert(format!("f:{k}"), fields_v1(v));
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            let mut out = Map::new();
            for item in items {
                let key = ["name", "type", "containerPort", "ip", "port"].iter().find_map(|k| item.get(*k).map(|v| (*k, v)));
                match key {
                    Some((k, kv)) => {
                        let mut e = fields_v1(item);
                        if let Value::Object(m) = &mut e {
                            m.insert(".".into(), json!({}));
                        }
                        out.insert(format!("k:{}", json!({ k: kv })), e);
                    }
                    None => {
                        out.insert(format!("v:{item}"), json!({}));
                    }
                }
            }
            Value::Object(out)
        }
        _ => json!({}),
    }
}

fn managed(manager: &str, operation: &str, subresource: Option<&str>, fields: Value) -> Value {
    let mut e = json!({"manager": manager, "operation": operation, "apiVersion": "v1", "time": now(), "fieldsType": "FieldsV1", "fieldsV1": fields_v1(&fields)});
    if let Some(s) = subresource {
        e["subresource"] = json!(s);
    }
    e
}

/// A Namespace as `kubectl apply` leaves it.
pub fn namespace(ns: &Namespace) -> Value {
    let mut labels = ns.labels.clone();
    labels.insert("kubernetes.io/metadata.name", &ns.name);
    let applied = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns.name, "labels": ns.labels, "annotations": {}}});
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {
            "name": ns.name, "labels": labels,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{applied}\n")},
            "managedFields": [managed("kubectl-client-side-apply", "Update", None, json!({"metadata": {"labels": ns.labels, "annotations": {"kubectl.kubernetes.io/last-applied-configuration": ""}}}))],
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// A pod of a Deployment, running, as the API returns it: owner ReplicaSet, several
/// managers' fields, a full spec (two containers, probes, resources, mounts, env) and
/// status.
pub fn pod(p: &Pod) -> Value {
    let app = p.labels.get("app").map(str::to_string).unwrap_or_else(|| p.key.name.to_string());
    let hash = format!("{:x}", crc32c::crc32c(p.key.namespace.as_bytes()) % 0xfffffff);
    let mut labels = p.labels.clone();
    labels.insert("pod-template-hash", &hash);
    let ports: Vec<Value> =
        p.named_ports.iter().map(|n| json!({"name": n.name, "containerPort": n.port, "protocol": n.protocol.to_string()})).collect();
    let host_ip =
        p.node.as_deref().map(|n| format!("10.250.{}.{}", n.len() % 250, n.bytes().map(u32::from).sum::<u32>() % 250)).unwrap_or_default();
    let mounts = json!([{"name": "kube-api-access-x7k2p", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
        {"name": "config", "mountPath": "/etc/app"}]);
    let containers = json!([
        {"name": "app", "image": format!("registry.example.com/team/{app}:v1.42.7"), "imagePullPolicy": "IfNotPresent",
         "args": ["--config=/etc/app/config.yaml", "--log-level=info", "--listen=:8000"],
         "ports": ports,
         "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                 {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}},
                 {"name": "GOMAXPROCS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}},
                 {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.monitoring.svc:4317"}],
         "resources": {"limits": {"cpu": "1", "memory": "512Mi"}, "requests": {"cpu": "250m", "memory": "256Mi"}},
         "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8000, "scheme": "HTTP"}, "initialDelaySeconds": 10, "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3},
         "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8000, "scheme": "HTTP"}, "timeoutSeconds": 1, "periodSeconds": 5, "successThreshold": 1, "failureThreshold": 3},
         "volumeMounts": mounts,
         "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
         "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}}},
        {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.24.2", "imagePullPolicy": "IfNotPresent",
         "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local", "--proxyLogLevel=warning"],
         "resources": {"limits": {"cpu": "2", "memory": "1Gi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
         "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
         "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"}
    ]);
    let spec = json!({
        "volumes": [{"name": "config", "configMap": {"name": format!("{app}-config"), "defaultMode": 420}},
                    {"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}],
        "containers": containers,
        "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default", "serviceAccount": "default",
        "nodeName": p.node, "hostNetwork": p.host_network,
        "securityContext": {"fsGroup": 2000},
        "schedulerName": "default-scheduler",
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
        "priority": 0, "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority",
    });
    let started = now();
    let container_status = |name: &str, image: &str| {
        json!({"name": name, "state": {"running": {"startedAt": started}}, "lastState": {}, "ready": true, "restartCount": 0,
            "image": image, "imageID": format!("{image}@sha256:{}", "3f1a9c".repeat(10) + "abcd"),
            "containerID": format!("containerd://{}", "9b2e4d7c1a".repeat(6) + "abcd"), "started": true,
            "volumeMounts": [{"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true, "recursiveReadOnly": "Disabled"}]})
    };
    let mut status = json!({
        "phase": "Running",
        "conditions": [
            {"type": "PodReadyToStartContainers", "status": "True", "lastProbeTime": null, "lastTransitionTime": started},
            {"type": "Initialized", "status": "True", "lastProbeTime": null, "lastTransitionTime": started},
            {"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": started},
            {"type": "ContainersReady", "status": "True", "lastProbeTime": null, "lastTransitionTime": started},
            {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": started}],
        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "startTime": started,
        "containerStatuses": [container_status("app", &format!("registry.example.com/team/{app}:v1.42.7")), container_status("istio-proxy", "docker.io/istio/proxyv2:1.24.2")],
        "qosClass": "Burstable",
    });
    if let Some(first) = p.ips.first() {
        status["podIP"] = json!(first.to_string());
        status["podIPs"] = json!(p.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>());
    } else {
        status["phase"] = json!("Pending");
    }
    let rs = format!("{app}-{hash}");
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": p.key.name, "namespace": p.key.namespace, "generateName": format!("{rs}-"),
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-02T08:14:55Z", "prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs, "uid": "5d0c2f7e-81a3-4c4b-9e1f-2b6f0d8c9a71", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                managed("kube-controller-manager", "Update", None, json!({"metadata": {"generateName": "", "labels": labels, "annotations": {"kubectl.kubernetes.io/restartedAt": ""}, "ownerReferences": [{"uid": ""}]}, "spec": spec})),
                managed("kubelet", "Update", Some("status"), json!({"status": status})),
            ],
        },
        "spec": spec,
        "status": status,
    })
}

/// A pod that has no address yet (scheduled, sandbox not made).
pub fn pending_pod(p: &Pod) -> Value {
    let mut p = p.clone();
    p.ips.clear();
    pod(&p)
}

/// A NetworkPolicy as `kubectl apply` leaves it: the last-applied-configuration (the
/// whole object again) and kubectl's managedFields.
pub fn network_policy(np: &NetworkPolicy) -> Value {
    let mut applied = serde_json::to_value(np).expect("serializable");
    applied["apiVersion"] = json!("networking.k8s.io/v1");
    applied["kind"] = json!("NetworkPolicy");
    network_policy_json(applied)
}

/// [`network_policy`] from JSON.
pub fn network_policy_json(applied: Value) -> Value {
    let mut obj = applied.clone();
    obj["apiVersion"] = json!("networking.k8s.io/v1");
    obj["kind"] = json!("NetworkPolicy");
    // As `kubectl apply` leaves it: the applied object's own annotations, and the applied
    // configuration (those annotations included) in one more.
    let mut annotations = applied.pointer("/metadata/annotations").cloned().filter(Value::is_object).unwrap_or(json!({}));
    let mut last = applied.clone();
    last["metadata"]["annotations"] = annotations.clone();
    annotations["kubectl.kubernetes.io/last-applied-configuration"] = json!(format!("{last}\n"));
    let mut annotation_fields = annotations.clone();
    for v in annotation_fields.as_object_mut().expect("an object").values_mut() {
        *v = json!("");
    }
    obj["metadata"]["annotations"] = annotations;
    let fields = json!({"metadata": {"annotations": annotation_fields}, "spec": applied.get("spec").cloned().unwrap_or(json!({}))});
    obj["metadata"]["managedFields"] = json!([{"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "networking.k8s.io/v1",
        "time": now(), "fieldsType": "FieldsV1", "fieldsV1": fields_v1(&fields)}]);
    obj
}

/// A Node with its addresses and the status a kubelet reports.
pub fn node(name: &str, addresses: &[std::net::IpAddr]) -> Value {
    let mut addrs: Vec<Value> = addresses.iter().map(|a| json!({"type": "InternalIP", "address": a.to_string()})).collect();
    addrs.push(json!({"type": "Hostname", "address": name}));
    let t = now();
    let conditions: Vec<Value> = ["MemoryPressure", "DiskPressure", "PIDPressure"]
        .iter()
        .map(|c| json!({"type": c, "status": "False", "lastHeartbeatTime": t, "lastTransitionTime": t, "reason": format!("KubeletHasNo{c}"), "message": "kubelet has no pressure"}))
        .chain([json!({"type": "Ready", "status": "True", "lastHeartbeatTime": t, "lastTransitionTime": t, "reason": "KubeletReady", "message": "kubelet is posting ready status"})])
        .collect();
    let images: Vec<Value> = (0..20)
        .map(|i| json!({"names": [format!("registry.example.com/team/app-{i}@sha256:{}", "5e".repeat(32)), format!("registry.example.com/team/app-{i}:v1.42.7")], "sizeBytes": 50_000_000 + i * 1_234_567}))
        .collect();
    let status = json!({
        "capacity": {"cpu": "16", "ephemeral-storage": "203056560Ki", "hugepages-2Mi": "0", "memory": "65843216Ki", "pods": "110"},
        "allocatable": {"cpu": "15890m", "ephemeral-storage": "187136925387", "hugepages-2Mi": "0", "memory": "63198224Ki", "pods": "110"},
        "conditions": conditions,
        "addresses": addrs,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {"machineID": "ec2d0d2c8b7c4f4c9a0e0e6f1b2c3d4e", "systemUUID": "ec2d0d2c-8b7c-4f4c-9a0e-0e6f1b2c3d4e", "bootID": "0b4f3c2a-1d5e-4f6a-8b7c-9d0e1f2a3b4c",
            "kernelVersion": "6.12.0-cloud-amd64", "osImage": "Debian GNU/Linux 13 (trixie)", "containerRuntimeVersion": "containerd://2.1.4",
            "kubeletVersion": "v1.36.0", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        "images": images,
    });
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name,
            "labels": {"beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "node.kubernetes.io/instance-type": "m6i.4xlarge", "topology.kubernetes.io/zone": "eu-west-1a"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true"},
            "managedFields": [managed("kubelet", "Update", Some("status"), json!({"status": status}))]},
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24", "fd10:244::/64"], "providerID": format!("aws:///eu-west-1a/i-0{name}")},
        "status": status,
    })
}

/// A ClusterIP Service.
pub fn service(namespace: &str, name: &str, cluster_ips: &[std::net::IpAddr], selector: Value, port: u16, target_port: u16) -> Value {
    let spec = json!({"clusterIP": cluster_ips.first().map(|i| i.to_string()), "clusterIPs": cluster_ips.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
        "type": "ClusterIP", "sessionAffinity": "None", "ipFamilyPolicy": "PreferDualStack", "internalTrafficPolicy": "Cluster",
        "selector": selector, "ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": target_port}]});
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name},
            "managedFields": [managed("kubectl-client-side-apply", "Update", None, json!({"spec": spec}))]},
        "spec": spec, "status": {"loadBalancer": {}}})
}

/// An EndpointSlice of `service` with ready endpoints at `addresses`.
pub fn endpoint_slice(namespace: &str, name: &str, service: &str, addresses: &[std::net::IpAddr], port: u16) -> Value {
    let family = if addresses.first().is_some_and(|a| a.is_ipv6()) { "IPv6" } else { "IPv4" };
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service, "uid": "0e7a1c4b-2d3f-4a5b-8c6d-7e8f9a0b1c2d", "controller": true, "blockOwnerDeletion": true}]},
        "addressType": family,
        "endpoints": addresses.iter().map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": "node-1"})).collect::<Vec<_>>(),
        "ports": [{"name": "http", "protocol": "TCP", "port": port}]})
}
