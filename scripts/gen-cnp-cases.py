#!/usr/bin/env python3
"""Writes conformance/cases/cnp/*.yaml: upstream ClusterNetworkPolicy conformance tests
(kubernetes-sigs/network-policy-api v0.2.0, conformance/tests/*.go) as case files.

Expectations are the upstream tests' PokeServer assertions, pod for pod; every other cell
is unchecked. The harness differs from upstream's base fixture in names and ports only:
  namespaces  gryffindor -> x, slytherin -> y, hufflepuff -> z, ravenclaw -> w
  pods        harry-potter-N (x), draco-malfoy-N (y), cedric-diggory-N (z), luna-lovegood-N (w)
  ports       upstream's first port of a protocol (TCP 80, UDP 53, SCTP 9003) -> 80,
              its second (TCP 8080, UDP 5353, SCTP 9005) -> 81 (the harness serves 80, 81)
Policies select namespaces by kubernetes.io/metadata.name, as upstream's do.

Coverage: all 24 of upstream's tests (92 subtests). The two EgressNodePeers tests probe a
host-network pod (centaur-1, a node's address) on upstream's HostNetworkPorts; here their probes
say `to: nodes`: every node's own address, served (TCP, UDP, SCTP on 80, 81) in the node's
namespace, each node labelled kubernetes.io/os=linux; the cell must hold for every node.
SCTP: this machine has no SCTP kernel module (and nothing may load one), so the harness speaks
SCTP as raw protocol-132 packets: a probe is an INIT that passes if an INIT ACK comes back, as
the servers answer. That exercises the agent's verdicts on SCTP ports, not a real SCTP
association as upstream's agnhost makes one. The cases that probe SCTP (IngressSCTP, EgressSCTP
of both tiers, both Gress, both EgressInlineCIDRPeers, both EgressNodePeers) therefore pass on
emulated SCTP only.
"""
import copy, json, os, sys

HOUSE = {"gryffindor": "x", "slytherin": "y", "hufflepuff": "z", "ravenclaw": "w"}
PODS = ["x/harry-potter-0", "x/harry-potter-1", "y/draco-malfoy-0", "y/draco-malfoy-1",
        "z/cedric-diggory-0", "z/cedric-diggory-1", "w/luna-lovegood-0", "w/luna-lovegood-1"]
SHORT = {"harry": "x/harry-potter-", "draco": "y/draco-malfoy-", "cedric": "z/cedric-diggory-", "luna": "w/luna-lovegood-"}
FIRST, SECOND = 80, 81

def pod(s):  # "luna-0" -> "w/luna-lovegood-0"
    name, n = s.rsplit("-", 1)
    return SHORT[name] + n

def ns(house):
    return {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": HOUSE[house]}}}

def port(proto, number):
    return [{proto.lower(): {"destinationPort": {"number": number}}}]

def rule(name, action, house, direction, proto=None, number=None):
    r = {"name": name, "action": action, ("from" if direction == "ingress" else "to"): [ns(house)]}
    if proto:
        r["protocols"] = port(proto, number)
    return r

def cnp(name, tier, priority, subject_house, direction, rules):
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name},
            "spec": {"tier": tier, "priority": priority,
                     "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": HOUSE[subject_house]}}},
                     direction: rules}}

def matrix(cells):
    """cells: {(from, to): bool}"""
    w = max(len(p) for p in PODS)
    lines = [" ".join(["-".ljust(w)] + [p.ljust(w) for p in PODS]).rstrip()]
    for f in PODS:
        row = [f.ljust(w)]
        for t in PODS:
            v = cells.get((f, t))
            row.append(("-" if v is None else "." if v else "X").ljust(w))
        lines.append(" ".join(row).rstrip())
    return "\n".join(lines) + "\n"

def probes(proto, pokes):
    """pokes: [(client, server, upstream_port_index 0|1, allowed)]"""
    out = []
    for idx, number in ((0, FIRST), (1, SECOND)):
        cells = {(pod(c), pod(s)): ok for c, s, i, ok in pokes if i == idx}
        if cells:
            out.append({"port": number, "protocol": proto, "expect": matrix(cells)})
    return out

def swap(policy, direction, i, j):
    p = copy.deepcopy(policy)
    r = p["spec"][direction]
    r[i], r[j] = r[j], r[i]
    return p

def dump(path, header, case):
    # YAML is a superset of JSON, but a block layout reads better: emit by hand.
    import yaml  # noqa: available where this script is run (PyYAML)
    class Lit(str): pass
    def lit(d, v): return d.represent_scalar("tag:yaml.org,2002:str", v, style="|")
    yaml.add_representer(Lit, lit)
    for s in case["steps"]:
        for p in s.get("probes", []):
            p["expect"] = Lit(p["expect"])
    text = yaml.dump(case, sort_keys=False, width=200)
    with open(path, "w") as f:
        f.write(header + text)

def admin_ingress(proto):
    name = f"ingress-{proto.lower()}"
    rules = [
        rule("allow-from-ravenclaw-everything", "Accept", "ravenclaw", "ingress"),
        rule("deny-from-ravenclaw-everything", "Deny", "ravenclaw", "ingress"),
        rule("pass-from-ravenclaw-everything", "Pass", "ravenclaw", "ingress"),
        rule(f"deny-from-slytherin-at-port-{FIRST}", "Deny", "slytherin", "ingress", proto, FIRST),
        rule(f"pass-from-slytherin-at-port-{FIRST}", "Pass", "slytherin", "ingress", proto, FIRST),
        rule(f"allow-from-hufflepuff-at-port-{FIRST}", "Accept", "hufflepuff", "ingress", proto, FIRST),
        rule("deny-from-hufflepuff-everything-else", "Deny", "hufflepuff", "ingress"),
    ]
    p0 = cnp(name, "Admin", 3, "gryffindor", "ingress", rules)
    p1 = swap(p0, "ingress", 0, 1)
    p2 = swap(p1, "ingress", 0, 2)
    p3 = swap(p2, "ingress", 3, 4)
    steps = [
        {"apply": [p0], "probes": probes(proto, [
            # Should support an 'allow-ingress' policy for <P> protocol; ensure rule ordering is respected
            ("luna-0", "harry-0", 0, True), ("luna-1", "harry-0", 1, True),
            # Should support an 'allow-ingress' policy for <P> protocol at the specified port
            ("cedric-0", "harry-1", 0, True), ("cedric-1", "harry-1", 1, False)])},
        {"update": [p1], "probes": probes(proto, [
            # Should support an 'deny-ingress' policy for <P> protocol; ensure rule ordering is respected
            ("luna-0", "harry-1", 0, False), ("luna-1", "harry-1", 1, False),
            # Should support a 'deny-ingress' policy for <P> protocol at the specified port
            ("draco-0", "harry-0", 0, False), ("draco-1", "harry-0", 1, True)])},
        {"update": [p2], "probes": probes(proto, [
            # Should support an 'pass-ingress' policy for <P> protocol; ensure rule ordering is respected
            ("luna-0", "harry-0", 0, True), ("luna-1", "harry-0", 1, True)])},
        {"update": [p3], "probes": probes(proto, [
            # Should support a 'pass-ingress' policy for <P> protocol at the specified port
            ("draco-0", "harry-0", 0, True), ("draco-1", "harry-0", 1, True)])},
    ]
    test = f"CNPAdminTierIngress{proto}"
    header = f"""# upstream: {test} (conformance/tests/admin-tier-ingress-{proto.lower()}.go, base/admin_tier/standard-ingress-{proto.lower()}-rules.yaml)
# Subtests, in upstream order (each step's probes are theirs; rule swaps accumulate, as upstream's patches do):
#   step 1: "Should support an 'allow-ingress' policy for {proto} protocol; ensure rule ordering is respected"
#           "Should support an 'allow-ingress' policy for {proto} protocol at the specified port"
#   step 2 (rules 0<->1): "Should support an 'deny-ingress' policy for {proto} protocol; ensure rule ordering is respected"
#           "Should support a 'deny-ingress' policy for {proto} protocol at the specified port"
#   step 3 (rules 0<->2): "Should support an 'pass-ingress' policy for {proto} protocol; ensure rule ordering is respected"
#   step 4 (rules 3<->4): "Should support a 'pass-ingress' policy for {proto} protocol at the specified port"
# Names and ports mapped as scripts/gen-cnp-cases.py says (x gryffindor, y slytherin, z hufflepuff,
# w ravenclaw; port 80 = upstream's first port of the protocol, 81 = its second).
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

HOUSES = {"x": "gryffindor", "y": "slytherin", "z": "hufflepuff", "w": "ravenclaw"}

def house_labels():
    """Upstream's base fixture labels: conformance-house on namespaces and on pods."""
    return ({n: {"conformance-house": h} for n, h in HOUSES.items()},
            {p: {"conformance-house": HOUSES[p.split("/")[0]]} for p in PODS})

