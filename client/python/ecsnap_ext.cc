// The Python binding of libecsnap: module ecsnap._ecsnap. Tensor bytes are
// never copied by Python: snapshots read them through the data pointers the
// caller passes (torch: tensor.data_ptr()), and restored tensors are exposed
// through the buffer protocol over the library's own buffer.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "client/ecsnap.h"

namespace py = pybind11;

namespace ecsnap {
namespace {

void Throw(const absl::Status& st) {
  // A Python exception whose text starts with the gRPC code name.
  throw std::runtime_error(std::string(absl::StatusCodeToString(st.code())) + ": " +
                           std::string(st.message()));
}

// A tuple or a list, as the caller wrote it.
py::sequence Sequence(const py::handle& item) {
  if (!py::isinstance<py::sequence>(item) || py::isinstance<py::str>(item)) {
    throw py::type_error("a tensor or destination must be a tuple or a list");
  }
  return py::reinterpret_borrow<py::sequence>(item);
}

template <typename T>
T Value(absl::StatusOr<T> v) {
  if (!v.ok()) Throw(v.status());
  return *std::move(v);
}

const std::vector<std::pair<std::string, DType>>& DTypeNames() {
  static const auto* names = new std::vector<std::pair<std::string, DType>>{
      {"bytes", DType::kBytes},       {"float32", DType::kFloat32},
      {"float64", DType::kFloat64},   {"float16", DType::kFloat16},
      {"bfloat16", DType::kBFloat16}, {"int8", DType::kInt8},
      {"uint8", DType::kUInt8},       {"int16", DType::kInt16},
      {"int32", DType::kInt32},       {"int64", DType::kInt64},
      {"bool", DType::kBool},         {"float8_e4m3", DType::kFloat8E4M3},
      {"float8_e5m2", DType::kFloat8E5M2}};
  return *names;
}

DType ParseDType(const std::string& s) {
  for (const auto& [name, d] : DTypeNames()) {
    if (name == s) return d;
  }
  throw py::value_error("unknown dtype '" + s + "'");
}

std::string DTypeName(DType d) {
  for (const auto& [name, v] : DTypeNames()) {
    if (v == d) return name;
  }
  return "bytes";
}

TensorKind ParseKind(const std::string& s) {
  if (s == "param") return TensorKind::kParam;
  if (s == "optimizer") return TensorKind::kOptimizer;
  if (s == "rng") return TensorKind::kRng;
  if (s == "extra") return TensorKind::kExtra;
  throw py::value_error("unknown tensor kind '" + s + "' (param, optimizer, rng, extra)");
}

std::string KindName(TensorKind k) {
  switch (k) {
    case TensorKind::kParam: return "param";
    case TensorKind::kOptimizer: return "optimizer";
    case TensorKind::kRng: return "rng";
    case TensorKind::kExtra: return "extra";
  }
  return "extra";
}

std::string StateName(StepState s) {
  switch (s) {
    case StepState::kReceiving: return "RECEIVING";
    case StepState::kLocal: return "LOCAL";
    case StepState::kProtected: return "PROTECTED";
    case StepState::kRebuilding: return "REBUILDING";
  }
  return "?";
}

// A snapshot in progress; keeps the Python objects owning the bytes alive
// until the snapshot no longer needs them.
struct PyHandle {
  SnapshotHandle handle;
  py::object keep_alive;

