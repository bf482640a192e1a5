#!/usr/bin/python3
"""Sorts ThreadSanitizer reports into ecsnap's and gRPC's.

Usage: triage.py REPORT_FILE...   Exit status 1 when any report is ecsnap's.

gRPC and protobuf are Debian's, built without TSan, but their header-only
halves are compiled (instrumented) into ecsnap's objects. Objects gRPC hands
from thread to thread through its uninstrumented queues then look raced
wherever those inline halves touch them. A report is gRPC's when, in every
access it names, a gRPC or protobuf frame (header, generated code or library)
comes before any frame of ecsnap's own sources: the racing code is gRPC's
even if ecsnap called it. Every other report is ecsnap's and fails the run.
"""
import re
import sys

# ecsnap's sources, and the code protoc generates from ecsnap's protos (its
# messages are ecsnap's objects: a race on them is ecsnap's).
OURS = re.compile(r"/proc/self/cwd/(\./)?(daemon|client|common|ec|rdma|tests)/|"
                  r"/proc/self/cwd/(\./)?bazel-out/[^/ ]+/bin/(proto|daemon)/")
# gRPC and protobuf: their headers and their libraries (abseil is not here:
# it is instrumented, and its own hand-offs are in tsan.supp).
THEIRS = re.compile(r"/usr/include/(grpcpp|grpc|google/protobuf)/|"
                    r"\(lib(grpc|grpc\+\+|gpr|upb|address_sorting|protobuf|ssl|crypto)[.\w]*\.so")
ALLOC = re.compile(r"#0 (malloc|calloc|realloc|posix_memalign|aligned_alloc|operator new)\b")
ACCESS = re.compile(r"^  (Previous )?([Aa]tomic )?([Rr]ead|[Ww]rite) of size")


def verdict(block):
  """'ecsnap' or 'grpc' for one report (its lines)."""
  stacks, current = [], None
  for line in block:
    if ACCESS.match(line):
      current = []
      stacks.append(current)
    elif current is not None and re.match(r"^\s+#\d+ ", line):
      current.append(line)
    elif current is not None and not line.strip():
      current = None
  if not stacks:
    return "ecsnap"  # not a race (a deadlock, a signal misuse): always ours to read
  for stack in stacks:
    # An allocation counts as a write to its block. When the block's first
    # real writes are in uninstrumented code (a gRPC object made inside a
    # gRPC call ecsnap made), the allocation is all TSan saw: it says who
    # allocated, not whose code raced.
    if stack and ALLOC.search(stack[0]):
      continue
    for frame in stack:
      if THEIRS.search(frame):
        break
      if OURS.search(frame):
        return "ecsnap"
  return "grpc"


def main(paths):
  counts = {"ecsnap": 0, "grpc": 0}
  for path in paths:
    block = None
    with open(path, errors="replace") as f:
      for line in f:
        if line.startswith("WARNING: ThreadSanitizer:"):
          block = [line]
        elif block is not None:
          block.append(line)
          if line.startswith("SUMMARY: ThreadSanitizer"):
            v = verdict(block)
            counts[v] += 1
            if v == "ecsnap":
              sys.stdout.write(f"--- {path}\n" + "".join(block))
            block = None
  print(f"tsan: {counts['ecsnap']} report(s) in ecsnap's code, "
        f"{counts['grpc']} inside gRPC/protobuf hand-offs (not instrumented; ignored)")
  return 1 if counts["ecsnap"] else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
