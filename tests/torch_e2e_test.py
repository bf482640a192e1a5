"""Exact recovery of a real training run.

Four gloo ranks train a small GPT with AdamW, each talking to its own ecsnapd
of a four-daemon loopback cluster (RS 2+2), snapshotting every step. The
reference run trains N steps uninterrupted. The faulty run loses a trainer
(SIGKILL at a random step) and a node (a daemon SIGKILLed and replaced by an
empty one); all ranks restart, agree on a step, restore, and train to N. From
the restored step on, its losses and parameter hashes must equal the
reference run's bit for bit.
"""

import json
import os
import random
import subprocess
import sys
import time
import unittest

import junit
from ecsnap_testing import Cluster, free_ports

WORLD, STEPS = 4, 10
TRAINER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python", "gpt_trainer.py")


def run_ranks(cluster, job, out, extra_args=(), timeout=240):
    """Starts WORLD ranks, rank r on daemon r; waits for all; returns codes."""
    port = free_ports(1)[0]
    procs = []
    for rank in range(WORLD):
        args = [sys.executable, TRAINER, "--rank", str(rank), "--world", str(WORLD),
                "--port", str(port), "--socket", cluster.socket(rank), "--job", job,
                "--steps", str(STEPS), "--out", out, *extra_args(rank)]
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    deadline = time.time() + timeout
    codes, logs = [], []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        codes.append(p.returncode)
        logs.append(out.decode(errors="replace"))
    return codes, logs


def records(path):
    out = {}
    with open(path) as f:
        for line in f:
            out.setdefault("lines", []).append(json.loads(line))
    return out.get("lines", [])


class ExactRecovery(unittest.TestCase):
    def setUp(self):
        self.cluster = Cluster(k=2, m=2, arena_bytes=64 << 20, retain=2)
        self.tmp = self.cluster.root

    def tearDown(self):
        self.cluster.stop()

    def test_a_run_that_loses_a_trainer_and_a_node_continues_bit_for_bit(self):
        ref_out = os.path.join(self.tmp, "reference.jsonl")
        codes, logs = run_ranks(self.cluster, "reference", ref_out, lambda r: [])
        self.assertEqual(codes, [0] * WORLD, "\n".join(logs))
        reference = {r["step"]: r for r in records(ref_out)}
        self.assertEqual(sorted(reference), list(range(1, STEPS + 1)))

        die_at = random.Random(7).randint(4, STEPS - 2)
        out = os.path.join(self.tmp, "faulty.jsonl")
        codes, logs = run_ranks(self.cluster, "faulty", out,
                                lambda r: ["--die_at_step", str(die_at)] if r == 1 else [])
        self.assertEqual(codes[1], -9, "rank 1 was to die by SIGKILL\n" + logs[1])
        self.assertTrue(all(c != 0 for c in codes), "the other ranks lose their peer")

        self.cluster.replace(2)  # a node lost: its daemon and memory
        codes, logs = run_ranks(self.cluster, "faulty", out, lambda r: ["--resume"])
        self.assertEqual(codes, [0] * WORLD, "\n".join(logs) + self.cluster.log(2))

        lines = records(out)
        restored = [l["restored"] for l in lines if "restored" in l]
        self.assertEqual(len(restored), 1)
        restored = restored[0]
        self.assertGreaterEqual(restored, 1)
        self.assertLess(restored, die_at)
        after = [l for l in lines[lines.index({"restored": restored}):] if "step" in l]
        self.assertEqual([l["step"] for l in after], list(range(restored + 1, STEPS + 1)))
        for l in after:
            self.assertEqual(l["loss"], reference[l["step"]]["loss"], f"loss at step {l['step']}")
            self.assertEqual(l["params"], reference[l["step"]]["params"],
                             f"parameters at step {l['step']}")
        self.assertIn("rebuilt job faulty step", self.cluster.log(2))
        print(f"trainer killed at step {die_at}, daemon 2 replaced; restored step {restored}; "
              f"steps {restored + 1}..{STEPS} bit-identical to the reference run")

    def test_ranks_that_committed_a_step_the_others_never_did_rewind_and_continue_exactly(self):
        ref_out = os.path.join(self.tmp, "reference2.jsonl")
        codes, logs = run_ranks(self.cluster, "reference2", ref_out, lambda r: [])
        self.assertEqual(codes, [0] * WORLD, "\n".join(logs))
        reference = {r["step"]: r for r in records(ref_out)}

        # Ranks 0, 2, 3 commit step 6; rank 1 dies before snapshotting it. The
        # job agrees on step 5, restores it, and must snapshot step 6 again.
        out = os.path.join(self.tmp, "rewind.jsonl")
        codes, logs = run_ranks(self.cluster, "rewind", out,
                                lambda r: ["--die_before_snapshot", "6"] if r == 1
                                else ["--commit_at", "6"])
        self.assertEqual(codes[1], -9, logs[1])
        codes, logs = run_ranks(self.cluster, "rewind", out, lambda r: ["--resume"])
        self.assertEqual(codes, [0] * WORLD, "\n".join(logs) + self.cluster.log(0))
        lines = records(out)
        restored = [l["restored"] for l in lines if "restored" in l]
        self.assertEqual(restored, [5])
        after = [l for l in lines[lines.index({"restored": 5}):] if "step" in l]
        self.assertEqual([l["step"] for l in after], list(range(6, STEPS + 1)))
        for l in after:
            self.assertEqual(l["loss"], reference[l["step"]]["loss"], f"loss at step {l['step']}")
            self.assertEqual(l["params"], reference[l["step"]]["params"],
                             f"parameters at step {l['step']}")
        self.assertIn("job rewind rewound to step 5", self.cluster.log(0))
        print("ranks 0, 2, 3 committed step 6 and rank 1 never did; the job restored step 5, "
              f"rewound, and steps 6..{STEPS} are bit-identical to the reference run")


if __name__ == "__main__":
    junit.main()