  void Wait() {
    absl::Status st;
    {
      py::gil_scoped_release release;
      st = handle.Wait();
    }
    if (!st.ok()) Throw(st);
  }
  void WaitCommitted() {
    absl::Status st;
    {
      py::gil_scoped_release release;
      st = handle.WaitCommitted();
    }
    keep_alive = py::none();
    if (!st.ok()) Throw(st);
  }
};

// A restored tensor: metadata and a buffer over the restored state (the
// library's own copy: writable, so torch.frombuffer takes it as it is).
struct PyRestoredTensor {
  std::string name, kind, dtype;
  std::vector<int64_t> shape;
  std::shared_ptr<uint8_t> owner;
  const uint8_t* data = nullptr;
  size_t bytes = 0;
};

class PyClient {
 public:
  PyClient(const std::string& address, const std::string& job, uint32_t rank,
           std::vector<uint32_t> local_ranks, const std::string& transport, int copy_threads) {
    ClientOptions o;
    o.daemon_address = address;
    o.job_id = job;
    o.rank = rank;
    o.local_ranks = std::move(local_ranks);
    o.copy_threads = copy_threads;
    if (transport == "auto") {
      o.transport = Transport::kAuto;
    } else if (transport == "shm") {
      o.transport = Transport::kSharedMemory;
    } else if (transport == "grpc") {
      o.transport = Transport::kGrpc;
    } else {
      throw py::value_error("transport must be 'auto', 'shm' or 'grpc'");
    }
    absl::StatusOr<std::unique_ptr<Client>> c;
    {
      py::gil_scoped_release release;
      c = Client::Connect(o);
    }
    client_ = Value(std::move(c));
  }

  // tensors: [(name, kind, dtype, shape, data_ptr, nbytes)]; `keep_alive`
  // owns the memory behind the pointers.
  PyHandle Snapshot(uint64_t step, const py::list& tensors, py::object keep_alive) {
    return PyHandle{Value(client_->Snapshot(step, Tensors(tensors))), std::move(keep_alive)};
  }

  // tensors: as for Snapshot; only their sizes are read.
  void Prepare(const py::list& tensors) {
    std::vector<Tensor> ts = Tensors(tensors);
    absl::Status st;
    {
      py::gil_scoped_release release;
      st = client_->Prepare(ts);
    }
    if (!st.ok()) Throw(st);
  }

 private:
  // [(name, kind, dtype, shape, data_ptr, nbytes[, device, cuda_stream])]:
  // device -1 (or absent) is host memory; otherwise a CUDA device ordinal,
  // and cuda_stream the cudaStream_t (an int; 0: the default stream).
  static std::vector<Tensor> Tensors(const py::list& tensors) {
    std::vector<Tensor> ts;
    for (const py::handle& item : tensors) {
      const py::sequence t = Sequence(item);
      if (t.size() != 6 && t.size() != 8) {
        throw py::value_error("a tensor is (name, kind, dtype, shape, data_ptr, nbytes"
                              "[, device, cuda_stream])");
      }
      Tensor x;
      x.name = t[0].cast<std::string>();
      x.kind = ParseKind(t[1].cast<std::string>());
      x.dtype = ParseDType(t[2].cast<std::string>());
      x.shape = t[3].cast<std::vector<int64_t>>();
      x.data = reinterpret_cast<const void*>(t[4].cast<uintptr_t>());
      x.bytes = t[5].cast<uint64_t>();
      if (t.size() == 8) {
        x.device = t[6].cast<int>();
        x.cuda_stream = reinterpret_cast<void*>(t[7].cast<uintptr_t>());
      }
      ts.push_back(std::move(x));
    }
    return ts;
  }

 public:

  std::vector<std::tuple<uint64_t, std::string, uint64_t>> ListRestorable() {
    absl::StatusOr<std::vector<RestorableStep>> steps;
    {
      py::gil_scoped_release release;
      steps = client_->ListRestorable();
    }
    std::vector<std::tuple<uint64_t, std::string, uint64_t>> out;
    for (const auto& s : Value(std::move(steps))) out.emplace_back(s.step, StateName(s.state), s.bytes);
    return out;
  }

  std::pair<uint64_t, std::vector<PyRestoredTensor>> Restore(uint64_t step) {
    absl::StatusOr<RestoredState> state;
    {
      py::gil_scoped_release release;
      state = client_->Restore(step);
    }
    RestoredState s = Value(std::move(state));
    std::vector<PyRestoredTensor> out;
    for (const RestoredTensor& t : s.tensors) {
      out.push_back({t.name, KindName(t.kind), DTypeName(t.dtype), t.shape, s.buffer, t.data.data(),
                     t.data.size()});
    }
    return {s.step, std::move(out)};
  }

