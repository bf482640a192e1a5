"""Real ecsnapd clusters on 127.0.0.1 for Python tests and benchmarks.

Every daemon has its own directory (arena, sockets, log), is started with
subprocess and stopped by its pid; every wait is bounded.
"""

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def runfile(path):
    """A binary built by Bazel: from the test's runfiles, else from .bazel/bin."""
    srcdir = os.environ.get("TEST_SRCDIR")
    if srcdir:
        return os.path.join(srcdir, "ecsnap", path)
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    return os.path.join(root, ".bazel", "bin", path)


def free_ports(count):
    """Ports below the kernel's ephemeral range: one from that range, free
    now, can be taken as the source port of a connection the daemons already
    up make before the daemon it is meant for binds it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    lo = max(1024, low - 12000)
    hi = max(lo + 1000, low)
    socks = []
    for _ in range(10000):
        if len(socks) == count:
            break
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", random.randrange(lo, hi)))
            socks.append(s)
        except OSError:
            s.close()
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    """n = k + m daemons forming one group (m = 0, n = 1: a lone daemon)."""

    def __init__(self, k=2, m=2, arena_bytes=256 << 20, retain=2, root=None):
        self.k, self.m, self.n = k, m, k + m
        self.root = root or tempfile.mkdtemp(prefix="ecsnap-py-", dir="/dev/shm")
        ports = free_ports(self.n)
        slots = "".join(f'  slots {{ peer_address: "127.0.0.1:{p}" }}\n' for p in ports)
        # Mutual TLS on the peer plane, as in production: a CA and one
        # certificate per slot.
        tls = os.path.join(self.root, "tls")
        make_certs = runfile("deploy/make_certs.sh")
        if not os.path.exists(make_certs):  # outside Bazel: the source tree's
            make_certs = os.path.join(os.path.dirname(__file__), "..", "..", "deploy",
                                      "make_certs.sh")
        subprocess.run(["bash", make_certs, tls, str(self.n)], check=True,
                       stdout=subprocess.DEVNULL)
        self.config = os.path.join(self.root, "cluster.textproto")
        with open(self.config, "w") as f:
            f.write(f"cluster {{\n  k: {k}\n  m: {m}\n  peer_timeout_ms: 3000\n{slots}}}\n"
                    f"daemon {{ arena_bytes: {arena_bytes} retain: {retain}\n"
                    f'  tls {{ cert_file: "{tls}/slot-{{slot}}.crt" '
                    f'key_file: "{tls}/slot-{{slot}}.key" ca_file: "{tls}/ca.crt" }} }}\n')
        self.procs = [None] * self.n
        for slot in range(self.n):
            self.start(slot)

    def dir(self, slot):
        return os.path.join(self.root, f"slot{slot}")

    def socket(self, slot):
        return os.path.join(self.dir(slot), "data.sock")

    def admin(self, slot):
        return "unix:" + os.path.join(self.dir(slot), "admin.sock")

    def log(self, slot):
        with open(os.path.join(self.dir(slot), "ecsnapd.log")) as f:
            return f.read()

    def start(self, slot):
        os.makedirs(self.dir(slot), exist_ok=True)
        args = [runfile("daemon/ecsnapd"), f"--arena_dir={self.dir(slot)}/arena",
                f"--socket={self.socket(slot)}", f"--admin_address={self.admin(slot)}"]
        if self.m > 0:
            args += [f"--config={self.config}", f"--slot={slot}"]
        else:
            args += [f"--config={self.config}"]
        log = open(os.path.join(self.dir(slot), "ecsnapd.log"), "a")
        self.procs[slot] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        for _ in range(200):
            if self.procs[slot].poll() is not None:
                raise RuntimeError(f"ecsnapd {slot} exited:\n{self.log(slot)}")
            if self.ctl(slot, "status").returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"ecsnapd {slot} did not start:\n{self.log(slot)}")

    def ctl(self, slot, *args):
        return subprocess.run([runfile("client/ecsnapctl"), f"--address={self.admin(slot)}",
                               "--timeout_ms=2000", *args], capture_output=True, text=True)

    def kill(self, slot):
        proc = self.procs[slot]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def replace(self, slot):
        """A lost node: SIGKILL, its memory gone, an empty daemon in its slot."""
        self.kill(slot)
        shutil.rmtree(os.path.join(self.dir(slot), "arena"), ignore_errors=True)
        self.start(slot)

    def stop(self):
        for proc in self.procs:
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            if proc:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