def house_pods(house):
    sel = {"matchLabels": {"conformance-house": house}}
    return {"pods": {"namespaceSelector": sel, "podSelector": sel}}

def priority_field():
    def policy(name, tier, priority, action, verb):
        return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
                "spec": {"tier": tier, "priority": priority, "subject": house_pods("gryffindor"),
                         "ingress": [{"name": f"{verb}-all-ingress-from-slytherin", "action": action, "from": [house_pods("slytherin")]}],
                         "egress": [{"name": f"{verb}-all-egress-to-slytherin", "action": action, "to": [house_pods("slytherin")]}]}}
    deny = policy("priority-50-example", "Admin", 50, "Deny", "deny")
    pass60 = policy("old-priority-60-new-priority-40-example", "Admin", 60, "Pass", "pass")
    base = policy("default", "Baseline", 10, "Accept", "allow")
    pass40 = copy.deepcopy(pass60)
    pass40["spec"]["priority"] = 40
    ns_labels, pod_labels = house_labels()
    steps = [
        {"apply": [deny, pass60, base], "labelNamespace": ns_labels, "labelPod": pod_labels, "probes": probes("TCP", [
            # Should Deny traffic from slytherin to gryffindor respecting admin CNP
            ("draco-0", "harry-0", 0, False), ("draco-1", "harry-0", 1, False),
            # Should Deny traffic to slytherin from gryffindor respecting admin CNP
            ("harry-0", "draco-0", 0, False), ("harry-1", "draco-0", 1, False)])},
        {"update": [pass40], "probes": probes("TCP", [
            # Should respect admin CNP priority field; thus passing both ingress and egress traffic over to baseline CNP
            ("draco-0", "harry-0", 0, True), ("draco-1", "harry-0", 1, True),
            ("harry-0", "draco-0", 0, True), ("harry-1", "draco-0", 1, True)])},
    ]
    test = "CNPAdminTierPriorityField"
    header = f"""# upstream: {test} (conformance/tests/admin-tier-priority-field.go, base/admin_tier/standard-priority-field.yaml)
# Subtests:
#   step 1: "Should Deny traffic from slytherin to gryffindor respecting admin CNP"
#           "Should Deny traffic to slytherin from gryffindor respecting admin CNP"
#   step 2 (priority 60 -> 40): "Should respect admin CNP priority field; thus passing both ingress and egress traffic over to baseline CNP"
# Names and ports mapped as scripts/gen-cnp-cases.py says; namespaces and pods carry
# upstream's conformance-house labels.
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

def integration():
    house = lambda h: {"namespaces": {"matchLabels": {"conformance-house": h}}}
    def two_way(name, tier, action):
        return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
                "spec": {"tier": tier, "priority": 10, "subject": house("gryffindor"),
                         "ingress": [{"name": "deny-all-ingress-from-slytherin", "action": action, "from": [house("slytherin")]}],
                         "egress": [{"name": "deny-all-egress-to-slytherin", "action": action, "to": [house("slytherin")]}]}}
    admin = two_way("pass-example", "Admin", "Deny")
    np = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "allow-gress-from-to-slytherin-to-gryffindor", "namespace": "x"},
          "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"conformance-house": "slytherin"}}}]}],
                   "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"conformance-house": "slytherin"}}}]}]}}
    baseline = two_way("default", "Baseline", "Deny")
    admin_in_pass = copy.deepcopy(admin)
    admin_in_pass["spec"]["ingress"][0]["action"] = "Pass"
    both_pass = copy.deepcopy(admin_in_pass)
    both_pass["spec"]["egress"][0]["action"] = "Pass"
    ns_labels, pod_labels = house_labels()
    in_probes = lambda ok: [("draco-0", "harry-0", 0, ok), ("draco-1", "harry-0", 1, ok)]
    out_probes = lambda ok: [("harry-0", "draco-0", 0, ok), ("harry-1", "draco-0", 1, ok)]
    steps = [
        # Should Deny traffic from slytherin to gryffindor respecting admin CNP
        # Should Deny traffic to slytherin from gryffindor respecting admin CNP
        {"apply": [admin, np, baseline], "labelNamespace": ns_labels, "labelPod": pod_labels,
         "probes": probes("TCP", in_probes(False) + out_probes(False))},
        # Should support a 'pass-ingress' policy for admin CNP and respect the match for network policy
        {"update": [admin_in_pass], "probes": probes("TCP", in_probes(True))},
        # Should support a 'pass-egress' policy for admin CNP and respect the match for network policy
        {"update": [both_pass], "probes": probes("TCP", out_probes(True))},
        # Should support a 'pass-ingress' policy for admin CNP and respect the match for baseline cluster network policy
        # Should support a 'pass-egress' policy for admin CNP and respect the match for baseline cluster network policy
        {"delete": ["x/allow-gress-from-to-slytherin-to-gryffindor"], "probes": probes("TCP", in_probes(False) + out_probes(False))},
    ]
    test = "CNPAdminTierIntegration"
    header = f"""# upstream: {test} (conformance/tests/admin-tier-integration.go, base/api_integration/standard-anp-np-banp.yaml)
# Subtests (patches accumulate, as upstream's do):
#   step 1: "Should Deny traffic from slytherin to gryffindor respecting admin CNP"
#           "Should Deny traffic to slytherin from gryffindor respecting admin CNP"
#   step 2 (ingress rule -> Pass): "Should support a 'pass-ingress' policy for admin CNP and respect the match for network policy"
#   step 3 (egress rule -> Pass): "Should support a 'pass-egress' policy for admin CNP and respect the match for network policy"
#   step 4 (NetworkPolicy deleted): "Should support a 'pass-ingress' policy for admin CNP and respect the match for baseline cluster network policy"
#           "Should support a 'pass-egress' policy for admin CNP and respect the match for baseline cluster network policy"
# Names and ports mapped as scripts/gen-cnp-cases.py says; namespaces and pods carry
# upstream's conformance-house labels.
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

