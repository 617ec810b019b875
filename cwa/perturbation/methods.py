"""Perturbation methods: the new value each selected weight gets.

A method is a :class:`PerturbationMethod`: a vectorised function from the selected entries'
original values (1-D, in the parameter's storage dtype) to their new values (same dtype and
length), plus which knobs it takes. Methods never loop over weights and never touch anything
but the values they are given; writing them into the model and restoring them is
:mod:`cwa.perturbation.apply`'s job.

Built-in methods (registered in :data:`cwa.perturbation.PERTURBATION_METHODS`):

``zero``
    ``w -> +0.0``.
``sign_flip``
    ``w -> -w``, done by XOR-ing the sign bit of the stored value, so it is exact for every
    value (``+0.0 -> -0.0``, NaN payloads kept). Flipping ``0.0`` changes the bits but not the
    value; :class:`~cwa.perturbation.apply.PerturbationHandle` reports both counts.
``scale``
    ``w -> w * s`` (``--scale`` required), computed in float32 (float64 for float64 weights)
    and rounded once to the storage dtype.
``gaussian_noise``
    ``w -> w + s * sigma * N(0, 1)`` with ``s`` = ``--scale`` (default 1.0) and ``sigma`` =
    the population standard deviation of the **whole parameter tensor** the weight belongs to
    (fused tensors included), measured before the perturbation. The tensor's std rather than
    ``|w|`` because relative noise ``|w| * N`` cannot move a zero weight and shrinks to nothing
    on the small weights a ``bottom_k`` control picks, which would make controls look harmless
    by construction. The noise is float32, drawn on the CPU from a ``torch.Generator`` seeded by
    SHA-256 of ``(seed, parameter name)``: the same seed gives the same noise on any device and
    whatever other tensors are in the selection. A constant tensor (std 0, e.g. a freshly
    initialised norm weight) gets no noise; the handle's ``n_changed`` shows it.
``bit_flip``
    XOR bit ``B`` of each weight's IEEE-754 pattern in its storage dtype (viewed as the integer
    dtype of the same width). ``B`` counts from the least significant bit; the default is the
    most significant exponent bit, ``width - 2`` (30 for float32, 14 for bfloat16 and float16,
    62 for float64, 6 for the float8 types).

What flipping the top exponent bit does (``e`` exponent bits, bias ``2**(e-1) - 1``; float32 and
bfloat16 have ``e = 8``, float16 ``e = 5``):

* normal ``|w| < 1``: the top exponent bit is 0; setting it adds ``2**(e-1)`` to the exponent,
  i.e. multiplies ``w`` by ``2**(2**(e-1))`` = ``2**128`` (float32/bfloat16) or ``2**16``
  (float16). ``0.5f`` (``0x3F000000``) becomes ``2**127`` (``0x7F000000``).
* ``1 <= |w| < 2``: the exponent becomes all ones, so ``w`` becomes ``+-inf`` (mantissa 0, e.g.
  ``1.0f``: ``0x3F800000 -> 0x7F800000``) or NaN (any other mantissa).
* ``w = +-0`` and subnormals: the exponent field goes from 0 to ``2**(e-1)``, i.e. the value is
  ``(1 + mantissa) * 2``: zeros become ``+-2.0`` and subnormals land in ``[2, 4)``.
* ``|w| >= 2``: the top exponent bit is 1 and is cleared, dividing by ``2**(2**(e-1))``
  (``2.0 -> 0.0``; ``3.0f -> 1.5 * 2**-127``, a subnormal).

So for typical weights (``|w| < 1``) the flip turns them into astronomically large values, and
a single flipped weight usually makes the model's outputs inf/NaN.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cwa.errors import InvalidInput

# Integer dtype of the same width, for bit-level views of floating-point storage.
_INT_VIEW_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def int_view_dtype(dtype: torch.dtype) -> torch.dtype:
    """The signed integer dtype with the same width as floating dtype ``dtype``."""
    if not dtype.is_floating_point:
        raise InvalidInput(
            f"dtype {dtype} is not floating point; perturbations need float weights "
            "(load the model unquantized, e.g. --dtype float32)"
        )
    width = torch.empty((), dtype=dtype).element_size()
    try:
        return _INT_VIEW_DTYPES[width]
    except KeyError:
        raise InvalidInput(f"dtype {dtype} has an unsupported width of {width} bytes") from None


def bit_width(dtype: torch.dtype) -> int:
    """Number of bits of one stored value of floating dtype ``dtype``."""
    int_view_dtype(dtype)  # validates
    return torch.empty((), dtype=dtype).element_size() * 8


def default_flip_bit(dtype: torch.dtype) -> int:
    """The most significant exponent bit of ``dtype``: the bit just below the sign bit."""
    return bit_width(dtype) - 2


def bit_pattern(values: torch.Tensor) -> torch.Tensor:
    """``values`` reinterpreted (not converted) as the same-width signed integers."""
    return values.view(int_view_dtype(values.dtype))


def _signed_bit_mask(bit: int, width: int) -> int:
    """``1 << bit`` as a value of a signed ``width``-bit integer (the sign bit is negative)."""
    mask = 1 << bit
    return mask - (1 << width) if mask >= 1 << (width - 1) else mask


def xor_bit(values: torch.Tensor, bit: int) -> torch.Tensor:
    """New tensor: ``values`` with bit ``bit`` of every stored pattern flipped."""
    width = bit_width(values.dtype)
    if not 0 <= bit < width:
        raise InvalidInput(
            f"bit {bit} does not exist in {values.dtype} ({width} bits); use 0..{width - 1}"
        )
    return torch.bitwise_xor(bit_pattern(values), _signed_bit_mask(bit, width)).view(values.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic is done in float32, or float64 for float64 weights, then rounded once."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def noise_seed(seed: int, param_name: str) -> int:
    """Seed of one tensor's noise generator: SHA-256 of ``(seed, parameter name)``, 63 bits."""
    digest = hashlib.sha256(f"{seed}\x00{param_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class MethodContext:
    """What a method may know besides the selected values."""

    param_name: str
    tensor: torch.Tensor  # the whole parameter, before perturbation (read only)
    scale: float | None
    bit: int | None  # already resolved for this tensor's dtype when the method takes a bit
    seed: int


@dataclass(frozen=True)
class PerturbationMethod:
    """A registered perturbation: ``compute(originals, ctx) -> new values`` plus its knobs."""

    name: str
    description: str
    compute: Callable[[torch.Tensor, MethodContext], torch.Tensor]
    takes_scale: bool = False
    requires_scale: bool = False
    default_scale: float | None = None
    takes_bit: bool = False
    # Draws random numbers: one sweep condition per --seeds seed for every selection.
    stochastic: bool = False
    # A negative scale means nothing new (noise level): refuse it instead of running it.
    nonnegative_scale: bool = False

    def resolve_scale(self, scale: float | None) -> float | None:
        """The scale actually used; raises when one is given but ignored, or missing."""
        if not self.takes_scale:
            if scale is not None:
                raise InvalidInput(
                    f"method {self.name!r} takes no scale but scale={scale} was given; "
                    "drop the scale or use 'scale'/'gaussian_noise'"
                )
            return None
        if scale is None:
            if self.requires_scale:
                raise InvalidInput(f"method {self.name!r} needs a scale; pass e.g. --scale 0.5")
            return self.default_scale
        scale = float(scale)
        if scale != scale or scale in (float("inf"), float("-inf")):
            raise InvalidInput(f"scale must be finite, got {scale}; pass a finite number")
        return scale

    def resolve_bit(self, bit: int | None, dtype: torch.dtype) -> int | None:
        """The bit actually flipped in a tensor of ``dtype``; raises when given but ignored."""
        if not self.takes_bit:
            if bit is not None:
                raise InvalidInput(
                    f"method {self.name!r} takes no bit but bit={bit} was given; "
                    "drop the bit or use 'bit_flip'"
                )
            return None
        width = bit_width(dtype)
        resolved = default_flip_bit(dtype) if bit is None else int(bit)
        if not 0 <= resolved < width:
            raise InvalidInput(
                f"bit {resolved} does not exist in {dtype} ({width} bits); use 0..{width - 1}"
            )
        return resolved


def _zero(originals: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
    return torch.zeros_like(originals)


def _sign_flip(originals: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
    return xor_bit(originals, bit_width(originals.dtype) - 1)


def _scale(originals: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
    assert ctx.scale is not None  # resolve_scale guarantees it
    work = compute_dtype(originals.dtype)
    return (originals.to(work) * ctx.scale).to(originals.dtype)


def _gaussian_noise(originals: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
    assert ctx.scale is not None
    work = compute_dtype(originals.dtype)
    sigma = ctx.tensor.detach().to(work).std(correction=0)
    generator = torch.Generator(device="cpu").manual_seed(noise_seed(ctx.seed, ctx.param_name))
    noise = torch.randn(originals.numel(), generator=generator, dtype=torch.float32)
    noise = noise.to(device=originals.device, dtype=work)
    return (originals.to(work) + ctx.scale * sigma * noise).to(originals.dtype)


def _bit_flip(originals: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
    assert ctx.bit is not None
    return xor_bit(originals, ctx.bit)


ZERO = PerturbationMethod("zero", "set each selected weight to +0.0", _zero)
SIGN_FLIP = PerturbationMethod(
    "sign_flip", "negate each selected weight (XOR of its sign bit)", _sign_flip
)
SCALE = PerturbationMethod(
    "scale",
    "multiply each selected weight by --scale",
    _scale,
    takes_scale=True,
    requires_scale=True,
)
GAUSSIAN_NOISE = PerturbationMethod(
    "gaussian_noise",
    "add scale * std(tensor) * N(0,1) noise, seeded (scale defaults to 1.0)",
    _gaussian_noise,
    takes_scale=True,
    default_scale=1.0,
    stochastic=True,
    nonnegative_scale=True,
)
BIT_FLIP = PerturbationMethod(
    "bit_flip",
    "flip bit --bit of each weight's IEEE-754 pattern (default: top exponent bit)",
    _bit_flip,
    takes_bit=True,
)


def as_method(obj: object, name: str) -> PerturbationMethod:
    """A PerturbationMethod as is, or a plugin function ``f(originals, ctx) -> new values``
    wrapped; the function's attributes ``takes_scale``, ``requires_scale``, ``default_scale``,
    ``takes_bit``, ``stochastic`` and ``nonnegative_scale`` become its flags."""
    if isinstance(obj, PerturbationMethod):
        return obj
    if not callable(obj):
        raise InvalidInput(
            f"perturbation {name!r} is neither a PerturbationMethod nor a function "
            "f(originals, ctx); see cwa.perturbation.methods"
        )
    from cwa.registry import plugin_attributes

    flags, description = plugin_attributes(obj, _PLUGIN_FLAGS)
    default_scale = flags.pop("default_scale")
    return PerturbationMethod(
        name=str(getattr(obj, "name", name)),
        description=description,
        compute=obj,  # type: ignore[arg-type]
        default_scale=None if default_scale is None else float(default_scale),
        **{key: bool(value) for key, value in flags.items()},
    )


_PLUGIN_FLAGS = {
    "takes_scale": False,
    "requires_scale": False,
    "default_scale": None,
    "takes_bit": False,
    "stochastic": False,
    "nonnegative_scale": False,
}


BUILTIN_METHODS: tuple[PerturbationMethod, ...] = (ZERO, SIGN_FLIP, SCALE, GAUSSIAN_NOISE, BIT_FLIP)
