"""Generates C++ protobuf and gRPC code with Debian's protoc and grpc_cpp_plugin."""

def cc_grpc_proto_library(name, srcs, deps = [], grpc = True, visibility = None):
    """Declares `name`: a cc_library of the messages (and services) in `srcs`.

    Args:
      name: the cc_library's name.
      srcs: .proto files in this package.
      deps: other cc_grpc_proto_library targets whose protos `srcs` import.
      grpc: also generate service stubs (.grpc.pb.*).
      visibility: of the cc_library.
    """
    bases = [s[:-len(".proto")] for s in srcs]
    outs = [b + ".pb.h" for b in bases] + [b + ".pb.cc" for b in bases]
    if grpc:
        outs += [b + ".grpc.pb.h" for b in bases] + [b + ".grpc.pb.cc" for b in bases]
    plugin = ""
    if grpc:
        plugin = ("--plugin=protoc-gen-grpc=/usr/bin/grpc_cpp_plugin " +
                  "--grpc_out=$(GENDIR) ")
    dep_srcs = [d + "_srcs" for d in deps]
    native.filegroup(
        name = name + "_srcs",
        srcs = srcs + dep_srcs,
        visibility = visibility,
    )
    native.genrule(
        name = name + "_gen",
        srcs = srcs + dep_srcs,
        outs = outs,
        cmd = ("/usr/bin/protoc -I. --cpp_out=$(GENDIR) " + plugin +
               " ".join(["$(location %s)" % s for s in srcs])),
    )
    native.cc_library(
        name = name,
        srcs = [o for o in outs if o.endswith(".cc")],
        hdrs = [o for o in outs if o.endswith(".h")],
        deps = deps + ["//third_party/system:grpc", "//third_party/system:protobuf"],
        visibility = visibility,
    )
