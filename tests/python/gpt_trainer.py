"""One rank of a small GPT trained with AdamW over torch.distributed (gloo),
snapshotting every step through ecsnap. Deterministic: the model comes from
a fixed seed, each step's batch from (step, rank), gradients are summed in a
fixed order. Writes one JSON line per step (loss, parameter hash) to --out.

    gpt_trainer.py --rank R --world W --port P --socket S --job J --steps N --out F
        [--die_at_step K] [--resume]
"""

import argparse
import datetime
import hashlib
import json
import os
import signal

import torch
import torch.distributed as dist
import torch.nn as nn

import ecsnap
import ecsnap.torch as et

VOCAB, D_MODEL, HEADS, LAYERS, SEQ, BATCH = 97, 32, 4, 2, 16, 8


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Parameter(torch.zeros(SEQ, D_MODEL))
        layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, 4 * D_MODEL, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, LAYERS)
        self.head = nn.Linear(D_MODEL, VOCAB)
        self.register_buffer("mask", torch.triu(torch.full((SEQ, SEQ), float("-inf")), 1))

    def forward(self, x):
        h = self.tok(x) + self.pos
        return self.head(self.blocks(h, mask=self.mask))


def batch(step, rank):
    g = torch.Generator().manual_seed(100003 * step + rank)
    data = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def param_hash(model):
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    # --die_before_snapshot K: SIGKILL after step K's update, before its snapshot.
    # --commit_at K: wait until step K's snapshot is committed before going on.
    for name in ("rank", "world", "port", "steps", "die_at_step", "die_before_snapshot",
                 "commit_at"):
        ap.add_argument("--" + name, type=int, default=0)
    ap.add_argument("--socket")
    ap.add_argument("--job")
    ap.add_argument("--out")
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank,
                            world_size=a.world, timeout=datetime.timedelta(seconds=30))
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    client = ecsnap.Client(a.socket, job=a.job, rank=a.rank, local_ranks=[a.rank])

    start = 1
    if a.resume:
        step = et.agree_step(client)
        if step == 0:
            raise SystemExit(f"rank {a.rank}: no step every rank can restore")
        got, extra = et.restore(client, model, opt, step)
        assert got == step and extra == {"step": step}, (got, extra)
        start = step + 1
        if a.rank == 0:
            with open(a.out, "a") as f:
                f.write(json.dumps({"restored": step}) + "\n")

    handle = None
    for step in range(start, a.steps + 1):
        x, y = batch(step, a.rank)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        if step == a.die_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # a trainer crash, mid-step
        if handle is not None:
            handle.wait()  # the last snapshot's copies are done: the optimizer may write
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= a.world
        opt.step()
        opt.zero_grad(set_to_none=False)
        if a.rank == 0:
            with open(a.out, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item().hex(),
                                    "params": param_hash(model)}) + "\n")
        if step == a.die_before_snapshot:
            os.kill(os.getpid(), signal.SIGKILL)  # the others commit this step; this rank never
        handle = et.snapshot(client, step, model, opt, extra={"step": step})
        if step == a.commit_at:
            handle.wait_committed()
    if handle is not None:
        handle.wait_committed()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
