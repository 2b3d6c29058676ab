"""TensorRT engines for NVIDIA targets: build from ONNX, load, run and time.

TensorRT needs an NVIDIA GPU and the ``tensorrt`` package. Without them every
entry point raises ``TensorRTUnavailable`` saying which of the two is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from exporters.timing import Latency, TimingProtocol


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing on this machine."""


def require_tensorrt():
    """Return the ``tensorrt`` module, or raise TensorRTUnavailable naming what is missing."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "TensorRT needs an NVIDIA GPU with CUDA, and torch.cuda.is_available() is False "
            "here; use an ONNX Runtime device profile on this machine"
        )
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "the tensorrt package is not installed; install it with "
            "'pip install tensorrt' on the machine with the GPU"
        ) from exc
    return tensorrt


def engine_from_onnx(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    precision: str = "fp16",
    min_shapes: dict[str, tuple[int, ...]],
    opt_shapes: dict[str, tuple[int, ...]],
    max_shapes: dict[str, tuple[int, ...]],
    workspace_bytes: int = 1 << 30,
) -> Path:
    """Build a serialized TensorRT engine from an ONNX file.

    Args:
        onnx_path: the ONNX file; for ``int8`` it must carry QDQ nodes, whose
            scales TensorRT uses instead of its own calibration.
        engine_path: output ``.engine`` file.
        precision: ``fp32``, ``fp16`` or ``int8``. Defaults to ``fp16``.
        min_shapes, opt_shapes, max_shapes: the optimization profile, one
            shape per dynamic input.
        workspace_bytes: builder workspace limit. Defaults to 1 GiB.
    """
    trt = require_tensorrt()
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision {precision!r} is not one of 'fp32', 'fp16', 'int8'")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name in min_shapes:
        profile.set_shape(name, min_shapes[name], opt_shapes[name], max_shapes[name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path = Path(engine_path)
    tmp = engine_path.with_suffix(engine_path.suffix + ".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine_path)
    return engine_path


class TensorRTRunner:
    """Runs a serialized engine on the GPU with torch tensors as buffers; times with CUDA events."""

    def __init__(self, engine_path: str | os.PathLike):
        trt = require_tensorrt()
        import torch

        self._torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load the engine {engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def _bind(self, feeds: dict[str, np.ndarray]):
        torch = self._torch
        outputs = {}
        for name in self.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            feeds[name] = tensor
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        outputs = self._bind(dict(feeds))
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return [outputs[n].cpu().numpy() for n in self.output_names]

    def time(self, feeds: dict[str, np.ndarray], protocol: TimingProtocol) -> Latency:
        torch = self._torch
        self._bind(dict(feeds))
        stream = torch.cuda.current_stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        cold_ms = 0.0
        for i in range(protocol.warmup + protocol.runs):
            start.record(stream)
            self.context.execute_async_v3(stream.cuda_stream)
            end.record(stream)
            end.synchronize()
            if i == 0:
                cold_ms = start.elapsed_time(end)
            if i >= protocol.warmup:
                samples.append(start.elapsed_time(end))
        return Latency(
            p50=float(np.percentile(samples, 50)),
            p90=float(np.percentile(samples, 90)),
            runs=protocol.runs,
            cold_ms=cold_ms,
        )