def baseline_ingress_named_port():
    rules = [
        rule("allow-from-ravenclaw-everything", "Accept", "ravenclaw", "ingress"),
        rule("deny-from-ravenclaw-everything", "Deny", "ravenclaw", "ingress"),
        rule(f"deny-from-slytherin-at-port-{FIRST}", "Deny", "slytherin", "ingress", "TCP", FIRST),
        rule(f"allow-from-hufflepuff-at-port-{FIRST}", "Accept", "hufflepuff", "ingress", "TCP", FIRST),
        rule("deny-from-hufflepuff-everything-else", "Deny", "hufflepuff", "ingress"),
    ]
    p0 = cnp("default", "Baseline", 10, "gryffindor", "ingress", rules)
    p1 = copy.deepcopy(p0)
    # Upstream's "web" is TCP 80 in its pod spec; the harness names TCP 80 serve-80-tcp.
    p1["spec"]["ingress"][3]["protocols"] = [{"destinationNamedPort": "serve-80-tcp"}]
    steps = [
        {"apply": [p0]},
        # Should support an 'allow-ingress' policy for named port
        {"update": [p1], "probes": probes("TCP", [("cedric-0", "harry-1", 0, True), ("cedric-1", "harry-1", 1, False)])},
    ]
    test = "CNPBaselineTierIngressNamedPort"
    header = f"""# upstream: {test} (conformance/tests/baseline-tier-ingress-named-port.go, base/baseline_tier/standard-ingress-tcp-rules.yaml)
# Subtests:
#   step 2 (rule 3 rewritten to the named port "web", TCP 80): "Should support an 'allow-ingress' policy for named port"
# Names and ports mapped as scripts/gen-cnp-cases.py says; upstream's port name "web" (TCP 80)
# is the harness's serve-80-tcp.
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

def ingress_udp_policy():
    # Upstream: 53 is UDP's first port (-> 80), 5353 its second (-> 81).
    return cnp("ingress-udp", "Admin", 4, "hufflepuff", "ingress", [
        rule("allow-from-ravenclaw-everything", "Accept", "ravenclaw", "ingress"),
        rule("deny-from-ravenclaw-everything", "Deny", "ravenclaw", "ingress"),
        rule("pass-from-ravenclaw-everything", "Pass", "ravenclaw", "ingress"),
        rule(f"deny-from-slytherin-at-port-{SECOND}", "Deny", "slytherin", "ingress", "UDP", SECOND),
        rule(f"pass-from-slytherin-at-port-{SECOND}", "Pass", "slytherin", "ingress", "UDP", SECOND),
        rule(f"allow-from-gryffindor-at-port-{FIRST}", "Accept", "gryffindor", "ingress", "UDP", FIRST),
        rule("deny-from-gryffindor-everything-else", "Deny", "gryffindor", "ingress"),
    ])

def admin_ingress_udp():
    p0 = ingress_udp_policy()
    p1 = swap(p0, "ingress", 0, 1)
    p2 = swap(p1, "ingress", 0, 2)
    p3 = swap(p2, "ingress", 3, 4)
    steps = [
        {"apply": [p0], "probes": probes("UDP", [
            # Should support an 'allow-ingress' policy for UDP protocol; ensure rule ordering is respected
            ("luna-0", "cedric-0", 0, True), ("luna-1", "cedric-0", 1, True),
            # Should support an 'allow-ingress' policy for UDP protocol at the specified port
            ("harry-0", "cedric-1", 0, True), ("harry-1", "cedric-1", 1, False)])},
        {"update": [p1], "probes": probes("UDP", [
            # Should support an 'deny-ingress' policy for UDP protocol; ensure rule ordering is respected
            ("luna-0", "cedric-1", 0, False), ("luna-1", "cedric-1", 1, False),
            # Should support a 'deny-ingress' policy for UDP protocol at the specified port
            ("draco-0", "cedric-0", 1, False), ("draco-1", "cedric-0", 0, True)])},
        {"update": [p2], "probes": probes("UDP", [
            # Should support an 'pass-ingress' policy for UDP protocol; ensure rule ordering is respected
            ("luna-0", "cedric-1", 1, True), ("luna-1", "cedric-1", 0, True)])},
        {"update": [p3], "probes": probes("UDP", [
            # Should support a 'pass-ingress' policy for UDP protocol at the specified port
            ("draco-0", "cedric-0", 1, True), ("draco-1", "cedric-0", 0, True)])},
    ]
    test = "CNPAdminTierIngressUDP"
    header = f"""# upstream: {test} (conformance/tests/admin-tier-ingress-udp.go, base/admin_tier/standard-ingress-udp-rules.yaml)
# Subtests, in upstream order (rule swaps accumulate, as upstream's patches do):
#   step 1: "Should support an 'allow-ingress' policy for UDP protocol; ensure rule ordering is respected"
#           "Should support an 'allow-ingress' policy for UDP protocol at the specified port"
#   step 2 (rules 0<->1): "Should support an 'deny-ingress' policy for UDP protocol; ensure rule ordering is respected"
#           "Should support a 'deny-ingress' policy for UDP protocol at the specified port"
#   step 3 (rules 0<->2): "Should support an 'pass-ingress' policy for UDP protocol; ensure rule ordering is respected"
#   step 4 (rules 3<->4): "Should support a 'pass-ingress' policy for UDP protocol at the specified port"
# Names and ports mapped as scripts/gen-cnp-cases.py says (UDP 53 -> 80, UDP 5353 -> 81).
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

def admin_ingress_named_port():
    p0 = ingress_udp_policy()
    p1 = copy.deepcopy(p0)
    # Upstream's "dns" is UDP 53 in its pod spec; the harness names UDP 80 serve-80-udp.
    p1["spec"]["ingress"][5]["protocols"] = [{"destinationNamedPort": "serve-80-udp"}]
    steps = [
        {"apply": [p0]},
        # Should support an 'allow-ingress' policy for named port
        {"update": [p1], "probes": probes("UDP", [("harry-0", "cedric-1", 0, True), ("harry-1", "cedric-1", 1, False)])},
    ]
    test = "CNPAdminTierIngressNamedPort"
    header = f"""# upstream: {test} (conformance/tests/admin-tier-ingress-named-port.go, base/admin_tier/standard-ingress-udp-rules.yaml)
# Subtests:
#   step 2 (rule 5 rewritten to the named port "dns", UDP 53): "Should support an 'allow-ingress' policy for named port"
# Names and ports mapped as scripts/gen-cnp-cases.py says (UDP 53 -> 80, 5353 -> 81; "dns" -> serve-80-udp).
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

def admin_egress_named_port():
    p0 = egress_tcp_policy()
    p1 = copy.deepcopy(p0)
    # Upstream's "web" is TCP 80 in its pod spec; the harness names TCP 80 serve-80-tcp.
    p1["spec"]["egress"][5]["protocols"] = [{"destinationNamedPort": "serve-80-tcp"}]
    steps = [
        {"apply": [p0]},
        # Should support an 'allow-egress' policy for named port
        {"update": [p1], "probes": probes("TCP", [("harry-0", "cedric-1", 0, True), ("harry-1", "cedric-1", 1, False)])},
    ]
    test = "CNPAdminTierEgressNamedPort"
    header = f"""# upstream: {test} (conformance/tests/admin-tier-egress-named-port.go, base/admin_tier/standard-egress-tcp-rules.yaml)
# Subtests:
#   step 2 (rule 5 rewritten to the named port "web", TCP 80): "Should support an 'allow-egress' policy for named port"
# Names and ports mapped as scripts/gen-cnp-cases.py says (TCP 8080 -> 81; "web" -> serve-80-tcp).
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

def admin_egress_tcp():
    p0 = egress_tcp_policy()
    return admin_egress_tcp_case(p0)

def egress_tcp_policy():
    return cnp("egress-tcp", "Admin", 6, "gryffindor", "egress", [
        rule("allow-to-ravenclaw-everything", "Accept", "ravenclaw", "egress"),
        rule("deny-to-ravenclaw-everything", "Deny", "ravenclaw", "egress"),
        rule("pass-to-ravenclaw-everything", "Pass", "ravenclaw", "egress"),
        rule(f"deny-to-slytherin-at-port-{FIRST}", "Deny", "slytherin", "egress", "TCP", FIRST),
        rule(f"pass-to-slytherin-at-port-{FIRST}", "Pass", "slytherin", "egress", "TCP", FIRST),
        rule(f"allow-to-hufflepuff-at-port-{SECOND}", "Accept", "hufflepuff", "egress", "TCP", SECOND),
        rule("deny-to-hufflepuff-everything-else", "Deny", "hufflepuff", "egress"),
    ])

