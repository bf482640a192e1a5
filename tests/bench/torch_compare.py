"""torch_compare: ecsnap against what PyTorch users do today, same run.

For a model state of about --gib GiB (parameters + AdamW moments), times
(best of --reps):
  stall    ecsnap.torch.snapshot(...) + handle.wait(): until the trainer may
           step the optimizer again
  save     torch.save of the same state_dicts to /dev/shm and to local disk
  restore  ecsnap.torch.restore into the model and optimizer, against
           torch.load from /dev/shm followed by the same load_state_dicts
The first snapshot after connecting is reported apart from the steady state
(the best of the later ones). Last line:
  RESULT stall_vs_torch_save_shm=<x> restore_vs_torch_load_shm=<y> first_vs_steady=<z>
(ratios of times; below 1.0 is faster than PyTorch).

    bazel build //client/python:package //daemon:ecsnapd //client:ecsnapctl
    PYTHONPATH=client/python:tests/python /usr/bin/python3 tests/bench/torch_compare.py
"""

import argparse
import ctypes
import os
import shutil
import sys
import tempfile
import time

import torch

import ecsnap
import ecsnap.torch as et
from ecsnap_testing import Cluster


def remove_when_gone(path):
    """Removes the directory `path` once this process is gone, however it
    goes: a forked watcher waits for the end of a pipe only this process
    holds open (outside the mount namespace mount_huge_tmpfs makes, where
    `path` is an empty directory)."""
    r, w = os.pipe()
    if os.fork() == 0:
        os.close(w)
        os.setsid()
        while os.read(r, 1):
            pass
        shutil.rmtree(path, ignore_errors=True)
        os._exit(0)
    os.close(r)
    os.set_inheritable(w, False)


