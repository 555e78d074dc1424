"""Opt-in, best-effort batch-invariant CPU numerics (``models.diffusion.batch_invariant: true``).

Off by default: the pipeline does not promise that a sample's bytes are the same at every batch
size (the batch size is in generate's key instead; README, "Reproducibility"). This mode tries
to make them so on the CPU, and is kept for experiments that compare batch sizes byte for byte.

On the CPU, PyTorch picks kernels by shape: oneDNN convolutions use another algorithm for a
batch of one, NNPACK takes over from 16 images, MKL's GEMM takes another path for fewer than
about 12 rows (and, for some narrow outputs, depends on a row's position in the block), and
GroupNorm/convolution follow the input's memory layout (a batch of one is "channels-last" by
accident after some reshapes). Each choice changes float rounding, so the same seed would give
slightly different pixels at batch 1 and batch 4.

:func:`batch_invariant` removes those choices while it is active: NNPACK off; matrix products
(also 1x1 convolutions and linear layers on broadcast weights) padded to at least ``MIN_ROWS``
rows and a multiple of ``COL_MULTIPLE`` columns, so each output element comes out of the same
MKL kernel whatever the batch; convolutions of one image run as two (the second all zeros;
oneDNN gives the same per-image result from two images on); contiguous inputs for convolution,
GroupNorm and attention. It works at the ATen level (``TorchDispatchMode``), so the backward pass
of the decode-with-gradient step is covered too.

Best effort, measured on one machine's kernels only: the padding sizes below are measured
properties of one build (MKL 2024.2, oneDNN 3.12) on one CPU, not promises of the libraries. On
an Intel AVX-512 CPU, and under ``MKL_ENABLE_INSTRUCTIONS=AVX2`` / ``ONEDNN_MAX_CPU_ISA=AVX2``
there, other kernels are chosen by shape and some samples differ by a few float roundings
(issue 15); what the tests check is that the mode keeps samples within float tolerance. On
CUDA it is not applied (cuBLAS/cuDNN choose kernels by shape). It costs speed: every small
matrix product is padded to ``MIN_ROWS`` rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# MKL's GEMM gave row results independent of the row count from 12 rows on (measured with
# MKL 2024.2 on one CPU); 16 leaves a margin
MIN_ROWS = 16
# ... and for some narrow outputs (5 columns: 5 ID classes) on the row's position in the block
COL_MULTIPLE = 16


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


def _gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``bias + a @ b`` with at least ``MIN_ROWS`` rows and a multiple of ``COL_MULTIPLE`` columns:
    MKL then computes each output element the same way whatever the other rows are."""
    m, n = a.shape[0], b.shape[1]
    a, _ = _pad_rows(a, 0)
    b = b.contiguous()
    extra = -n % COL_MULTIPLE
    if extra:
        b = torch.cat([b, b.new_zeros((b.shape[0], extra))], 1)
    y = torch.mm(a, b)[:m, :n]
    return y + bias if bias is not None else y


def _pad_batch(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    x = x.contiguous()
    return torch.cat([x, torch.zeros_like(x)]), 1


def _pointwise(weight, _bias_or_sizes, stride, padding, dilation, transposed, output_padding, groups, *_rest) -> bool:
    """A 1x1 convolution that is a plain matrix product over pixels."""
    return (weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1) and not transposed and groups == 1
            and all(v == 1 for v in stride) and all(v == 0 for v in padding))


def _conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # oneDNN blocks a 1x1 convolution by the batch's pixel count; a padded GEMM over pixels does not
    n, c, h, w = x.shape
    y = _gemm(x.permute(0, 2, 3, 1).reshape(n * h * w, c), weight.reshape(weight.shape[0], c).t(), bias)
    return y.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous()


def _conv1x1_grad_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, o, h, w = grad.shape
    gx = _gemm(grad.permute(0, 2, 3, 1).reshape(n * h * w, o), weight.reshape(o, -1))
    return gx.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous()


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
            return _gemm(args[0], args[1])
        if op is aten.addmm and not kwargs and len(args) == 3:
            return _gemm(args[1], args[2], args[0])
        if op is aten.bmm:
            a, b = args
            if b.stride(0) == 0:
                # a linear layer on a non-contiguous input (nn.MultiheadAttention with batch_first)
                # arrives as a batched product with a broadcast weight: compute it as the one matrix
                # product a contiguous input (e.g. a batch of one) would get
                return _gemm(a.reshape(-1, a.shape[-1]), b[0]).reshape(a.shape[0], a.shape[1], b.shape[-1])
            a, m = _pad_rows(a, 1)
            return func(a, _contig(b))[:, :m]
        if op is aten.convolution and _pointwise(*args[1:]):
            return _conv1x1(*args[:3])
        if op is aten.convolution_backward and _pointwise(*args[2:]) and not any(args[10][1:]):
            return _conv1x1_grad_input(args[0], args[2]), None, None
        if op is aten.convolution and args[0].shape[0] == 1:
            # oneDNN runs a batch of one with another algorithm than two or more images
            x, _ = _pad_batch(args[0])
            return func(x, *(_contig(a) for a in args[1:]), **kwargs)[:1]
        if op is aten.convolution_backward and args[0].shape[0] == 1:
            grad, _ = _pad_batch(args[0])
            x, _ = _pad_batch(args[1])
            out = func(grad, x, *(_contig(a) for a in args[2:]), **kwargs)
            return (out[0][:1] if out[0] is not None else None, *out[1:])
        if op in _CONTIGUOUS_OPS:
            return func(*(_contig(a) for a in args), **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """CPU kernels whose per-sample results do not depend on the batch size (see the module doc)."""
    if not enabled:
        yield
        return
    with torch.backends.nnpack.flags(enabled=False), _BatchInvariantMode():
        yield