def admin_egress_tcp_case(p0):
    p1 = swap(p0, "egress", 0, 1)
    p2 = swap(p1, "egress", 0, 2)
    p3 = swap(p2, "egress", 3, 4)
    steps = [
        {"apply": [p0], "probes": probes("TCP", [
            # Should support an 'allow-egress' policy for TCP protocol; ensure rule ordering is respected
            ("harry-0", "luna-0", 0, True), ("harry-1", "luna-0", 1, True),
            # Should support an 'allow-egress' policy for TCP protocol at the specified port
            ("harry-0", "cedric-1", 1, True), ("harry-1", "cedric-1", 0, False)])},
        {"update": [p1], "probes": probes("TCP", [
            # Should support an 'deny-egress' policy for TCP protocol; ensure rule ordering is respected
            ("harry-0", "luna-1", 0, False), ("harry-1", "luna-1", 1, False),
            # Should support a 'deny-egress' policy for TCP protocol at the specified port
            ("harry-0", "draco-0", 0, False), ("harry-1", "draco-0", 1, True)])},
        {"update": [p2], "probes": probes("TCP", [
            # Should support an 'pass-egress' policy for TCP protocol; ensure rule ordering is respected
            ("harry-0", "luna-0", 0, True), ("harry-1", "luna-0", 1, True)])},
        {"update": [p3], "probes": probes("TCP", [
            # Should support a 'pass-egress' policy for TCP protocol at the specified port
            ("harry-0", "draco-0", 0, True), ("harry-1", "draco-0", 1, True)])},
    ]
    test = "CNPAdminTierEgressTCP"
    header = f"""# upstream: {test} (conformance/tests/admin-tier-egress-tcp.go, base/admin_tier/standard-egress-tcp-rules.yaml)
# Subtests, in upstream order (rule swaps accumulate, as upstream's patches do):
#   step 1: "Should support an 'allow-egress' policy for TCP protocol; ensure rule ordering is respected"
#           "Should support an 'allow-egress' policy for TCP protocol at the specified port"
#   step 2 (rules 0<->1): "Should support an 'deny-egress' policy for TCP protocol; ensure rule ordering is respected"
#           "Should support a 'deny-egress' policy for TCP protocol at the specified port"
#   step 3 (rules 0<->2): "Should support an 'pass-egress' policy for TCP protocol; ensure rule ordering is respected"
#   step 4 (rules 3<->4): "Should support a 'pass-egress' policy for TCP protocol at the specified port"
# Names and ports mapped as scripts/gen-cnp-cases.py says (TCP 80 -> 80, TCP 8080 -> 81).
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

def admin_egress_inline_cidr():
    return egress_inline_cidr("CNPAdminTierEgressInlineCIDRPeers", "admin-tier", "admin_tier", "inline-cidr-as-peers-example", "Admin", 85, house_pods("gryffindor"))

def baseline_egress_inline_cidr():
    subject = {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": HOUSE["gryffindor"]}}}
    return egress_inline_cidr("CNPBaselineTierEgressInlineCIDRPeers", "baseline-tier", "baseline_tier", "default", "Baseline", 10, subject)

def egress_inline_cidr(test, go, base, name, tier, priority, subject):
    p0 = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
          "spec": {"tier": tier, "priority": priority, "subject": subject, "egress": [
              {"name": "allow-egress-to-slytherin", "action": "Accept", "to": [house_pods("slytherin")]},
              {"name": "deny-egress-to-internet", "action": "Deny", "to": [{"networks": ["0.0.0.0/0", "::/0"]}]}]}}
    p1 = copy.deepcopy(p0)
    # The pods' addresses as /32 (/128), in the case's family: the harness's ${host:...}.
    p1["spec"]["egress"].insert(0, {"name": "allow-egress-to-specific-podIPs", "action": "Accept",
                                    "to": [{"networks": ["${host:w/luna-lovegood-0}", "${host:z/cedric-diggory-0}"]}]})
    ns_labels, pod_labels = house_labels()
    every = lambda pokes: [p for proto in ["TCP", "UDP", "SCTP"] for p in probes(proto, pokes)]
    steps = [
        # Should support a 'deny-egress' rule policy for egress-cidr-peer
        {"apply": [p0], "labelNamespace": ns_labels, "labelPod": pod_labels, "probes": every([
            ("harry-1", "luna-0", 0, False), ("harry-1", "cedric-0", 0, False), ("harry-1", "draco-0", 0, True)])},
        # Should support an 'allow-egress' rule policy for egress-cidr-peer
        {"update": [p1], "probes": every([
            ("harry-1", "luna-0", 0, True), ("harry-1", "cedric-0", 0, True),
            ("harry-1", "luna-1", 0, False), ("harry-1", "cedric-1", 0, False)])},
    ]
    header = f"""# upstream: {test} (conformance/tests/{go}-egress-inline-cidr.go, base/{base}/standard-egress-inline-cidr-rules.yaml)
# Subtests:
#   step 1: "Should support a 'deny-egress' rule policy for egress-cidr-peer"
#   step 2 (an Accept of two pod /32s (/128s) inserted first): "Should support an 'allow-egress' rule policy for egress-cidr-peer"
# Upstream probes TCP 80, UDP 53 and SCTP 9003: all port 80 here.
# Names mapped as scripts/gen-cnp-cases.py says; namespaces and pods carry upstream's
# conformance-house labels.
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

