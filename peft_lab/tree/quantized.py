"""`Quantized`: a tensor stored as per-channel symmetric int8 or int4 codes with float32 scales.

Round-to-nearest, symmetric, one scale per channel (dim 0; a tensor of dim <= 1 is one channel):

    s_c = max_i |x[c, i]| / q_max        q_max = 2**(bits-1) - 1   (127 for int8, 7 for int4)
    q   = clamp(round(x / s_c), -q_max, q_max)        x_hat = q * s_c

Error bound (per element, up to float32 rounding of the division and product):
    |x - x_hat| <= s_c / 2 = max|x_c| / (2 q_max)      i.e. max|x_c|/254 (int8), max|x_c|/14 (int4).

Symmetric codes keep an exact zero: a channel (or entry) that did not change stays exactly zero. int4 codes
are offset by 8 (codes 1..15) and packed two per byte, the first element of each pair in the low nibble,
over the flattened tensor (one padding nibble when the element count is odd).

Size: numel·bits/8 (+1 padding byte at most) + 4·channels bytes. Against a 16-bit copy that is a ratio of
2n/(n + 4) for int8 and 2n/(n/2 + 4) for int4, with n elements per channel: at least 1.8x for int8 once
n >= 36 and at least 3.2x for int4 once n >= 32. (A 3x3 conv with one input channel, n = 9, gains only 1.4x
and 2.1x: the scales dominate there.)

The leaf goes through disk like the other structured leaves: factors `q` (int8, the tensor's shape; or
uint8 packed) and `scale` (float32, (channels,)), meta `{shape, bits}`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peft_lab.tree.leaves import LEAF_KINDS, Leaf, _cast

__all__ = ["Quantized", "quantize", "error_bound", "pack_int4", "unpack_int4"]

BITS = (8, 4)


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _channels(shape: Sequence[int]) -> int:
    return int(shape[0]) if len(shape) >= 2 else 1


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes in [-7, 7] (any shape) -> uint8 (ceil(numel/2),), two codes per byte (first in the low nibble)."""
    u = (q.reshape(-1).to(torch.int16) + 8).to(torch.uint8)  # 1..15
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 (ceil(numel/2),) -> int8 codes (numel,) in [-7, 7]."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=1).reshape(-1)[:numel]


class Quantized(Leaf):
    """A per-channel symmetric int8/int4 tensor (see the module docstring for the scheme and its bound).

    Args:
        q: int8 codes with the tensor's shape (bits=8), or uint8 packed codes (ceil(numel/2),) (bits=4).
        scale: float32 (channels,): s_c = max|x_c| / q_max.
        bits: 8 or 4.
        shape: the shape of the tensor it stands for.
        dtype: the dtype `dense(None)` returns (the dtype of the tensor that was quantized).
    """

    kind = "quantized"

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        bits: int,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
    ):
        if bits not in BITS:
            raise ValueError(f"Quantized supports bits in {BITS}, got {bits}")
        self.q, self.scale, self.bits = q, scale, int(bits)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        expect_q = (-(-self.numel // 2),) if bits == 4 else self.shape
        if tuple(q.shape) != expect_q or tuple(scale.shape) != (_channels(self.shape),):
            raise ValueError(
                f"Quantized int{bits} of shape {self.shape} needs codes {expect_q} and scales "
                f"({_channels(self.shape)},), got {tuple(q.shape)} and {tuple(scale.shape)}"
            )

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def codes(self) -> torch.Tensor:
        """int8 codes with the tensor's shape."""
        q = unpack_int4(self.q, self.numel) if self.bits == 4 else self.q
        return q.reshape(self.shape)

    def dense(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        C = _channels(self.shape)
        x = self.codes().reshape(C, -1).float() * self.scale.float().view(C, 1)  # (C, n)
        return _cast(x.reshape(self.shape), dtype if dtype is not None else self.dtype)

    def error_bound(self) -> torch.Tensor:
        """Per-channel bound on |x - dense()| (float32, (channels,)): s_c / 2."""
        return self.scale.float() / 2

    def factors(self) -> dict[str, torch.Tensor]:
        return {"q": self.q, "scale": self.scale}

    def meta(self):
        return {"shape": list(self.shape), "bits": self.bits, "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def _from_factors(cls, factors, meta):
        dtype = getattr(torch, meta.get("dtype", "float32"), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {meta.get('dtype')!r}")
        return cls(factors["q"], factors["scale"], int(meta["bits"]), meta["shape"], dtype)


def quantize(x: torch.Tensor, bits: int) -> Quantized:
    """Per-channel symmetric round-to-nearest quantization of `x` (any shape; channels along dim 0).

    Args:
        x: the tensor, e.g. a weight delta (out, in) or (out, in, kh, kw); must be finite.
        bits: 8 or 4.
    Returns:
        A `Quantized` leaf whose `dense()` is within `error_bound(x, bits)` of `x` element-wise.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize a tensor with NaN or Inf values")
    shape, C, qmax = tuple(x.shape), _channels(x.shape), _qmax(bits)
    xf = x.detach().float().reshape(C, -1)  # (C, n)
    scale = xf.abs().amax(dim=1) / qmax if xf.numel() else torch.zeros(C)  # (C,)
    # all-zero channels keep scale 0 and code 0: divide by 1 there instead of 0
    q = torch.round(xf / torch.where(scale > 0, scale, 1.0).view(C, 1)).clamp_(-qmax, qmax).to(torch.int8)
    codes = pack_int4(q) if bits == 4 else q.reshape(shape)
    return Quantized(codes, scale.contiguous(), bits, shape, x.dtype)


def error_bound(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The scheme's bound on |x - quantize(x, bits).dense()|, broadcast to x's shape (float32)."""
    C = _channels(x.shape)
    s = x.detach().float().reshape(C, -1).abs().amax(dim=1) / _qmax(bits) if x.numel() else torch.zeros(C)
    return (s / 2).view(C, *([1] * max(x.dim() - 1, 0))).expand(x.shape) if x.dim() >= 2 else (s / 2).expand(x.shape)


LEAF_KINDS[Quantized.kind] = Quantized
