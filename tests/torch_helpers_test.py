"""ecsnap.torch against a real ecsnapd: the README example, both restore
paths (into existing optimizer state in place, and into a fresh optimizer),
dtypes, RNG states, extras, agree_step and bad input."""

import collections
import io
import os
import pickle
import random
import re
import subprocess
import sys
import unittest

import numpy as np
import torch
import torch.distributed as dist

import ecsnap
import ecsnap.torch as et
import junit
from ecsnap_testing import Cluster, free_ports

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def model_and_optimizer(dtype=torch.float32):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.LayerNorm(24),
                                torch.nn.Linear(24, 3)).to(dtype)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)


def train(model, optimizer, steps):
    for _ in range(steps):
        model(torch.randn(4, 12, dtype=next(model.parameters()).dtype)).float().sum().backward()
        optimizer.step()
        optimizer.zero_grad()


class WithDaemon(unittest.TestCase):
    """One real ecsnapd for the test class."""

    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(k=1, m=0, arena_bytes=64 << 20, retain=1)

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()


class TorchHelpers(WithDaemon):
    def client(self, job):
        return ecsnap.Client(self.cluster.socket(0), job=job, rank=0)

    def test_the_readme_example_runs(self):
        with open(README) as f:
            text = f.read()
        section = text[text.index("## Use from PyTorch"):]
        code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        env = dict(os.environ, ECSNAP_SOCKET=self.cluster.socket(0))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("restored step 5", out.stdout)

    def check_round_trip(self, job, dtype, fresh_optimizer):
        client = self.client(job)
        model, opt = model_and_optimizer(dtype)
        train(model, opt, 3)
        random.seed(5)
        np.random.seed(5)
        handle = et.snapshot(client, 7, model, opt, extra={"epoch": 2, "loader": [1, 2, 3]})
        handle.wait()
        handle.wait_committed()
        want_params = [p.detach().clone() for p in model.parameters()]
        want_opt = opt.state_dict()
        want_rng = (torch.rand(4), random.random(), np.random.rand())

        model2, opt2 = model_and_optimizer(dtype)
        if fresh_optimizer:
            opt2 = torch.optim.AdamW(model2.parameters(), lr=0.9)
        else:
            train(model2, opt2, 1)  # state exists: restored in place
            opt2.param_groups[0]["lr"] = 0.9
        torch.manual_seed(999)
        step, extra = et.restore(client, model2, opt2)
        self.assertEqual(step, 7)
        self.assertEqual(extra, {"epoch": 2, "loader": [1, 2, 3]})
        for a, b in zip(want_params, model2.parameters()):
            self.assertTrue(torch.equal(a, b))
        got_opt = opt2.state_dict()
        self.assertEqual(got_opt["param_groups"][0]["lr"], 0.05)
        for pid, entries in want_opt["state"].items():
            for key, value in entries.items():
                self.assertTrue(torch.equal(value, got_opt["state"][pid][key]), (pid, key))
        self.assertTrue(torch.equal(torch.rand(4), want_rng[0]))
        self.assertEqual(random.random(), want_rng[1])
        self.assertEqual(np.random.rand(), want_rng[2])
        # Training goes on identically from the restored state.
        x = torch.randn(4, 12, dtype=dtype)
        for m, o in ((model, opt), (model2, opt2)):
            m(x).float().sum().backward()
            o.step()
        for a, b in zip(model.parameters(), model2.parameters()):
            self.assertTrue(torch.equal(a, b))

    def test_restore_into_existing_optimizer_state_in_place(self):
        self.check_round_trip("inplace", torch.float32, fresh_optimizer=False)

    def test_restore_into_a_fresh_optimizer(self):
        self.check_round_trip("fresh", torch.float32, fresh_optimizer=True)

    def test_bfloat16_and_the_grpc_transport(self):
        client = ecsnap.Client(self.cluster.socket(0), job="bf16", rank=0, transport="grpc")
        self.assertFalse(client.shared_memory)
        model, opt = model_and_optimizer(torch.bfloat16)
        train(model, opt, 2)
        et.snapshot(client, 1, model, opt).wait_committed()
        model2, opt2 = model_and_optimizer(torch.bfloat16)
        et.restore(client, model2, opt2)
        for a, b in zip(model.parameters(), model2.parameters()):
            self.assertTrue(torch.equal(a, b))

    def test_agree_step_on_a_one_rank_group(self):
        client = self.client("agree")
        model, opt = model_and_optimizer()
        for step in (3, 4):
            et.snapshot(client, step, model, opt).wait_committed()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_ports(1)[0]}",
                                rank=0, world_size=1)
        try:
            self.assertEqual(et.agree_step(client), 4)
        finally:
            dist.destroy_process_group()

    def test_errors_are_exceptions_with_the_daemons_message(self):
        client = self.client("errors")
        model, opt = model_and_optimizer()
        et.snapshot(client, 5, model, opt).wait_committed()
        with self.assertRaisesRegex(RuntimeError, "FAILED_PRECONDITION: .*steps only grow"):
            et.snapshot(client, 4, model, opt).wait()
        with self.assertRaisesRegex(RuntimeError, "NOT_FOUND: .*no restorable step 9"):
            client.restore(9)
        other = torch.nn.Linear(3, 3)
        with self.assertRaisesRegex(RuntimeError, "INVALID_ARGUMENT"):
            et.restore(client, other)


    def test_device_fields_of_tensors_and_destinations(self):
        """The binding's tensor and destination tuples carry a device and a
        stream; host tensors given as such round-trip, and a device tensor is
        refused with the library's sentence where it cannot be copied."""
        client = self.client("devices")
        src = torch.arange(1024, dtype=torch.float32)
        t = ("w", "param", "float32", [1024], src.data_ptr(), 4096)
        client.snapshot(1, [t + (-1, 0)], [src]).wait_committed()
        dst = torch.zeros(1024, dtype=torch.float32)
        got, rest = client.restore_into(1, [("w", dst.data_ptr(), 4096, -1, 0)])
        self.assertEqual((got, rest), (1, []))
        self.assertTrue(torch.equal(dst, src))
        with self.assertRaisesRegex(ValueError, "data_ptr, nbytes"):
            client.snapshot(2, [t + (-1,)], [src])
        client.snapshot(2, [list(t)], [src]).wait_committed()  # a list is a tuple too
        self.assertIsInstance(ecsnap.built_with_cuda(), bool)
        if not torch.cuda.is_available():
            code = "FAILED_PRECONDITION: .*CUDA device" if ecsnap.built_with_cuda() \
                else "UNIMPLEMENTED: .*--config=cuda"
            with self.assertRaisesRegex(RuntimeError, code):
                client.snapshot(3, [t + (0, 0)], [src])
            with self.assertRaisesRegex(RuntimeError, code):
                client.restore_into(2, [("w", dst.data_ptr(), 4096, 0, 0)])