def admin_ingress_sctp():
    # Upstream: 9003 is SCTP's first port (-> 80), 9005 its second (-> 81).
    p0 = cnp("ingress-sctp", "Admin", 5, "ravenclaw", "ingress", [
        rule("allow-from-gryffindor-everything", "Accept", "gryffindor", "ingress"),
        rule("deny-from-gryffindor-everything", "Deny", "gryffindor", "ingress"),
        rule("pass-from-gryffindor-everything", "Pass", "gryffindor", "ingress"),
        rule(f"deny-from-slytherin-at-port-{FIRST}", "Deny", "slytherin", "ingress", "SCTP", FIRST),
        rule(f"pass-from-slytherin-at-port-{FIRST}", "Pass", "slytherin", "ingress", "SCTP", FIRST),
        rule(f"allow-from-hufflepuff-at-port-{FIRST}", "Accept", "hufflepuff", "ingress", "SCTP", FIRST),
        rule("deny-from-hufflepuff-everything-else", "Deny", "hufflepuff", "ingress"),
    ])
    p1 = swap(p0, "ingress", 0, 1)
    p2 = swap(p1, "ingress", 0, 2)
    p3 = swap(p2, "ingress", 3, 4)
    steps = [
        {"apply": [p0], "probes": probes("SCTP", [
            # Should support an 'allow-ingress' policy for SCTP protocol; ensure rule ordering is respected
            ("harry-0", "luna-0", 0, True), ("harry-1", "luna-0", 1, True),
            # Should support an 'allow-ingress' policy for SCTP protocol at the specified port
            ("cedric-0", "luna-1", 0, True), ("cedric-1", "luna-1", 1, False)])},
        {"update": [p1], "probes": probes("SCTP", [
            # Should support an 'deny-ingress' policy for SCTP protocol; ensure rule ordering is respected
            ("harry-0", "luna-1", 0, False), ("harry-1", "luna-1", 1, False),
            # Should support a 'deny-ingress' policy for SCTP protocol at the specified port
            ("draco-0", "luna-0", 0, False), ("draco-1", "luna-0", 1, True)])},
        {"update": [p2], "probes": probes("SCTP", [
            # Should support an 'pass-ingress' policy for SCTP protocol; ensure rule ordering is respected
            ("harry-0", "luna-1", 0, True), ("harry-1", "luna-1", 1, True)])},
        {"update": [p3], "probes": probes("SCTP", [
            # Should support a 'pass-ingress' policy for SCTP protocol at the specified port
            ("draco-0", "luna-0", 0, True), ("draco-1", "luna-0", 1, True)])},
    ]
    test = "CNPAdminTierIngressSCTP"
    header = f"""# upstream: {test} (conformance/tests/admin-tier-ingress-sctp.go, base/admin_tier/standard-ingress-sctp-rules.yaml)
# Subtests, in upstream order (rule swaps accumulate, as upstream's patches do):
#   step 1: "Should support an 'allow-ingress' policy for SCTP protocol; ensure rule ordering is respected"
#           "Should support an 'allow-ingress' policy for SCTP protocol at the specified port"
#   step 2 (rules 0<->1): "Should support an 'deny-ingress' policy for SCTP protocol; ensure rule ordering is respected"
#           "Should support a 'deny-ingress' policy for SCTP protocol at the specified port"
#   step 3 (rules 0<->2): "Should support an 'pass-ingress' policy for SCTP protocol; ensure rule ordering is respected"
#   step 4 (rules 3<->4): "Should support a 'pass-ingress' policy for SCTP protocol at the specified port"
# Names and ports mapped as scripts/gen-cnp-cases.py says (SCTP 9003 -> 80, 9005 -> 81).
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

def admin_egress_udp():
    # Upstream: 53 is UDP's first port (-> 80), 5353 its second (-> 81).
    p0 = cnp("egress-udp", "Admin", 7, "hufflepuff", "egress", [
        rule("allow-to-ravenclaw-everything", "Accept", "ravenclaw", "egress"),
        rule("deny-to-ravenclaw-everything", "Deny", "ravenclaw", "egress"),
        rule("pass-to-ravenclaw-everything", "Pass", "ravenclaw", "egress"),
        rule(f"deny-to-slytherin-at-port-{SECOND}", "Deny", "slytherin", "egress", "UDP", SECOND),
        rule(f"pass-to-slytherin-at-port-{SECOND}", "Pass", "slytherin", "egress", "UDP", SECOND),
        rule(f"allow-to-gryffindor-at-port-{FIRST}", "Accept", "gryffindor", "egress", "UDP", FIRST),
        rule("deny-to-gryffindor-everything-else", "Deny", "gryffindor", "egress"),
    ])
    p1 = swap(p0, "egress", 0, 1)
    p2 = swap(p1, "egress", 0, 2)
    p3 = swap(p2, "egress", 3, 4)
    steps = [
        {"apply": [p0], "probes": probes("UDP", [
            # Should support an 'allow-egress' policy for UDP protocol; ensure rule ordering is respected
            ("cedric-0", "luna-0", 0, True), ("cedric-1", "luna-0", 1, True),
            # Should support an 'allow-egress' policy for UDP protocol at the specified port
            ("cedric-0", "harry-1", 0, True), ("cedric-1", "harry-1", 1, False)])},
        {"update": [p1], "probes": probes("UDP", [
            # Should support an 'deny-egress' policy for UDP protocol; ensure rule ordering is respected
            ("cedric-0", "luna-1", 0, False), ("cedric-1", "luna-1", 1, False),
            # Should support a 'deny-egress' policy for UDP protocol at the specified port
            ("cedric-0", "draco-0", 1, False), ("cedric-1", "draco-0", 0, True)])},
        {"update": [p2], "probes": probes("UDP", [
            # Should support an 'pass-egress' policy for UDP protocol; ensure rule ordering is respected
            ("cedric-0", "luna-1", 1, True), ("cedric-1", "luna-1", 0, True)])},
        {"update": [p3], "probes": probes("UDP", [
            # Should support a 'pass-egress' policy for UDP protocol at the specified port
            ("cedric-0", "draco-0", 1, True), ("cedric-1", "draco-0", 0, True)])},
    ]
    test = "CNPAdminTierEgressUDP"
    header = f"""# upstream: {test} (conformance/tests/admin-tier-egress-udp.go, base/admin_tier/standard-egress-udp-rules.yaml)
# Subtests, in upstream order (rule swaps accumulate, as upstream's patches do):
#   step 1: "Should support an 'allow-egress' policy for UDP protocol; ensure rule ordering is respected"
#           "Should support an 'allow-egress' policy for UDP protocol at the specified port"
#   step 2 (rules 0<->1): "Should support an 'deny-egress' policy for UDP protocol; ensure rule ordering is respected"
#           "Should support a 'deny-egress' policy for UDP protocol at the specified port"
#   step 3 (rules 0<->2): "Should support an 'pass-egress' policy for UDP protocol; ensure rule ordering is respected"
#   step 4 (rules 3<->4): "Should support a 'pass-egress' policy for UDP protocol at the specified port"
# Names and ports mapped as scripts/gen-cnp-cases.py says (UDP 53 -> 80, 5353 -> 81).
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

# --- The remaining standard tests (admin EgressSCTP and Gress; the seven baseline ones) ---

def proto_rule(name, action, house, direction, ports):
    """A rule with several protocols: ports = [(proto, number), ...]."""
    r = {"name": name, "action": action, ("from" if direction == "ingress" else "to"): [ns(house)]}
    if ports:
        r["protocols"] = [p for proto, number in ports for p in port(proto, number)]
    return r

def probes_multi(pokes):
    """pokes: [(client, server, protocol, upstream_port_index 0|1, allowed)], in the order
    TCP, UDP, SCTP. A cell asserted twice in one step must be asserted the same way."""
    seen = {}
    for c, s, proto, i, ok in pokes:
        k = (c, s, proto, i)
        assert seen.get(k, ok) == ok, f"conflicting expectations for {k}"
        seen[k] = ok
    return [p for proto in ["TCP", "UDP", "SCTP"]
            for p in probes(proto, [(c, s, i, ok) for c, s, pr, i, ok in pokes if pr == proto])]