def mount_huge_tmpfs(path):
    """Mounts a tmpfs with huge=within_size over `path`, in a mount namespace
    of this thread's own (the daemons started after inherit it; the mount goes
    with the last of them), as deploy/dev-shm-ecsnap.mount sets up for a
    node. Returns None, or why not (it needs root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns, ms_rec, ms_private = 0x00020000, 0x4000, 1 << 18
    if libc.unshare(clone_newns) != 0:
        return "cannot make a mount namespace: " + os.strerror(ctypes.get_errno())
    if libc.mount(None, b"/", None, ms_rec | ms_private, None) != 0:
        return "cannot make the mounts private: " + os.strerror(ctypes.get_errno())
    if libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, b"mode=0700,huge=within_size") != 0:
        return "cannot mount a tmpfs: " + os.strerror(ctypes.get_errno())
    return None


def best(reps, fn):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--disk_dir", default=tempfile.gettempdir())
    ap.add_argument("--prepare_gap", type=float, default=3.0,
                    help="seconds between ecsnap.torch.prepare and the first snapshot "
                         "(a first training step); negative: do not prepare")
    ap.add_argument("--arena_pages", choices=["huge", "base"], default="huge",
                    help="huge: the daemon's arena on a tmpfs mounted huge=within_size (needs "
                         "root); base: on /dev/shm as it is")
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="ecsnap-py-", dir="/dev/shm")
    remove_when_gone(root)
    pages = "the pages of /dev/shm"
    if a.arena_pages == "huge":
        why = mount_huge_tmpfs(root)
        pages = "a tmpfs mounted huge=within_size" if why is None else pages + f" ({why})"
    torch.set_num_threads(2)
    torch.manual_seed(0)
    # Parameters and two AdamW moments: 12 bytes per float32 parameter.
    width = 4096
    layers = max(1, round(a.gib * (1 << 30) / 12 / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state_bytes = sum(p.numel() * 12 for p in model.parameters())

    # retain (2) + 2 windows, each at most 1/16 over the state.
    cluster = Cluster(k=1, m=0, arena_bytes=(17 * state_bytes // 4 + (256 << 20)) // 4096 * 4096,
                      root=root)
    try:
        t0 = time.perf_counter()
        client = ecsnap.Client(cluster.socket(0), job="compare", rank=0)
        t_connect = time.perf_counter() - t0
        step = [0]
        if a.prepare_gap >= 0:
            et.prepare(client, model, opt)
            time.sleep(a.prepare_gap)

        stalls = []
        for _ in range(max(a.reps, 2)):
            t0 = time.perf_counter()
            step[0] += 1
            handle = et.snapshot(client, step[0], model, opt)
            handle.wait()
            stalls.append(time.perf_counter() - t0)
            handle.wait_committed()
        t_first, t_stall = stalls[0], min(stalls[1:])
        # The physical limit of a first step after a pause: copying the same
        # tensors into a warm buffer, steady and after the same pause (on a
        # virtual machine whose host takes back idle guest memory, the first
        # stores after a pause cost more whoever makes them).
        flat = [t.reshape(-1).view(torch.uint8)
                for t in list(model.state_dict().values()) +
                [v for s in opt.state_dict()["state"].values() for v in s.values()
                 if torch.is_tensor(v) and v.dim() > 0]]
        buf = torch.empty(sum(f.numel() for f in flat), dtype=torch.uint8)

        def copy_all():
            at = 0
            for f in flat:
                buf[at:at + f.numel()].copy_(f)
                at += f.numel()

        t_copy = best(a.reps, copy_all)
        time.sleep(max(a.prepare_gap, 0))
        t_copy_after_gap = best(1, copy_all)
        del buf

        shm_path = os.path.join("/dev/shm", f"torch_compare_{os.getpid()}.pt")
        disk_path = os.path.join(a.disk_dir, f"torch_compare_{os.getpid()}.pt")
        state = lambda: {"model": model.state_dict(), "optim": opt.state_dict()}
        t_save_shm = best(a.reps, lambda: torch.save(state(), shm_path))

        def save_disk():
            torch.save(state(), disk_path)
            with open(disk_path, "rb+") as f:
                os.fsync(f.fileno())  # a checkpoint is on disk only once synced

        t_save_disk = best(a.reps, save_disk)

        t_restore = best(a.reps, lambda: et.restore(client, model, opt))

        def load_shm():
            loaded = torch.load(shm_path)
            model.load_state_dict(loaded["model"])
            opt.load_state_dict(loaded["optim"])

        t_load_shm = best(a.reps, load_shm)
        t_load_only = best(a.reps, lambda: torch.load(shm_path))
        os.unlink(shm_path)
        os.unlink(disk_path)
    finally:
        cluster.stop()

    gib = state_bytes / (1 << 30)
    print(f"torch_compare: {gib:.2f} GiB of state ({layers} x Linear({width},{width}) + AdamW), "
          f"torch {torch.__version__}, best of {a.reps}, arena on {pages}")
    print(f"{'ecsnap connect':<44} {t_connect * 1e3:9.1f} ms")
    print(f"{'ecsnap stall of each step after connect':<44} "
          + " ".join(f"{t * 1e3:.1f}" for t in stalls) + " ms")
    if a.prepare_gap >= 0:
        print(f"{'ecsnap prepare, then a first step of':<44} {a.prepare_gap * 1e3:9.1f} ms")
    rows = [
        ("ecsnap first snapshot + wait after connect", t_first),
        ("ecsnap snapshot + wait (trainer stall)", t_stall),
        ("copy of the same tensors into a warm buffer", t_copy),
        ("the same after the prepare gap idle", t_copy_after_gap),
        ("torch.save to /dev/shm", t_save_shm),
        ("torch.save to disk (+fsync)", t_save_disk),
        ("ecsnap restore into model + optimizer", t_restore),
        ("torch.load from /dev/shm + load_state_dict", t_load_shm),
        ("torch.load from /dev/shm alone", t_load_only),
    ]
    for name, t in rows:
        print(f"{name:<44} {t * 1e3:9.1f} ms {gib / t:7.2f} GiB/s")
    print(f"RESULT stall_vs_torch_save_shm={t_stall / t_save_shm:.3f} "
          f"restore_vs_torch_load_shm={t_restore / t_load_shm:.3f} "
          f"first_vs_steady={t_first / t_stall:.3f} "
          f"copy_after_gap_vs_copy={t_copy_after_gap / t_copy:.3f} "
          f"stall_vs_copy={t_stall / t_copy:.3f}")


if __name__ == "__main__":
    sys.exit(main())
