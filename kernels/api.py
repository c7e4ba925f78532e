"""The public face of `lightning_mpipemoe.kernels`: token permutation and grouped expert GEMM ops.

`permute`, `unpermute`, `grouped_mm` and `grouped_mm_weight_grad` are what the executor calls. They are
`torch.library` custom ops (namespace `mpipemoe`) with fake kernels and autograd, dispatched
by device: CPU tensors take `CpuBackend` (the pure-PyTorch reference's formulas without its
extra copies, bit-identical to it up to the sign of zeros), CUDA tensors the Triton kernels
(and, for the grouped GEMM, torch's `grouped_mm` where it measures faster). Triton is only
imported when a CUDA tensor first reaches an op.

The repository's `kernels/` folder has no `__init__.py` on purpose: it installs as the
namespace package `lightning_mpipemoe.kernels`, and a folder without `__init__.py` never wins
over an installed regular package of the same name, so from a clone's root `import kernels`
still finds Hugging Face's `kernels` (which transformers imports). What a package `__init__`
would export lives here instead: `from lightning_mpipemoe.kernels import api as kernels`.
"""

from .backends import CpuBackend, KernelBackend, ReferenceBackend, backend_for, set_backend, use_backend
from .index import PaddedSegments, invert_src_rows, pad_segments, segment_counts
from .ops import grouped_mm, grouped_mm_weight_grad, permute, unpermute
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
    "grouped_mm_weight_grad",
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
