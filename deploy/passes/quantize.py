"""Int8 quantization: the recipe, and its simulation in PyTorch.

The int8 rewrite itself is ONNX Runtime's quantization tool, applied to the
exported ONNX file (``exporters.onnx.quantize_onnx``). This module contains the
recipe that travels with each variant and a fake-quantization of one layer,
which the sensitivity analysis uses to estimate what int8 costs that layer
without leaving PyTorch.

This pass is lossy: it does not preserve the computation.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

PRESERVES_COMPUTATION = False
METHODS = ("static", "dynamic")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclasses.dataclass
class QuantizeConfig:
    """The int8 recipe of one variant.

    Attributes:
        method: ``static`` (QDQ, uint8 activations calibrated ahead of time,
            int8 weights) or ``dynamic`` (int8 weights, activations quantized at
            run time; MatMul-type nodes only). Defaults to ``static``.
        layers: PyTorch names of the layers quantized to int8; the others
            stay in float.
        per_channel: one weight scale per output channel. Defaults to True.
        reduce_range: 7-bit weights, for CPUs without VNNI whose u8s8 kernels
            can saturate. Defaults to ``None``, which resolves to True on an
            x86-64 CPU without VNNI or AMX (ONNX Runtime's int16 accumulation
            there overflows with 8-bit weights) and to False elsewhere.
        calibrate_method: ``minmax``, ``entropy`` or ``percentile``.
            Defaults to ``minmax``.
        keep_float: layers that stay in float whatever the plan chooses,
            as PyTorch module names (``classifier.1``) or ONNX node names of
            the fp32 export (``/classifier/classifier.1/Gemm``). The pipeline
            resolves them before any rewrite and rejects unknown names.
            Defaults to none.
    """

    method: str = "static"
    layers: list[str] = dataclasses.field(default_factory=list)
    per_channel: bool = True
    reduce_range: bool | None = None
    calibrate_method: str = "minmax"
    keep_float: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.keep_float, str) or not all(
            isinstance(n, str) and n.strip() for n in self.keep_float
        ):
            raise ValueError(
                f"keep_float {self.keep_float!r} must be a list of layer names, "
                f"such as ['classifier.1']"
            )
        self.keep_float = list(self.keep_float)
        if self.method not in METHODS:
            raise ValueError(f"quantize method {self.method!r} is not one of {METHODS}")
        if self.reduce_range is None:
            # NOTE: this machine's CPU decides, not the target device's.
            self.reduce_range = needs_reduce_range()
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise ValueError(
                f"calibration method {self.calibrate_method!r} is not one of {CALIBRATION_METHODS}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantizeConfig:
        return cls(**data)


X86 = ("x86_64", "amd64", "i386", "i686")
# CPU flags of x86 instructions that multiply u8 by s8 into int32 without the
# int16 intermediate that saturates (AVX-VNNI, AVX512-VNNI, AMX-INT8).
INT8_DOT_FLAGS = ("avx_vnni", "avx512_vnni", "avx512vnni", "amx_int8")


def needs_reduce_range(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Return whether int8 weights should use 7 bits on this CPU.

    On x86-64 without VNNI, ONNX Runtime's u8s8 kernels add pairs of u8 x s8
    products in int16 (``vpmaddubsw``), which saturates with full-range
    weights and corrupts the result. True there, False on other CPUs.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo``; read from this machine when
            ``None``. Unreadable counts as no VNNI.
        machine: ``platform.machine()``; this machine's when ``None``.
    """
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in X86:
        return False
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as handle:
                cpuinfo = handle.read()
        except OSError:
            cpuinfo = ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return not flags & set(INT8_DOT_FLAGS)


def _quantize_weight(weight: torch.Tensor, per_channel: bool, levels: int = 127) -> torch.Tensor:
    # Symmetric int8 in [-levels, levels], as ONNX Runtime's QInt8 weights
    # (127, or 64 with reduce_range).
    dims = tuple(range(1, weight.dim()))
    if per_channel:
        scale = weight.abs().amax(dim=dims, keepdim=True) / levels
    else:
        scale = weight.abs().max() / levels
    scale = scale.clamp(min=1e-12)
    return (weight / scale).round().clamp(-levels, levels) * scale


def _quantize_activation(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    # Asymmetric uint8 over [min(low, 0), max(high, 0)], as ONNX Runtime's QUInt8 activations.
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / 255.0, 1e-12)
    zero_point = round(-low / scale)
    q = (x / scale + zero_point).round().clamp(0, 255)
    return (q - zero_point) * scale


def fake_quantize_layer(
    model: nn.Module,
    name: str,
    calibration_inputs: tuple[torch.Tensor, ...],
    *,
    per_channel: bool = True,
    quantize_input: bool = True,
    reduce_range: bool = False,
) -> nn.Module:
    """Return a copy of ``model`` whose layer ``name`` computes as int8 would.

    The weight is rounded to int8 (7 bits with ``reduce_range``) and, when
    ``quantize_input``, the layer's input to uint8 with a range calibrated
    (min/max) on ``calibration_inputs``.
    """
    result = copy.deepcopy(model).eval()
    layer = result.get_submodule(name)
    bounds = [float("inf"), float("-inf")]

    def observe(_module, args):
        bounds[0] = min(bounds[0], float(args[0].min()))
        bounds[1] = max(bounds[1], float(args[0].max()))

    if quantize_input:
        handle = layer.register_forward_pre_hook(observe)
        with torch.no_grad():
            result(*calibration_inputs)
        handle.remove()
        low, high = bounds
        layer.register_forward_pre_hook(
            lambda _m, args: (_quantize_activation(args[0], low, high), *args[1:])
        )
    with torch.no_grad():
        layer.weight.copy_(_quantize_weight(layer.weight, per_channel, 64 if reduce_range else 127))
    return result