class _RunsAShellCommand:
    """What a forged snapshot would carry: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RestoredObjects(WithDaemon):
    def test_a_pickled_os_system_call_is_refused_not_run(self):
        client = ecsnap.Client(self.cluster.socket(0), job="hostile", rank=0)
        model, opt = model_and_optimizer()
        marker = os.path.join(self.cluster.dir(0), "code-ran")
        et.snapshot(client, 1, model, opt, extra={"ok": 1, "evil": _RunsAShellCommand(marker)}
                    ).wait_committed()
        with self.assertRaisesRegex(pickle.UnpicklingError, "posix.system.*may hold plain data"):
            et.restore(client, model, opt)
        self.assertFalse(os.path.exists(marker), "the pickled command ran")
        # The opt-out is explicit, and then it really is a full unpickler.
        et.restore(client, model, opt, trust_pickles=True)
        self.assertTrue(os.path.exists(marker))

    def test_numpy_and_torch_reducers_are_not_reachable_from_the_bytes(self):
        # Each of these names a constructor that a forged pickle can abuse
        # (a dtype whose object field is attacker bytes; torch.load reached
        # through a storage): none may be built by a restore.
        for forged in (pickle.dumps(np.dtype("i4")), pickle.dumps(np.arange(3)),
                       pickle.dumps(np.float32(1)), pickle.dumps(torch.arange(3)),
                       pickle.dumps(bytearray(b"x"), protocol=2)):
            with self.assertRaises(pickle.UnpicklingError):
                et._PlainDataUnpickler(forged, "extra", {}).load()

    def test_shared_references_cycles_and_hostile_ids(self):
        client = ecsnap.Client(self.cluster.socket(0), job="shared", rank=0)
        model, opt = model_and_optimizer()
        t = torch.arange(4.0)
        chain = ()
        for _ in range(60):  # shared twice per level: 2^60 leaves as a tree
            chain = (chain, chain)
        loop = [1]
        loop.append(loop)
        extra = {"a": t, "b": t, "chain": chain, "loop": loop}
        et.snapshot(client, 1, model, opt, extra=extra).wait_committed()
        _, got = et.restore(client, model, opt)
        self.assertIs(got["a"], got["b"])
        self.assertTrue(torch.equal(got["a"], t))
        self.assertIs(got["chain"][0], got["chain"][1])
        self.assertIs(got["loop"][1], got["loop"])
        # Persistent ids the snapshot does not back, or of the wrong shape.
        for pid in (("torch", 99), ("numpy", -1), ("evil", 0), "torch", ("torch", 0, 0)):
            class Forged(pickle.Pickler):
                def persistent_id(self, obj, pid=pid):
                    return pid if obj == "x" else None
            buf = io.BytesIO()
            Forged(buf).dump(["x"])
            with self.assertRaises(pickle.UnpicklingError):
                et._PlainDataUnpickler(buf.getvalue(), "extra", {}).load()

    def test_pickled_rng_states_of_an_older_snapshot_are_refused_first(self):
        legacy = {"rng.python": memoryview(pickle.dumps((random.getstate(), None)))}
        with self.assertRaisesRegex(pickle.UnpicklingError, "older ecsnap"):
            et._legacy_rng(legacy, trust_pickles=False)
        self.assertTrue(et._legacy_rng(legacy, trust_pickles=True))
        self.assertFalse(et._legacy_rng({"rng.python.state": None}, trust_pickles=False))

    def test_plain_data_extras_round_trip(self):
        client = ecsnap.Client(self.cluster.socket(0), job="plain", rank=0)
        model, opt = model_and_optimizer()
        extra = {"epoch": 3, "lr": 0.5, "name": "run-7", "raw": b"\x00\x01", "none": None,
                 "seen": {1, 2}, "order": collections.OrderedDict(a=1), "pair": (1, 2.5),
                 "np": np.arange(5, dtype=np.int16), "np_scalar": np.float32(1.5),
                 "t": torch.arange(6, dtype=torch.float64).reshape(2, 3), "dtype": torch.bfloat16,
                 "c": 1 + 2j}
        et.snapshot(client, 1, model, opt, extra=extra).wait_committed()
        _, got = et.restore(client, model, opt)
        self.assertEqual(set(got), set(extra))
        for key in ("epoch", "lr", "name", "raw", "none", "seen", "order", "pair", "np_scalar",
                    "dtype", "c"):
            self.assertEqual(got[key], extra[key], key)
        self.assertTrue(np.array_equal(got["np"], extra["np"]))
        self.assertEqual(got["np"].dtype, np.int16)
        self.assertTrue(torch.equal(got["t"], extra["t"]))


if __name__ == "__main__":
    junit.main()
