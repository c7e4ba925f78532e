"""Token permutation and grouped expert GEMM ops (installed as `lightning_mpipemoe.kernels`).

`permute`, `unpermute` and `grouped_mm` are what the executor calls. CPU tensors take the
pure-PyTorch reference; CUDA tensors take the Triton kernels (or `grouped_mm`) once they
are registered.
"""

from .reference import grouped_mm_reference, permute_reference, unpermute_reference

permute = permute_reference
unpermute = unpermute_reference
grouped_mm = grouped_mm_reference

__all__ = [
    "grouped_mm",
    "grouped_mm_reference",
    "permute",
    "permute_reference",
    "unpermute",
    "unpermute_reference",
]
