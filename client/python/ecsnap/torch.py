"""PyTorch helpers: snapshot and restore a model, its optimizer, RNG states
and extras through ecsnap, and agree on a step across ranks.

    handle = ecsnap.torch.snapshot(client, step, model, optimizer, extra={"epoch": e})
    loss = model(batch).backward()     # the copy runs meanwhile (parameters are read only)
    handle.wait()                      # before optimizer.step() changes the tensors
    optimizer.step()

    step = ecsnap.torch.agree_step(client)          # after a restart, on every rank
    extra = ecsnap.torch.restore(client, model, optimizer, step)

Tensors are read in place (through their data pointers): nothing is copied
in Python. With a libecsnap built with CUDA (ecsnap built_with_cuda()), CUDA
tensors are copied by the GPU's copy engine straight into the daemon's
memory, ordered after the tensor's current stream, while the backward pass
runs; restores write them back in place on the device. Without it, CUDA
tensors are copied to the host first (.cpu()).

Restoring never runs code from a snapshot. RNG states travel as tensors.
The optimizer's hyperparameters and the caller's `extra` are pickled with
every torch tensor and numpy array (or numpy scalar) in them taken out and
snapshotted as a tensor of its own; the pickle keeps a persistent id. They
are read back by a restricted unpickler that builds only plain data: None,
bools, numbers, strings, bytes, lists, tuples, dicts, sets, frozensets,
OrderedDicts, torch dtypes, and the tensors and arrays those ids name. No numpy or torch
constructor is reachable from the bytes (their reducers can be abused to
forge object pointers or to reach torch.load). Anything else (a class of
the trainer's, a function such as os.system) raises pickle.UnpicklingError
instead of running. A job whose extras hold other objects, and whose
snapshots only it can write, passes restore(..., trust_pickles=True).
"""

import collections
import io
import pickle
import random

import numpy as np
import torch

_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.bool: "bool",
}
_TORCH = {name: dtype for dtype, name in _DTYPES.items()}
_TORCH["bytes"] = torch.uint8