def admin_egress_sctp():
    # Upstream: 9003 is SCTP's first port (-> 80), 9005 its second (-> 81).
    p0 = cnp("egress-sctp", "Admin", 8, "ravenclaw", "egress", [
        rule("allow-to-gryffindor-everything", "Accept", "gryffindor", "egress"),
        rule("deny-to-gryffindor-everything", "Deny", "gryffindor", "egress"),
        rule("pass-to-gryffindor-everything", "Pass", "gryffindor", "egress"),
        rule(f"deny-to-slytherin-at-port-{FIRST}", "Deny", "slytherin", "egress", "SCTP", FIRST),
        rule(f"pass-to-slytherin-at-port-{FIRST}", "Pass", "slytherin", "egress", "SCTP", FIRST),
        rule(f"allow-to-hufflepuff-at-port-{FIRST}", "Accept", "hufflepuff", "egress", "SCTP", FIRST),
        rule("deny-to-hufflepuff-everything-else", "Deny", "hufflepuff", "egress"),
    ])
    p1 = swap(p0, "egress", 0, 1)
    p2 = swap(p1, "egress", 0, 2)
    p3 = swap(p2, "egress", 3, 4)
    steps = [
        {"apply": [p0], "probes": probes("SCTP", [
            # Should support an 'allow-egress' policy for SCTP protocol; ensure rule ordering is respected
            ("luna-0", "harry-0", 0, True), ("luna-1", "harry-0", 1, True),
            # Should support an 'allow-egress' policy for SCTP protocol at the specified port
            ("luna-0", "cedric-1", 0, True), ("luna-1", "cedric-1", 1, False)])},
        {"update": [p1], "probes": probes("SCTP", [
            # Should support an 'deny-egress' policy for SCTP protocol; ensure rule ordering is respected
            ("luna-0", "harry-1", 0, False), ("luna-1", "harry-1", 1, False),
            # Should support a 'deny-egress' policy for SCTP protocol at the specified port
            ("luna-0", "draco-0", 0, False), ("luna-1", "draco-0", 1, True)])},
        {"update": [p2], "probes": probes("SCTP", [
            # Should support an 'pass-egress' policy for SCTP protocol; ensure rule ordering is respected
            ("luna-0", "harry-1", 0, True), ("luna-1", "harry-1", 1, True)])},
        {"update": [p3], "probes": probes("SCTP", [
            # Should support a 'pass-egress' policy for SCTP protocol at the specified port
            ("luna-0", "draco-0", 0, True), ("luna-1", "draco-0", 1, True)])},
    ]
    test = "CNPAdminTierEgressSCTP"
    header = f"""# upstream: {test} (conformance/tests/admin-network-policy-standard-egress-sctp-rules.go, base/admin_tier/standard-egress-sctp-rules.yaml)
# Subtests, in upstream order (rule swaps accumulate, as upstream's patches do):
#   step 1: "Should support an 'allow-egress' policy for SCTP protocol; ensure rule ordering is respected"
#           "Should support an 'allow-egress' policy for SCTP protocol at the specified port"
#   step 2 (rules 0<->1): "Should support an 'deny-egress' policy for SCTP protocol; ensure rule ordering is respected"
#           "Should support a 'deny-egress' policy for SCTP protocol at the specified port"
#   step 3 (rules 0<->2): "Should support an 'pass-egress' policy for SCTP protocol; ensure rule ordering is respected"
#   step 4 (rules 3<->4): "Should support a 'pass-egress' policy for SCTP protocol at the specified port"
# Names and ports mapped as scripts/gen-cnp-cases.py says (SCTP 9003 -> 80, 9005 -> 81).
# SCTP is probed with raw protocol-132 packets (INIT, answered by INIT ACK): no SCTP stack here.
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

# Upstream's gress manifests name their rules after upstream's ports; the names here carry
# the mapped numbers (tcp-udp-sctp), like the single-protocol ones.
def gress_rules(tier):
    admin = tier == "Admin"
    F, S = FIRST, SECOND
    def side(direction, tofrom, allow_ports):
        rules = [rule(f"allow-{tofrom}-ravenclaw-everything", "Accept", "ravenclaw", direction),
                 rule(f"deny-{tofrom}-ravenclaw-everything", "Deny", "ravenclaw", direction)]
        if admin:
            rules.append(rule(f"pass-{tofrom}-ravenclaw-everything", "Pass", "ravenclaw", direction))
        slytherin = [("TCP", F), ("UDP", F), ("SCTP", F)]
        rules.append(proto_rule(f"deny-{tofrom}-slytherin-at-ports-{F}-{F}-{F}", "Deny", "slytherin", direction, slytherin))
        if admin:
            rules.append(proto_rule(f"pass-{tofrom}-slytherin-at-ports-{F}-{F}-{F}", "Pass", "slytherin", direction, slytherin))
        numbers = "-".join(str(n) for _, n in allow_ports)
        rules.append(proto_rule(f"allow-{tofrom}-hufflepuff-at-ports-{numbers}", "Accept", "hufflepuff", direction, allow_ports))
        rules.append(rule(f"deny-{tofrom}-hufflepuff-everything-else", "Deny", "hufflepuff", direction))
        return rules
    # egress: TCP 8080, UDP 5353, SCTP 9003; ingress: TCP 80, UDP 5353, SCTP 9003 (upstream's).
    egress = side("egress", "to", [("TCP", S), ("UDP", S), ("SCTP", F)])
    ingress = side("ingress", "from", [("TCP", F), ("UDP", S), ("SCTP", F)])
    name, priority = ("gress-rules", 15) if admin else ("default", 10)
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
            "spec": {"tier": tier, "priority": priority,
                     "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": HOUSE["gryffindor"]}}},
                     "egress": egress, "ingress": ingress}}

def swap_both(policy, i, j):
    return swap(swap(policy, "egress", i, j), "ingress", i, j)

# The Gress subtests' pokes (upstream port index: 0 = first port of the protocol, 1 = second).
GRESS_ALLOW = [
    # 'allow-gress' across different protocols: egress to ravenclaw, then ingress from it
    ("harry-0", "luna-0", "TCP", 0, True), ("harry-1", "luna-0", "UDP", 0, True), ("harry-0", "luna-0", "SCTP", 0, True),
    ("luna-0", "harry-0", "TCP", 0, True), ("luna-1", "harry-0", "UDP", 0, True), ("luna-1", "harry-0", "SCTP", 0, True),
    # 'allow-gress' at the specified ports: egress to hufflepuff, then ingress from it
    ("harry-0", "cedric-1", "TCP", 1, True), ("harry-1", "cedric-1", "TCP", 0, False),
    ("harry-0", "cedric-1", "UDP", 1, True), ("harry-1", "cedric-1", "UDP", 0, False),
    ("harry-0", "cedric-1", "SCTP", 0, True), ("harry-1", "cedric-1", "SCTP", 1, False),
    ("cedric-0", "harry-1", "TCP", 0, True), ("cedric-1", "harry-1", "TCP", 1, False),
    ("cedric-0", "harry-1", "UDP", 1, True), ("cedric-1", "harry-1", "UDP", 0, False),
    ("cedric-0", "harry-1", "SCTP", 0, True), ("cedric-1", "harry-1", "SCTP", 1, False)]
GRESS_DENY = [
    # 'deny-gress' across different protocols
    ("harry-0", "luna-1", "TCP", 0, False), ("harry-1", "luna-1", "UDP", 0, False), ("harry-0", "luna-1", "SCTP", 0, False),
    ("luna-0", "harry-1", "TCP", 0, False), ("luna-1", "harry-1", "UDP", 0, False), ("luna-1", "harry-1", "SCTP", 0, False),
    # 'deny-gress' at the specified ports: slytherin, both ways
    ("harry-0", "draco-0", "TCP", 0, False), ("harry-1", "draco-0", "TCP", 1, True),
    ("harry-0", "draco-0", "UDP", 0, False), ("harry-1", "draco-0", "UDP", 1, True),
    ("harry-0", "draco-0", "SCTP", 0, False), ("harry-1", "draco-0", "SCTP", 1, True),
    ("draco-0", "harry-0", "TCP", 0, False), ("draco-1", "harry-0", "TCP", 1, True),
    ("draco-0", "harry-0", "UDP", 0, False), ("draco-1", "harry-0", "UDP", 1, True),
    ("draco-0", "harry-0", "SCTP", 0, False), ("draco-1", "harry-0", "SCTP", 1, True)]

def admin_gress():
    p0 = gress_rules("Admin")
    p1 = swap_both(p0, 0, 1)
    p2 = swap_both(p1, 0, 2)
    p3 = swap_both(p2, 3, 4)
    steps = [
        {"apply": [p0], "probes": probes_multi(GRESS_ALLOW)},
        {"update": [p1], "probes": probes_multi(GRESS_DENY)},
        # 'pass-gress' across different protocols (egress UDP goes to 5353 here, upstream's choice)
        {"update": [p2], "probes": probes_multi([
            ("harry-0", "luna-0", "TCP", 0, True), ("harry-0", "luna-0", "UDP", 1, True), ("harry-0", "luna-0", "SCTP", 0, True),
            ("luna-0", "harry-0", "TCP", 0, True), ("luna-1", "harry-0", "UDP", 0, True), ("luna-1", "harry-0", "SCTP", 0, True)])},
        # 'pass-gress' at the specified ports: slytherin, both ways
        {"update": [p3], "probes": probes_multi([
            (c, s, proto, i, True) for c, s in [("harry-0", "draco-0"), ("draco-0", "harry-0")] for proto in ["TCP", "UDP", "SCTP"] for i in [0]] + [
            (c, s, proto, i, True) for c, s in [("harry-1", "draco-0"), ("draco-1", "harry-0")] for proto in ["TCP", "UDP", "SCTP"] for i in [1]])},
    ]
    test = "CNPAdminTierGress"
    header = f"""# upstream: {test} (conformance/tests/admin-network-policy-standard-gress-rules.go, base/admin_tier/standard-gress-rules-combined.yaml)
# Subtests, in upstream order (each patch swaps the same rules in egress and ingress; swaps accumulate):
#   step 1: "Should support an 'allow-gress' policy across different protocols"
#           "Should support an 'allow-gress' policy across different protocols at the specified ports"
#   step 2 (rules 0<->1): "Should support an 'deny-gress' policy across different protocols"
#           "Should support a 'deny-gress' policy across different protocols at the specified ports"
#   step 3 (rules 0<->2): "Should support an 'pass-gress' policy across different protocols"
#   step 4 (rules 3<->4): "Should support a 'pass-gress' policy across different protocols at the specified ports"
# Names and ports mapped as scripts/gen-cnp-cases.py says, per protocol (TCP 80/8080, UDP 53/5353,
# SCTP 9003/9005 -> 80/81); rule names carry the mapped numbers.
# SCTP is probed with raw protocol-132 packets (INIT, answered by INIT ACK): no SCTP stack here.
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

