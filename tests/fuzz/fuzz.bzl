"""One fuzz target, two builds.

ecsnap_fuzzer(name, deps) makes:
  name               a libFuzzer binary under --config=fuzz (clang, ASan);
                     in the default build, a replayer of the files it is given
  name_corpus_test   the seed corpus corpus/<name>/ replayed through the
                     target in the default build: every seed stays a test
"""

def ecsnap_fuzzer(name, deps):
    native.cc_binary(
        name = name,
        testonly = True,
        srcs = [name + ".cc"],
        linkopts = select({
            "//tests/fuzz:fuzzing": ["-fsanitize=fuzzer,address"],
            "//conditions:default": [],
        }),
        deps = deps + select({
            "//tests/fuzz:fuzzing": [],
            "//conditions:default": ["//tests/fuzz:replay_main"],
        }),
    )
    native.cc_test(
        name = name + "_corpus_test",
        size = "small",
        srcs = [name + ".cc"],
        args = ["tests/fuzz/corpus/" + name],
        data = native.glob(["corpus/" + name + "/*"]),
        deps = deps + ["//tests/fuzz:replay_main"],
    )