class _Batch:
    """The tensors of one snapshot and the objects that own their bytes."""

    def __init__(self, sizes_only=False):
        self.tensors = []
        self.keep = []
        # Only the sizes are wanted (prepare): no copy off a device.
        self.sizes_only = sizes_only

    def add(self, name, kind, tensor):
        t = tensor.detach()
        if self.sizes_only:
            self.tensors.append((name, kind, "bytes", [], 0, t.numel() * t.element_size()))
            return
        on_gpu = t.device.type == "cuda" and _native_cuda()
        if t.device.type != "cpu" and not on_gpu:
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {name}: dtype {t.dtype} cannot be snapshotted")
        self.keep.append(t)
        entry = (name, kind, _DTYPES[t.dtype], list(t.shape), t.data_ptr(),
                 t.numel() * t.element_size())
        if on_gpu:
            # The copy is ordered after the work queued on this stream so far.
            entry += (t.device.index, torch.cuda.current_stream(t.device).cuda_stream)
        self.tensors.append(entry)

    def add_object(self, name, kind, obj):
        """Pickles `obj`, its tensors and arrays taken out (see _ArrayPickler)."""
        out = io.BytesIO()
        pickler = _ArrayPickler(out, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.dump(obj)
        data = bytearray(out.getbuffer())
        t = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        self.keep.extend([data, t])
        self.tensors.append((name, kind, "bytes", [], t.data_ptr() if data else 0, len(data)))
        for i, tensor in enumerate(pickler.arrays):
            self.add(f"{name}.array.{i}", kind, tensor)


_ARRAY_KINDS = ("torch", "numpy", "numpy_scalar")


class _ArrayPickler(pickle.Pickler):
    """Takes every torch tensor, numpy array and numpy scalar out of the
    pickle: each becomes a persistent id (kind, index) and goes to `arrays`,
    to be snapshotted as a tensor of its own. Shared references and cycles
    stay what they were (the pickle's memo keeps them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrays = []
        self._ids = {}  # id(obj) -> its persistent id, with obj kept alive

    def persistent_id(self, obj):
        seen = self._ids.get(id(obj))
        if seen is not None:
            return seen[0]  # the same object twice: one array, shared again
        if torch.is_tensor(obj):
            kind, tensor = "torch", obj
        elif isinstance(obj, (np.ndarray, np.generic)):
            array = np.asarray(obj) if isinstance(obj, np.generic) else np.ascontiguousarray(obj)
            tensor = torch.from_numpy(array) if array.dtype != np.object_ else None
            if tensor is None or tensor.dtype not in _DTYPES:
                raise TypeError(f"a numpy value of dtype {array.dtype} cannot be snapshotted "
                                "safely; convert it to a supported dtype or to plain data")
            kind = "numpy" if isinstance(obj, np.ndarray) else "numpy_scalar"
        else:
            return None
        self.arrays.append(tensor)
        pid = (kind, len(self.arrays) - 1)
        self._ids[id(obj)] = (pid, obj)
        return pid


def _array_of(pid, name, by_name, cache):
    """The tensor or array a persistent id names, checked; one object per id."""
    if type(pid) is tuple and pid in cache:
        return cache[pid]
    if (type(pid) is not tuple or len(pid) != 2 or pid[0] not in _ARRAY_KINDS
            or type(pid[1]) is not int or f"{name}.array.{pid[1]}" not in by_name):
        raise pickle.UnpicklingError(f"{name} refers to an array the snapshot does not hold")
    tensor = _tensor(by_name[f"{name}.array.{pid[1]}"]).clone()
    if pid[0] == "torch":
        cache[pid] = tensor
    else:
        array = tensor.numpy()
        cache[pid] = array if pid[0] == "numpy" else array[()]
    return cache[pid]


def snapshot(client, step, model, optimizer=None, extra=None):
    """Starts snapshotting `step`; returns a handle. Call handle.wait() before
    the optimizer changes the parameters or its state."""
    batch = _batch(model, optimizer, extra)
    return client.snapshot(step, batch.tensors, batch.keep)


def prepare(client, model, optimizer=None, extra=None):
    """Optional, once, before the first snapshot (after the optimizer has
    made its state, i.e. after a first step): has the daemon make the windows
    of the first snapshots, of the size this state needs, and maps each in the
    background, so that the first snapshots cost what later ones do."""
    client.prepare(_batch(model, optimizer, extra, sizes_only=True).tensors)


def _batch(model, optimizer, extra, sizes_only=False):
    batch = _Batch(sizes_only)
    for name, tensor in model.state_dict().items():
        batch.add("model." + name, "param", tensor)
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars = {}
        for pid, entries in state["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    batch.add(f"optim.state.{pid}.{key}", "optimizer", value)
                else:
                    scalars[(pid, key)] = value
        batch.add_object("optim.meta", "optimizer",
                         {"param_groups": state["param_groups"], "scalars": scalars})
    batch.add("rng.torch", "rng", torch.get_rng_state())
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            batch.add(f"rng.cuda.{i}", "rng", s)
    _add_rng_states(batch)
    batch.add_object("extra", "extra", extra)
    return batch


def _tensor(restored):
    dtype = _TORCH[restored.dtype]
    if restored.nbytes == 0:
        return torch.empty(restored.shape if restored.dtype != "bytes" else [0], dtype=dtype)
    t = torch.frombuffer(restored, dtype=dtype)
    return t if restored.dtype == "bytes" else t.reshape(restored.shape)


# (module, name) -> what the restricted unpickler may build for it. Nothing
# here constructs from attacker-chosen bytes beyond plain Python values, and
# none of them takes attributes set by a BUILD opcode.
_SAFE_GLOBALS = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
_SAFE_GLOBALS.update({("torch", str(d).split(".")[1]): d for d in _DTYPES})


class _TrustedUnpickler(pickle.Unpickler):
    """Any object (trust_pickles=True); arrays come back from their tensors."""

    def __init__(self, data, name, by_name):
        super().__init__(io.BytesIO(data))
        self._name, self._by_name, self._arrays = name, by_name, {}

    def persistent_load(self, pid):
        return _array_of(pid, self._name, self._by_name, self._arrays)


class _PlainDataUnpickler(_TrustedUnpickler):
    """Builds plain data only; any other global is refused (see the module
    docstring)."""

    def find_class(self, module, name):
        found = _SAFE_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"a snapshot's pickled object names {module}.{name}, which ecsnap does not "
                "load: restored objects may hold plain data, torch tensors and numpy arrays "
                "only. If the snapshot comes from a trusted job, pass trust_pickles=True.")
        return found


def _object(by_name, name, trust_pickles=False):
    restored = by_name[name]
    if not restored.nbytes:
        return None
    data = bytes(memoryview(restored))
    unpickler = (_TrustedUnpickler if trust_pickles else _PlainDataUnpickler)(data, name, by_name)
    try:
        return unpickler.load()
    except pickle.UnpicklingError:
        raise
    except (RecursionError, ValueError, TypeError, AttributeError, EOFError, IndexError,
            KeyError, MemoryError) as e:
        raise pickle.UnpicklingError(f"{name} of the snapshot is not a readable pickle: "
                                     f"{type(e).__name__}: {e}") from e


def _add_rng_states(batch):
    """Python's and numpy's generator states, as tensors (no pickle)."""
    version, internal, gauss = random.getstate()
    batch.add("rng.python.state", "rng", torch.tensor([version, *internal], dtype=torch.int64))
    batch.add("rng.python.gauss", "rng",
              torch.tensor([0.0 if gauss is None else 1.0, gauss or 0.0], dtype=torch.float64))
    name, key, pos, has_gauss, cached = np.random.get_state()
    if name != "MT19937":
        raise TypeError(f"numpy's global generator is {name}; only MT19937 is supported")
    batch.add("rng.numpy.key", "rng", torch.from_numpy(key.astype(np.uint32).view(np.int32)))
    batch.add("rng.numpy.pos", "rng", torch.tensor([pos, has_gauss], dtype=torch.int64))
    batch.add("rng.numpy.gauss", "rng", torch.tensor([cached], dtype=torch.float64))


def _legacy_rng(by_name, trust_pickles):
    """True for a snapshot of an ecsnap that pickled the generators' states;
    refused before anything is restored unless trusted."""
    if "rng.python.state" in by_name or "rng.python" not in by_name:
        return False
    if not trust_pickles:
        raise pickle.UnpicklingError(
            "this snapshot comes from an older ecsnap that pickled the RNG states; restore "
            "it once with trust_pickles=True if its source is trusted")
    return True


def _set_rng_states(by_name, trust_pickles):
    if _legacy_rng(by_name, trust_pickles):
        python_state, numpy_state = pickle.loads(bytes(memoryview(by_name["rng.python"])))
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        return
    state = _tensor(by_name["rng.python.state"]).tolist()
    flag, gauss = _tensor(by_name["rng.python.gauss"]).tolist()
    random.setstate((state[0], tuple(state[1:]), gauss if flag else None))
    key = _tensor(by_name["rng.numpy.key"]).numpy().view(np.uint32)
    pos, has_gauss = _tensor(by_name["rng.numpy.pos"]).tolist()
    (cached,) = _tensor(by_name["rng.numpy.gauss"]).tolist()
    np.random.set_state(("MT19937", key, pos, has_gauss, cached))


def _native_cuda():
    """True when libecsnap copies CUDA tensors itself."""
    from . import built_with_cuda
    return built_with_cuda()


def _destination(name, tensor, into):
    if not tensor.is_contiguous():
        return False
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type == "cpu":
        into.append((name, tensor.data_ptr(), nbytes))
        return True
    if tensor.device.type == "cuda" and _native_cuda():
        # Written in place on the device; work queued on the current stream
        # afterwards sees the restored bytes.
        into.append((name, tensor.data_ptr(), nbytes, tensor.device.index,
                     torch.cuda.current_stream(tensor.device).cuda_stream))
        return True
    return False


def restore(client, model, optimizer=None, step=0, trust_pickles=False):
    """Loads `step` (0: the newest) into `model` and `optimizer` in place and
    sets the RNG states. Returns (step, extra). Pickled objects are read as
    plain data only unless `trust_pickles` (see the module docstring).

    The model's tensors, and the optimizer's state where it exists already,
    are written in place: one copy from the daemon's memory, no temporary
    state_dict. What has no place yet (the state of a fresh optimizer, say)
    is restored into new tensors and loaded the usual way."""
    into = []
    model_state = model.state_dict()
    in_place = {name for name, t in model_state.items() if _destination("model." + name, t, into)}
    optim_state = optimizer.state_dict()["state"] if optimizer is not None else {}
    for pid, entries in optim_state.items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                _destination(f"optim.state.{pid}.{key}", value, into)
    got, rest = client.restore_into(step, into)
    by_name = {t.name: t for t in rest}
    # Objects first: a refused one stops the restore before anything else
    # is set (the tensors restored in place are already written).
    _legacy_rng(by_name, trust_pickles)
    meta = _object(by_name, "optim.meta", trust_pickles) if optimizer is not None else None
    extra = _object(by_name, "extra", trust_pickles)

    with torch.no_grad():
        for name, t in model_state.items():
            if name not in in_place:
                t.copy_(_tensor(by_name["model." + name]))
    if optimizer is not None:
        late = {n: t for n, t in by_name.items() if n.startswith("optim.state.")}
        if late or set(meta["scalars"]) - {(p, k) for p, e in optim_state.items() for k in e}:
            # Some state had no place: rebuild the whole state_dict.
            state = {pid: dict(entries) for pid, entries in optim_state.items()}
            for name, t in late.items():
                pid, key = name[len("optim.state."):].split(".", 1)
                state.setdefault(int(pid), {})[key] = _tensor(t)
            for (pid, key), value in meta["scalars"].items():
                state.setdefault(pid, {})[key] = value
            optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        else:
            # Everything was restored in place: only hyperparameters and scalars.
            params = [p for group in optimizer.param_groups for p in group["params"]]
            for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
                group.update({k: v for k, v in saved.items() if k != "params"})
            for (pid, key), value in meta["scalars"].items():
                optimizer.state[params[pid]][key] = value
    torch.set_rng_state(_tensor(by_name["rng.torch"]).clone())
    if torch.cuda.is_available():
        states = [_tensor(by_name[n]).clone() for n in sorted(by_name) if n.startswith("rng.cuda.")]
        if states:
            torch.cuda.set_rng_state_all(states)
    _set_rng_states(by_name, trust_pickles)
    return got, extra


def agree_step(client, group=None):
    """The newest step every rank of `group` can restore (0 if none), agreed
    with torch.distributed. Each rank lists its restorable steps; the answer
    is the newest step in all the lists: the minimum of the ranks' newest
    steps is not enough, since a rank may have retired that step already."""
    import torch.distributed as dist
    mine = sorted(step for step, _, _ in client.list_restorable())
    lists = [None] * dist.get_world_size(group)
    dist.all_gather_object(lists, mine, group=group)
    common = set(lists[0]).intersection(*[set(l) for l in lists[1:]])
    return max(common) if common else 0