  // into: [(name, data_ptr, nbytes[, device, cuda_stream])] of writable
  // memory (host, or CUDA device memory as for Tensors). Restores those in
  // place; returns (step, [RestoredTensor]) for the tensors not named.
  std::pair<uint64_t, std::vector<PyRestoredTensor>> RestoreInto(uint64_t step,
                                                                 const py::list& into) {
    std::vector<TensorDestination> dst;
    for (const py::handle& item : into) {
      const py::sequence t = Sequence(item);
      if (t.size() != 3 && t.size() != 5) {
        throw py::value_error("a destination is (name, data_ptr, nbytes[, device, cuda_stream])");
      }
      TensorDestination d{t[0].cast<std::string>(), reinterpret_cast<void*>(t[1].cast<uintptr_t>()),
                          t[2].cast<uint64_t>()};
      if (t.size() == 5) {
        d.device = t[3].cast<int>();
        d.cuda_stream = reinterpret_cast<void*>(t[4].cast<uintptr_t>());
      }
      dst.push_back(std::move(d));
    }
    absl::StatusOr<uint64_t> got;
    RestoredState rest;
    {
      py::gil_scoped_release release;
      got = client_->RestoreInto(step, dst, &rest);
    }
    const uint64_t s = Value(std::move(got));
    std::vector<PyRestoredTensor> out;
    for (const RestoredTensor& t : rest.tensors) {
      out.push_back({t.name, KindName(t.kind), DTypeName(t.dtype), t.shape, rest.buffer,
                     t.data.data(), t.data.size()});
    }
    return {s, std::move(out)};
  }

  bool shared_memory() const { return client_->shared_memory(); }

 private:
  std::unique_ptr<Client> client_;
};

}  // namespace
}  // namespace ecsnap

PYBIND11_MODULE(_ecsnap, m) {
  using namespace ecsnap;
  m.doc() = "libecsnap: snapshot and restore trainer state through ecsnapd";
  m.def("built_with_cuda", &BuiltWithCuda,
        "True when this libecsnap copies CUDA tensors itself (built with --config=cuda).");
  py::class_<PyHandle>(m, "SnapshotHandle")
      .def("wait", &PyHandle::Wait,
           "Blocks until the tensors are copied; they may be modified afterwards.")
      .def("wait_committed", &PyHandle::WaitCommitted,
           "Blocks until the daemon has verified and committed the snapshot.")
      .def_property_readonly("done", [](const PyHandle& h) { return h.handle.done(); })
      .def_property_readonly("step", [](const PyHandle& h) { return h.handle.step(); })
      .def_property_readonly("bytes_copied", [](const PyHandle& h) { return h.handle.bytes_copied(); })
      .def_property_readonly("bytes_total", [](const PyHandle& h) { return h.handle.bytes_total(); });
  py::class_<PyRestoredTensor>(m, "RestoredTensor", py::buffer_protocol())
      .def_readonly("name", &PyRestoredTensor::name)
      .def_readonly("kind", &PyRestoredTensor::kind)
      .def_readonly("dtype", &PyRestoredTensor::dtype)
      .def_readonly("shape", &PyRestoredTensor::shape)
      .def_property_readonly("nbytes", [](const PyRestoredTensor& t) { return t.bytes; })
      .def_buffer([](PyRestoredTensor& t) {
        return py::buffer_info(const_cast<uint8_t*>(t.data), 1, py::format_descriptor<uint8_t>::format(),
                               1, {static_cast<py::ssize_t>(t.bytes)}, {1}, /*readonly=*/false);
      });
  py::class_<PyClient>(m, "Client")
      .def(py::init<const std::string&, const std::string&, uint32_t, std::vector<uint32_t>,
                    const std::string&, int>(),
           py::arg("address"), py::arg("job"), py::arg("rank"), py::arg("local_ranks"),
           py::arg("transport") = "auto", py::arg("copy_threads") = 2)
      .def("snapshot", &PyClient::Snapshot, py::arg("step"), py::arg("tensors"),
           py::arg("keep_alive"))
      .def("prepare", &PyClient::Prepare, py::arg("tensors"))
      .def("list_restorable", &PyClient::ListRestorable)
      .def("restore", &PyClient::Restore, py::arg("step") = 0)
      .def("restore_into", &PyClient::RestoreInto, py::arg("step"), py::arg("into"))
      .def_property_readonly("shared_memory", &PyClient::shared_memory);
}