def baseline_gress():
    p0 = gress_rules("Baseline")
    p1 = swap_both(p0, 0, 1)
    steps = [
        {"apply": [p0], "probes": probes_multi(GRESS_ALLOW)},
        {"update": [p1], "probes": probes_multi(GRESS_DENY)},
    ]
    test = "CNPBaselineTierGress"
    header = f"""# upstream: {test} (conformance/tests/baseline-admin-network-policy-standard-gress-rules.go, base/baseline_tier/standard-gress-rules-combined.yaml)
# Subtests, in upstream order (the patch swaps rules 0 and 1 in egress and ingress):
#   step 1: "Should support an 'allow-gress' policy across different protocols"
#           "Should support an 'allow-gress' policy across different protocols at the specified ports"
#   step 2 (rules 0<->1): "Should support an 'deny-gress' policy across different protocols"
#           "Should support a 'deny-gress' policy across different protocols at the specified ports"
# Names and ports mapped as scripts/gen-cnp-cases.py says, per protocol (TCP 80/8080, UDP 53/5353,
# SCTP 9003/9005 -> 80/81); rule names carry the mapped numbers.
# SCTP is probed with raw protocol-132 packets (INIT, answered by INIT ACK): no SCTP stack here.
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

# The six single-protocol baseline tests: one `default` Baseline CNP of five rules
#   0 Accept <everything house>, 1 Deny <everything house>, 2 Deny slytherin at <deny port>,
#   3 Accept <port house> at <accept port>, 4 Deny <port house> (everything else),
# then rules 0 and 1 swapped. Upstream's ports: TCP 80/8080, UDP 53/5353, SCTP 9003/9005.
BASELINE = {
    # (direction, protocol): (subject, everything house, deny port, port house, accept port, step-1 pokes, step-2 pokes)
    ("ingress", "TCP"): ("gryffindor", "ravenclaw", FIRST, "hufflepuff", FIRST,
        [("luna-0", "harry-0", 0, True), ("luna-1", "harry-0", 1, True), ("cedric-0", "harry-1", 0, True), ("cedric-1", "harry-1", 1, False)],
        [("luna-0", "harry-1", 0, False), ("luna-1", "harry-1", 1, False), ("draco-0", "harry-0", 0, False), ("draco-1", "harry-0", 1, True)]),
    ("ingress", "UDP"): ("hufflepuff", "ravenclaw", SECOND, "gryffindor", FIRST,
        [("luna-0", "cedric-0", 0, True), ("luna-1", "cedric-0", 1, True), ("harry-0", "cedric-1", 0, True), ("harry-1", "cedric-1", 1, False)],
        [("luna-0", "cedric-1", 0, False), ("luna-1", "cedric-1", 1, False), ("draco-0", "cedric-0", 1, False), ("draco-1", "cedric-0", 0, True)]),
    ("ingress", "SCTP"): ("ravenclaw", "gryffindor", FIRST, "hufflepuff", FIRST,
        [("harry-0", "luna-0", 0, True), ("harry-1", "luna-0", 1, True), ("cedric-0", "luna-1", 0, True), ("cedric-1", "luna-1", 1, False)],
        [("harry-0", "luna-1", 0, False), ("harry-1", "luna-1", 1, False), ("draco-0", "luna-0", 0, False), ("draco-1", "luna-0", 1, True)]),
    ("egress", "TCP"): ("gryffindor", "ravenclaw", FIRST, "hufflepuff", SECOND,
        [("harry-0", "luna-0", 0, True), ("harry-1", "luna-0", 1, True), ("harry-0", "cedric-1", 1, True), ("harry-1", "cedric-1", 0, False)],
        [("harry-0", "luna-1", 0, False), ("harry-1", "luna-1", 1, False), ("harry-0", "draco-0", 0, False), ("harry-1", "draco-0", 1, True)]),
    ("egress", "UDP"): ("hufflepuff", "ravenclaw", SECOND, "gryffindor", FIRST,
        [("cedric-0", "luna-0", 0, True), ("cedric-1", "luna-0", 1, True), ("cedric-0", "harry-1", 0, True), ("cedric-1", "harry-1", 1, False)],
        [("cedric-0", "luna-1", 0, False), ("cedric-1", "luna-1", 1, False), ("cedric-0", "draco-0", 1, False), ("cedric-1", "draco-0", 0, True)]),
    ("egress", "SCTP"): ("ravenclaw", "gryffindor", FIRST, "hufflepuff", FIRST,
        [("luna-0", "harry-0", 0, True), ("luna-1", "harry-0", 1, True), ("luna-0", "cedric-1", 0, True), ("luna-1", "cedric-1", 1, False)],
        [("luna-0", "harry-1", 0, False), ("luna-1", "harry-1", 1, False), ("luna-0", "draco-0", 0, False), ("luna-1", "draco-0", 1, True)]),
}
UPSTREAM_PORTS = {"TCP": (80, 8080), "UDP": (53, 5353), "SCTP": (9003, 9005)}

def baseline_policy(direction, proto):
    subject, everything, deny_port, port_house, accept_port, _, _ = BASELINE[(direction, proto)]
    tofrom = "from" if direction == "ingress" else "to"
    return cnp("default", "Baseline", 10, subject, direction, [
        rule(f"allow-{tofrom}-{everything}-everything", "Accept", everything, direction),
        rule(f"deny-{tofrom}-{everything}-everything", "Deny", everything, direction),
        rule(f"deny-{tofrom}-slytherin-at-port-{deny_port}", "Deny", "slytherin", direction, proto, deny_port),
        rule(f"allow-{tofrom}-{port_house}-at-port-{accept_port}", "Accept", port_house, direction, proto, accept_port),
        rule(f"deny-{tofrom}-{port_house}-everything-else", "Deny", port_house, direction),
    ])

def baseline_single(direction, proto):
    *_, pokes1, pokes2 = BASELINE[(direction, proto)]
    p0 = baseline_policy(direction, proto)
    p1 = swap(p0, direction, 0, 1)
    d = direction
    steps = [
        # Should support an 'allow-<d>' policy for <P> protocol; ensure rule ordering is respected
        # Should support an 'allow-<d>' policy for <P> protocol at the specified port
        {"apply": [p0], "probes": probes(proto, pokes1)},
        # Should support an 'deny-<d>' policy for <P> protocol; ensure rule ordering is respected
        # Should support a 'deny-<d>' policy for <P> protocol at the specified port
        {"update": [p1], "probes": probes(proto, pokes2)},
    ]
    test = f"CNPBaselineTier{d.capitalize()}{proto}"
    a, b = UPSTREAM_PORTS[proto]
    sctp = "\n# SCTP is probed with raw protocol-132 packets (INIT, answered by INIT ACK): no SCTP stack here." if proto == "SCTP" else ""
    header = f"""# upstream: {test} (conformance/tests/baseline-admin-network-policy-standard-{d}-{proto.lower()}-rules.go, base/baseline_tier/standard-{d}-{proto.lower()}-rules.yaml)
# Subtests, in upstream order:
#   step 1: "Should support an 'allow-{d}' policy for {proto} protocol; ensure rule ordering is respected"
#           "Should support an 'allow-{d}' policy for {proto} protocol at the specified port"
#   step 2 (rules 0<->1): "Should support an 'deny-{d}' policy for {proto} protocol; ensure rule ordering is respected"
#           "Should support a 'deny-{d}' policy for {proto} protocol at the specified port"
# Names and ports mapped as scripts/gen-cnp-cases.py says ({proto} {a} -> {FIRST}, {b} -> {SECOND}).{sctp}
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

