"""Exporters: one module per target format.

Each module exports a PyTorch model (or an ONNX file) to its format, loads the
result and runs and times it on its runtime. Exporters know nothing of the
planner or the passes.
"""

from exporters.timing import Latency, TimingProtocol, time_callable

__all__ = ["Latency", "TimingProtocol", "time_callable"]
