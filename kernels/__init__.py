"""Token permutation and grouped expert GEMM ops (installed as `lightning_mpipemoe.kernels`).

`permute`, `unpermute` and `grouped_mm` are what the executor calls. They are
`torch.library` custom ops (namespace `mpipemoe`) with fake kernels and autograd, dispatched
by device: CPU tensors take `CpuBackend` (the pure-PyTorch reference's formulas without its
extra copies, bit-identical to it up to the sign of zeros), CUDA tensors the Triton kernels
(and, for the grouped GEMM, torch's `grouped_mm` where it measures faster). Triton is only
imported when a CUDA tensor first reaches an op.
"""

# The repository root on sys.path makes this folder importable as a top-level `kernels` too
# (transformers probes for Hugging Face's `kernels` package so, by importing it). Under any name
# but its own this module defines nothing: a second copy would register the custom ops again,
# over the first, with its own backend table, and importing the real package from here would
# close an import cycle through transformers.
if __name__ == "lightning_mpipemoe.kernels":
    from .backends import CpuBackend, KernelBackend, ReferenceBackend, backend_for, set_backend, use_backend
    from .index import PaddedSegments, invert_src_rows, pad_segments, segment_counts
    from .ops import grouped_mm, permute, unpermute
    from .reference import (
        grouped_mm_reference,
        grouped_mm_weight_grad_reference,
        permute_backward_reference,
        permute_reference,
        unpermute_backward_reference,
        unpermute_reference,
    )

    __all__ = [
        "CpuBackend",
        "KernelBackend",
        "PaddedSegments",
        "ReferenceBackend",
        "backend_for",
        "grouped_mm",
        "grouped_mm_reference",
        "grouped_mm_weight_grad_reference",
        "invert_src_rows",
        "pad_segments",
        "permute",
        "permute_backward_reference",
        "permute_reference",
        "segment_counts",
        "set_backend",
        "unpermute",
        "unpermute_backward_reference",
        "unpermute_reference",
        "use_backend",
    ]
