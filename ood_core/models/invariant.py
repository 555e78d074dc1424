"""Batch-invariant CPU numerics: a sample's result does not depend on the batch it ran in.

On the CPU, PyTorch picks kernels by shape: oneDNN convolutions use another algorithm for a
batch of one, NNPACK takes over from 16 images, MKL's GEMM takes another path for fewer than
about 12 rows, and GroupNorm/convolution follow the input's memory layout (a batch of one is
"channels-last" by accident after some reshapes). Each choice changes float rounding, so the same
seed would give slightly different pixels at batch 1 and batch 4.

:func:`batch_invariant` removes those choices while it is active: oneDNN and NNPACK off (the
native convolution runs image by image), matrix products padded to at least ``MIN_ROWS`` rows
(their rows then come out of the same MKL kernel whatever the batch), and contiguous inputs for
convolution, GroupNorm and attention. It works at the ATen level (``TorchDispatchMode``), so the
backward pass of the decode-with-gradient step is covered too. On CUDA no such guarantee exists
(cuBLAS/cuDNN choose kernels by shape); there samples agree within float tolerance only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# MKL's GEMM gives row results independent of the row count from 12 rows on (measured with
# MKL 2024.2 on AVX-512); 16 leaves a margin. tests/test_batching.py checks the whole sampler.
MIN_ROWS = 16


def _contig(a):
    return a.contiguous() if isinstance(a, torch.Tensor) else a


def _pad_rows(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    x = x.contiguous()
    m = x.shape[dim]
    if m < MIN_ROWS:
        shape = list(x.shape)
        shape[dim] = MIN_ROWS - m
        x = torch.cat([x, x.new_zeros(shape)], dim)
    return x, m


_CONTIGUOUS_OPS = {
    aten.convolution,
    aten.convolution_backward,
    aten.native_group_norm,
    aten.native_group_norm_backward,
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward,
}


class _BatchInvariantMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = func.overloadpacket
        if op is aten.mm:
            a, m = _pad_rows(args[0], 0)
            return func(a, _contig(args[1]))[:m]
        if op is aten.addmm:
            bias, a, b = args[:3]
            a, m = _pad_rows(a, 0)
            if bias.dim() == 2 and bias.shape[0] == m and m < MIN_ROWS:
                bias, _ = _pad_rows(bias, 0)
            return func(bias, a, _contig(b), *args[3:], **kwargs)[:m]
        if op is aten.bmm:
            a, m = _pad_rows(args[0], 1)
            return func(a, _contig(args[1]))[:, :m]
        if op in _CONTIGUOUS_OPS:
            return func(*(_contig(a) for a in args), **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """CPU kernels whose per-sample results do not depend on the batch size (see the module doc)."""
    if not enabled:
        yield
        return
    # toggled directly: torch.backends.mkldnn.flags() also resets TF32 settings and warns about them
    mkldnn = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        with torch.backends.nnpack.flags(enabled=False), _BatchInvariantMode():
            yield
    finally:
        torch._C._set_mkldnn_enabled(mkldnn)
