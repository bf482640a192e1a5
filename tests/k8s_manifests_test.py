"""Offline checks of deploy/k8s: the manifests parse, the cluster file in the
ConfigMap is a valid ecsnap.config.Config (protoc parses it against
proto/config.proto), and what a deployment depends on holds: the arena and
socket volumes, the slot plumbing (spec.nodeName -> --node -> a slot's node),
gRPC probes on the port the daemon serves health on, memory sized to the
arena, TLS paths that the secret provides, non-root containers."""

import os
import re
import subprocess
import sys
import tempfile
import unittest

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "python"))
import junit  # noqa: E402

ROOT = os.environ.get("TEST_SRCDIR", "")
if ROOT:
    ROOT = os.path.join(ROOT, os.environ.get("TEST_WORKSPACE", "ecsnap"))
else:
    ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
K8S = os.path.join(ROOT, "deploy", "k8s")


def load(name):
    with open(os.path.join(K8S, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def by_kind(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"one {kind} expected, found {len(found)}"
    return found[0]


def quantity(q):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(q))
    assert m, f"unexpected quantity {q}"
    return int(m.group(1)) * units.get(m.group(2), 1)


def field(text, name):
    """The first `name: value` of a text-format proto (a number or a string)."""
    m = re.search(rf"\b{name}:\s*\"?([^\"\s]+)\"?", text)
    return m.group(1) if m else None


def parse_config(text):
    """Runs protoc over the cluster file: a typo in a field name fails here."""
    with tempfile.TemporaryFile() as out:
        r = subprocess.run(["/usr/bin/protoc", f"-I{ROOT}", "--encode=ecsnap.config.Config",
                            os.path.join(ROOT, "proto", "config.proto")],
                           input=text.encode(), stdout=out, stderr=subprocess.PIPE, timeout=60)
    return r.returncode, r.stderr.decode()


def check_probes(test, container, port):
    """gRPC probes on the health port: readiness asks for the daemon (""), startup
    and liveness for ecsnap.live, so that a long rebuild does not get it killed."""
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        test.assertEqual(container[probe]["grpc"]["port"], port, probe)
    test.assertNotIn("service", container["readinessProbe"]["grpc"])
    for probe in ("startupProbe", "livenessProbe"):
        test.assertEqual(container[probe]["grpc"].get("service"), "ecsnap.live", probe)


class DaemonSetTest(unittest.TestCase):
    def setUp(self):
        self.docs = load("ecsnapd-daemonset.yaml")
        self.ds = by_kind(self.docs, "DaemonSet")
        self.config = by_kind(self.docs, "ConfigMap")["data"]["cluster.textproto"]
        self.pod = self.ds["spec"]["template"]["spec"]
        self.daemon = next(c for c in self.pod["containers"] if c["name"] == "ecsnapd")
        self.mounts = {m["name"]: m for m in self.daemon["volumeMounts"]}
        self.volumes = {v["name"]: v for v in self.pod["volumes"]}

    def test_the_cluster_file_parses_and_a_typo_would_not(self):
        rc, err = parse_config(self.config)
        self.assertEqual(rc, 0, err)
        rc, _ = parse_config(self.config.replace("peer_timeout_ms", "peer_timeout_msec"))
        self.assertNotEqual(rc, 0, "protoc accepted an unknown field: the check proves nothing")

    def test_the_arena_and_the_socket_are_host_paths_the_trainers_share(self):
        arena_dir = field(self.config, "arena_dir")
        socket = field(self.config, "socket_path")
        self.assertEqual(self.mounts["arena"]["mountPath"], arena_dir)
        self.assertEqual(self.volumes["arena"]["hostPath"]["path"], arena_dir)
        self.assertTrue(arena_dir.startswith("/dev/shm/"), "the arena must be on a tmpfs")
        self.assertEqual(self.mounts["run"]["mountPath"], os.path.dirname(socket))
        trainer = load("trainer-pod.yaml")[0]["spec"]
        self.assertEqual(trainer["volumes"][0]["hostPath"]["path"],
                         self.volumes["run"]["hostPath"]["path"])
        self.assertIn(str(trainer["securityContext"]["runAsUser"]),
                      re.findall(r"trainer_uids:\s*(\d+)", self.config),
                      "the trainer's uid must be admitted by the daemon")

    def test_each_node_finds_its_slot(self):
        env = {e["name"]: e for e in self.daemon["env"]}
        self.assertEqual(env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName")
        self.assertIn("--node=$(NODE_NAME)", self.daemon["args"])
        nodes = re.findall(r'node:\s*"([^"]+)"', self.config)
        self.assertGreaterEqual(len(nodes), 2)
        self.assertEqual(len(nodes), len(set(nodes)), "two slots on one node")
        self.assertEqual(len(nodes), len(re.findall(r"slots\s*{", self.config)),
                         "every slot names its node")

    def test_probes_are_grpc_on_the_health_port(self):
        port = int(field(self.config, "health_address").rsplit(":", 1)[1])
        check_probes(self, self.daemon, port)
        self.assertEqual(field(self.config, "peer_listen_host"), "0.0.0.0",
                         "on the host network, listen on every address of the node")
        service = by_kind(self.docs, "Service")
        self.assertEqual(service["spec"]["clusterIP"], "None")
        self.assertIn(port, [p["port"] for p in service["spec"]["ports"]])

    def test_memory_is_sized_to_the_arena(self):
        arena = int(field(self.config, "arena_bytes"))
        res = self.daemon["resources"]
        self.assertGreaterEqual(quantity(res["requests"]["memory"]), arena)
        self.assertEqual(res["requests"], res["limits"],
                         "a Guaranteed pod: the arena is never the first thing reclaimed")

    def test_tls_comes_from_the_secret_at_the_paths_the_config_names(self):
        tls_dir = self.mounts["tls"]["mountPath"]
        self.assertIn("secret", self.volumes["tls"])
        for key in ("cert_file", "key_file", "ca_file"):
            self.assertTrue(field(self.config, key).startswith(tls_dir + "/"), key)
        self.assertIn("{slot}", field(self.config, "cert_file"))

    def test_the_daemon_runs_unprivileged_and_rolls_one_node_at_a_time(self):
        self.assertTrue(self.pod["securityContext"]["runAsNonRoot"])
        sc = self.daemon["securityContext"]
        self.assertFalse(sc["allowPrivilegeEscalation"])
        self.assertTrue(sc["readOnlyRootFilesystem"])
        self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
        m = int(field(self.config, "m"))
        unavailable = self.ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"]
        self.assertLessEqual(unavailable, m, "a rollout must not take more nodes than m")


class SidecarTest(unittest.TestCase):
    def test_the_sidecar_shares_a_memory_arena_and_is_probed_where_it_listens(self):
        pod = load("sidecar-pod.yaml")[0]["spec"]
        daemon = pod["initContainers"][0]
        self.assertEqual(daemon["restartPolicy"], "Always", "a native sidecar")
        args = dict(a[2:].split("=", 1) for a in daemon["args"])
        volumes = {v["name"]: v for v in pod["volumes"]}
        self.assertEqual(volumes["arena"]["emptyDir"]["medium"], "Memory")
        arena = int(args["arena_bytes"])
        self.assertGreaterEqual(quantity(volumes["arena"]["emptyDir"]["sizeLimit"]), arena)
        self.assertGreaterEqual(quantity(daemon["resources"]["limits"]["memory"]), arena)
        host, port = args["health_address"].rsplit(":", 1)
        self.assertNotIn(host, ("127.0.0.1", "localhost"), "the kubelet probes the pod's IP")
        check_probes(self, daemon, int(port))
        trainer = pod["containers"][0]
        socket_dir = os.path.dirname(args["socket"])
        self.assertIn(socket_dir, [m["mountPath"] for m in trainer["volumeMounts"]])


if __name__ == "__main__":
    junit.main()
