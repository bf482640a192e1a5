"""What a target needs to see CUDA in the --config=cuda build and nothing otherwise."""

def cuda_defines():
    return select({
        "//client/cuda:cuda_enabled": ["ECSNAP_CUDA=1"],
        "//conditions:default": [],
    })

def cuda_deps():
    return select({
        "//client/cuda:cuda_enabled": ["@cuda//:cudart_static"],
        "//conditions:default": [],
    })
