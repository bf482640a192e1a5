"""ecsnap: in-memory, erasure-coded snapshots of training state.

    import ecsnap
    client = ecsnap.Client("/run/ecsnap/ecsnapd.sock", job="gpt", rank=r, local_ranks=[0, 1])

For PyTorch, see ecsnap.torch: snapshot(), restore(), agree_step().
"""

import importlib.util
import os


def _load_extension():
    try:
        from . import _ecsnap  # installed next to this file (Bazel runfiles)
        return _ecsnap
    except ImportError:
        pass
    # A source checkout: the extension Bazel built under .bazel/bin.
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.abspath(os.path.join(here, "..", "..", ".."))
    path = os.path.join(root, ".bazel", "bin", "client", "python", "ecsnap", "_ecsnap.so")
    if not os.path.exists(path):
        raise ImportError(
            "ecsnap's extension is not built: run `bazel build //client/python:package` "
            f"(looked for {path})")
    spec = importlib.util.spec_from_file_location("ecsnap._ecsnap", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ext = _load_extension()
SnapshotHandle = _ext.SnapshotHandle
RestoredTensor = _ext.RestoredTensor
built_with_cuda = _ext.built_with_cuda


class Client(_ext.Client):
    """A trainer rank's connection to its node's ecsnapd.

    address: the daemon's Unix socket path (or host:port).
    job, rank: the job id and this rank; local_ranks: every rank of the job
    on this node. transport: "auto" (shared memory when possible), "shm" or
    "grpc".
    """

    def __init__(self, address, job, rank, local_ranks=None, transport="auto", copy_threads=2):
        super().__init__(address, job, rank, list(local_ranks or [rank]), transport, copy_threads)


__all__ = ["Client", "SnapshotHandle", "RestoredTensor", "built_with_cuda"]