def baseline_egress_named_port():
    p0 = baseline_policy("egress", "UDP")
    p1 = copy.deepcopy(p0)
    # Upstream's "dns" is UDP 53 in its pod spec; the harness names UDP 80 serve-80-udp.
    p1["spec"]["egress"][3]["protocols"] = [{"destinationNamedPort": "serve-80-udp"}]
    steps = [
        {"apply": [p0]},
        # Should support an 'allow-egress' policy for named port
        {"update": [p1], "probes": probes("UDP", [("cedric-0", "harry-1", 0, True), ("cedric-1", "harry-1", 1, False)])},
    ]
    test = "CNPBaselineTierEgressNamedPort"
    header = f"""# upstream: {test} (conformance/tests/baseline-admin-network-policy-experimental-egress-rules.go, base/baseline_tier/standard-egress-udp-rules.yaml)
# Subtests:
#   step 2 (rule 3 rewritten to the named port "dns", UDP 53): "Should support an 'allow-egress' policy for named port"
# Names and ports mapped as scripts/gen-cnp-cases.py says (UDP 53 -> 80, 5353 -> 81; "dns" -> serve-80-udp).
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

# --- EgressNodePeers: probes to the nodes' own addresses ---
# Upstream serves them from a host-network pod (centaur) on its HostNetworkPorts; the
# harness serves TCP, UDP and SCTP on 80 and 81 in every node's namespace, and a `to: nodes`
# probe must hold for every node of the run. HostNetworkPorts mapped per protocol: the
# first TCP one -> TCP 80, the second -> TCP 81; the first UDP one -> UDP 80, a later one ->
# UDP 81; the SCTP one -> SCTP 80.
LINUX_NODES = {"nodes": {"matchLabels": {"kubernetes.io/os": "linux"}}}

def node_matrix(cells):
    """cells: {pod: bool}; one column, every node of the run."""
    w = max(len(p) for p in PODS)
    lines = [" ".join(["-".ljust(w), "nodes"])]
    for f in PODS:
        v = cells.get(f)
        lines.append(" ".join([f.ljust(w), "-" if v is None else "." if v else "X"]))
    return "\n".join(lines) + "\n"

def probes_to_nodes(pokes):
    """pokes: [(client, protocol, port, allowed)]"""
    out = []
    for proto in ["TCP", "UDP", "SCTP"]:
        for number in (FIRST, SECOND):
            cells = {pod(c): ok for c, pr, n, ok in pokes if pr == proto and n == number}
            if cells:
                out.append({"port": number, "protocol": proto, "to": "nodes", "expect": node_matrix(cells)})
    return out

def admin_egress_node_peers():
    p0 = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
          "metadata": {"name": "node-and-cidr-as-peers-example"},
          "spec": {"tier": "Admin", "priority": 75, "subject": house_pods("gryffindor"), "egress": [
              {"name": f"allow-egress-to-{FIRST}-on-nodes", "action": "Accept", "to": [LINUX_NODES], "protocols": port("TCP", FIRST)},
              {"name": f"pass-egress-to-{FIRST}-on-nodes", "action": "Pass", "to": [LINUX_NODES], "protocols": port("UDP", FIRST)},
              {"name": "deny-egress-to-slytherin-and-nodes-and-internet", "action": "Deny",
               "to": [house_pods("slytherin"), LINUX_NODES, {"networks": ["0.0.0.0/0", "::/0"]}]}]}}
    ns_labels, pod_labels = house_labels()
    steps = [{"apply": [p0], "labelNamespace": ns_labels, "labelPod": pod_labels, "probes": probes_to_nodes([
        # Should support an 'allow-egress' rule policy for egress-node-peer
        ("harry-1", "TCP", FIRST, True),
        # Should support a 'pass-egress' rule policy for egress-node-peer
        ("harry-1", "UDP", FIRST, True),
        # Should support a 'deny-egress' rule policy for egress-node-peer
        ("harry-1", "TCP", SECOND, False), ("harry-1", "UDP", SECOND, False), ("harry-1", "SCTP", FIRST, False)])}]
    test = "CNPAdminTierEgressNodePeers"
    header = f"""# upstream: {test} (conformance/tests/admin-network-policy-experimental-egress-rules.go, base/admin_tier/experimental-egress-selector-rules.yaml)
# Subtests (one manifest, no patch):
#   "Should support an 'allow-egress' rule policy for egress-node-peer"  (TCP HostNetworkPorts[0] -> TCP 80)
#   "Should support a 'pass-egress' rule policy for egress-node-peer"    (UDP HostNetworkPorts[2] -> UDP 80)
#   "Should support a 'deny-egress' rule policy for egress-node-peer"    (TCP [1] -> 81, UDP [4] -> 81, SCTP [6] -> 80)
# Upstream probes a host-network pod (centaur-1), i.e. a node's address; here `to: nodes`
# probes every node's own address (served in the node's namespace), and each must behave so.
# Namespaces and pods carry upstream's conformance-house labels; nodes are labelled
# kubernetes.io/os=linux as the kubelet labels them.
# SCTP is probed with raw protocol-132 packets (INIT, answered by INIT ACK): no SCTP stack here.
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

def baseline_egress_node_peers():
    p0 = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": "default"},
          "spec": {"tier": "Baseline", "priority": 10,
                   "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": HOUSE["gryffindor"]}}}, "egress": [
              {"name": f"allow-egress-to-{FIRST}-on-nodes", "action": "Accept", "to": [LINUX_NODES],
               "protocols": [{"tcp": {"destinationPort": {"range": {"start": FIRST, "end": SECOND}}}}]},
              {"name": "deny-egress-to-nodes-and-internet", "action": "Deny", "to": [LINUX_NODES, {"networks": ["0.0.0.0/0", "::/0"]}]}]}}
    steps = [{"apply": [p0], "probes": probes_to_nodes([
        # Should support an 'allow-egress' rule policy for egress-node-peer
        ("harry-0", "TCP", FIRST, True), ("harry-1", "TCP", SECOND, True),
        # Should support a 'deny-egress' rule policy for egress-node-peer
        ("harry-1", "UDP", SECOND, False), ("harry-1", "SCTP", FIRST, False)])}]
    test = "CNPBaselineTierEgressNodePeers"
    header = f"""# upstream: {test} (conformance/tests/baseline-admin-network-policy-experimental-egress-rules.go, base/baseline_tier/experimental-egress-selector-rules.yaml)
# Subtests (one manifest, no patch):
#   "Should support an 'allow-egress' rule policy for egress-node-peer"  (TCP range HostNetworkPorts[0]..[1] -> 80..81)
#   "Should support a 'deny-egress' rule policy for egress-node-peer"    (UDP 34346 -> 81, SCTP 9003 -> 80)
# Upstream probes a host-network pod (centaur-1), i.e. a node's address; here `to: nodes`
# probes every node's own address (served in the node's namespace), and each must behave so.
# Nodes are labelled kubernetes.io/os=linux as the kubelet labels them.
# SCTP is probed with raw protocol-132 packets (INIT, answered by INIT ACK): no SCTP stack here.
# Generated by scripts/gen-cnp-cases.py.
"""
    return test, header, {"name": test, "pods": PODS, "blockedMustDrop": True, "steps": steps}

def main(out):
    os.makedirs(out, exist_ok=True)
    # UDP and SCTP are not this test with another protocol: upstream's UDP test uses another
    # subject (hufflepuff) and roles; each needs its own transcription.
    for proto in ["TCP"]:
        test, header, case = admin_ingress(proto)
        dump(os.path.join(out, f"{test}.yaml"), header, case)
    for make in [priority_field, integration, baseline_ingress_named_port, admin_ingress_udp, admin_ingress_named_port, admin_egress_tcp, admin_egress_inline_cidr, baseline_egress_inline_cidr, admin_egress_named_port, admin_ingress_sctp, admin_egress_udp,
                 admin_egress_sctp, admin_gress, baseline_gress, baseline_egress_named_port,
                 admin_egress_node_peers, baseline_egress_node_peers]:
        test, header, case = make()
        dump(os.path.join(out, f"{test}.yaml"), header, case)
    for direction, proto in BASELINE:
        test, header, case = baseline_single(direction, proto)
        dump(os.path.join(out, f"{test}.yaml"), header, case)

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "conformance", "cases", "cnp"))
