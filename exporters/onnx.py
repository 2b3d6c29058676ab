"""ONNX export, ONNX Runtime quantization, loading, running and timing.

The exporter is PyTorch's TorchScript-based ``torch.onnx.export``: its node
names carry the module path (``/features/features.3/Conv``), which is how deploy
maps a PyTorch layer to the ONNX nodes it became.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from exporters.timing import Latency, TimingProtocol, time_callable

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17


class ExportError(Exception):
    """Export, checking or running an ONNX file failed; the message names the cause."""


def _temporary_path(final: Path) -> Path:
    # Same folder as the destination, so that os.replace is an atomic rename.
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    return Path(name)


def onnx_from_torch(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int | None = None,
    simplify: bool = True,
) -> Path:
    """Export ``model`` to an ONNX file, check it and simplify it.

    The file appears at ``path`` only once it is complete and has passed the ONNX
    checker; a failure leaves nothing behind.

    Args:
        model: the module to export, in eval mode.
        example_inputs: one tensor per model input.
        path: destination ``.onnx`` file.
        input_names: graph input names, one per tensor in ``example_inputs``.
        output_names: graph output names.
        dynamic_axes: for each input or output name, the axes that stay dynamic.
        opset: ONNX opset. Defaults to 17.
        simplify: run onnxslim over the graph (constant folding, fusion).
            Defaults to True.

    Raises:
        ExportError: the exporter, the checker or the simplifier failed.
    """
    path = Path(path)
    tmp = _temporary_path(path)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                tuple(example_inputs),
                str(tmp),
                dynamo=False,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=opset or DEFAULT_OPSET,
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto, full_check=True)
        if simplify:
            proto = _simplify(proto)
            onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as exc:  # the exporter raises many unrelated types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{type(exc).__name__}: {first_line}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    with contextlib.redirect_stdout(io.StringIO()):
        return onnxslim.slim(proto)


def check_onnx(path: str | os.PathLike) -> None:
    """Run the ONNX checker (with shape inference) over a file; raise ExportError on failure."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"ONNX checker rejected {path}: {exc}") from exc


def nodes_of_module(proto: onnx.ModelProto, module_name: str, op_types: Iterable[str]) -> list[str]:
    """Return the names of the nodes of ``op_types`` that module ``module_name`` exported to.

    The TorchScript exporter names a node by its module scope, one path
    component per called module. A component is either the full dotted module
    name (children of an ``nn.Sequential``: module ``blocks.0.fc`` gives
    ``/blocks/blocks.0/blocks.0.fc/MatMul``) or the name relative to the
    module above (``encoder.layer.0.query`` gives
    ``/encoder/layer.0/query/MatMul``); both are read here.
    """
    wanted = set(op_types)
    names = []
    for node in proto.graph.node:
        if node.op_type not in wanted:
            continue
        if module_name in _scope_paths(node.name.split("/")[1:-1]):
            names.append(node.name)
    return names


def _scope_paths(components: list[str]) -> set[str]:
    # The full module name at each nesting level of one node's scope.
    paths, path = set(), ""
    for component in components:
        path = component if not path or component.startswith(path + ".") else f"{path}.{component}"
        paths.add(path)
    return paths


class CalibrationFeeds:
    """An ONNX Runtime calibration data reader over a list of feed dicts."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self._feeds = list(feeds)
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= len(self._feeds):
            return None
        self._index += 1
        return self._feeds[self._index - 1]

    def rewind(self) -> None:
        self._index = 0


def quantize_onnx(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    method: str = "static",
    calibration_feeds: Sequence[dict[str, np.ndarray]] | None = None,
    nodes_to_exclude: Sequence[str] = (),
    per_channel: bool = True,
    reduce_range: bool = False,
    op_types: Sequence[str] | None = None,
    calibrate_method: str = "minmax",
) -> Path:
    """Quantize an ONNX file to int8 with ONNX Runtime's quantization tool.

    ``static`` writes QDQ nodes with uint8 activations and int8 weights,
    calibrated on ``calibration_feeds``; ``dynamic`` quantizes weights ahead of
    time and activations at run time (MatMul, Gemm and friends only).
    The result appears at ``destination`` only once complete.

    Args:
        source: float ONNX file.
        destination: output ONNX file.
        method: ``static`` or ``dynamic``. Defaults to ``static``.
        calibration_feeds: input feeds for static calibration; required for
            ``static``.
        nodes_to_exclude: ONNX node names that stay in float.
        per_channel: one weight scale per output channel. Defaults to True.
        reduce_range: 7-bit weights, which avoid int16 saturation in the u8s8
            kernels of CPUs without VNNI. Defaults to False.
        op_types: node types to quantize, or ``None`` for the tool's default.
        calibrate_method: ``minmax``, ``entropy`` or ``percentile``.
            Defaults to ``minmax``.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    destination = Path(destination)
    excluded = list(nodes_to_exclude)
    if method == "dynamic":
        # The dynamic quantizer first rewrites each Gemm into MatMul + Add, named
        # "<gemm>_MatMul" and "<gemm>_Add", and only then reads nodes_to_exclude.
        excluded += [f"{name}_MatMul" for name in nodes_to_exclude if name.endswith("Gemm")]
    if method not in ("static", "dynamic"):
        raise ValueError(f"quantization method {method!r} is not one of 'static', 'dynamic'")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if calibrate_method not in methods:
        raise ValueError(f"calibration method {calibrate_method!r} is not one of {sorted(methods)}")
    tmp = _temporary_path(destination)
    prepared = _temporary_path(destination)
    try:
        with warnings.catch_warnings(), _quiet_onnxruntime_logs():
            warnings.simplefilter("ignore")
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            if method == "static":
                if not calibration_feeds:
                    raise ValueError("static quantization needs calibration feeds")
                quantize_static(
                    str(prepared),
                    str(tmp),
                    CalibrationFeeds(calibration_feeds),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(op_types) if op_types else None,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                    calibrate_method=methods[calibrate_method],
                )
            else:
                quantize_dynamic(
                    str(prepared),
                    str(tmp),
                    op_types_to_quantize=list(op_types) if op_types else None,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                )
        check_onnx(tmp)
        quantized = quantized_nodes(onnx.load(str(tmp)), nodes_to_exclude)
        if quantized:
            raise ExportError(
                f"the quantizer rewrote {quantized[0]!r} to int8 although it was excluded; "
                f"the layer would not stay in float"
            )
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)
    return destination


INTEGER_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm")


def quantized_nodes(proto: onnx.ModelProto, names: Iterable[str]) -> list[str]:
    """Return the nodes of a quantized graph, derived from ``names``, that compute in int8.

    A node derives from a name when it has that name or the name plus a
    suffix the quantizer appends (``/fc/Gemm_MatMul``). It computes in int8
    when it is an integer op or its weight input comes from a DequantizeLinear.
    """
    producers = {out: node for node in proto.graph.node for out in node.output}
    found = []
    for name in names:
        for node in proto.graph.node:
            if node.name != name and not node.name.startswith(f"{name}_"):
                continue
            weight = producers.get(node.input[1]) if len(node.input) > 1 else None
            dequantized = weight is not None and weight.op_type == "DequantizeLinear"
            if node.op_type in INTEGER_OPS or (
                node.op_type in ("Conv", "Gemm", "MatMul") and dequantized
            ):
                found.append(node.name)
    return found


# Activation operators that ONNX Runtime's QDQ fusion allows between a layer
# and the QuantizeLinear of its output.
_FUSED_ACTIVATIONS = ("Relu", "Clip")


def _single_consumers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    # Tensor name -> its consumer, for tensors with exactly one consumer and not a graph output.
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in proto.graph.output}
    return {t: c[0] for t, c in consumers.items() if len(c) == 1 and t not in outputs}


def _through_activations(
    node: onnx.NodeProto, single: dict
) -> tuple[onnx.NodeProto | None, str | None]:
    # The node that node's output reaches through a chain of single-consumer
    # Relu or Clip nodes, and the tensor it reads. (None, None) where the
    # chain branches or ends.
    current = node
    while current.output and current.output[0] in single:
        consumer = single[current.output[0]]
        if consumer.op_type not in _FUSED_ACTIVATIONS:
            return consumer, current.output[0]
        current = consumer
    return None, None


def layer_neighbours(
    proto: onnx.ModelProto, layer_nodes: dict[str, str]
) -> dict[str, tuple[str | None, str | None]]:
    """Return, per layer, the layers directly before and after it in a float graph.

    ``layer_nodes`` maps each layer to its one Conv or Gemm node. Layer B
    directly follows layer A when A's output reaches B's first input through
    single-consumer Relu or Clip nodes only: no residual add, no branch.
    A layer without such a neighbour gets None on that side.
    """
    single = _single_consumers(proto)
    by_node = {node: layer for layer, node in layer_nodes.items()}
    nodes = {n.name: n for n in proto.graph.node}
    after: dict[str, str | None] = dict.fromkeys(layer_nodes)
    for layer, name in layer_nodes.items():
        if name not in nodes:
            continue
        reached, tensor = _through_activations(nodes[name], single)
        if reached is not None and reached.input and reached.input[0] == tensor:
            after[layer] = by_node.get(reached.name)
    before: dict[str, str | None] = dict.fromkeys(layer_nodes)
    for layer, following in after.items():
        if following is not None:
            before[following] = layer
    return {layer: (before[layer], after[layer]) for layer in layer_nodes}


def float_region_nodes(
    proto: onnx.ModelProto, int8_nodes: Iterable[str], layer_ops: Iterable[str]
) -> list[str]:
    """Return the nodes other than layers that touch float layers, which a QDQ quantizer should skip.

    A node whose operator is not in ``layer_ops`` (an Add, a pool, a
    reshape) walks back through its inputs and forward through its outputs,
    past other such nodes, to the layer nodes it reaches. It is part of an
    int8 region only when all of those are in ``int8_nodes``, or when it is
    the Relu or Clip of an int8 layer. The graph's inputs and outputs count
    as float. ONNX Runtime's static quantizer otherwise quantizes
    every residual Add of a model with one int8 layer: 9 QLinearAdds and 15
    QuantizeLinear and DequantizeLinear pairs in an EfficientNet-Lite0
    variant whose only int8 layer was its classifier.
    """
    int8 = set(int8_nodes)
    ops = set(layer_ops)
    producers = {out: node for node in proto.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {t.name for t in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}

    def neighbours(node: onnx.NodeProto, upstream: bool) -> list[onnx.NodeProto | None]:
        # The nodes on one side of ``node``; None stands for a graph input or output.
        found: list[onnx.NodeProto | None] = []
        tensors = node.input if upstream else node.output
        for tensor in tensors:
            if not tensor or tensor in initializers:
                continue
            if upstream:
                source = producers.get(tensor)
                found.append(source)
            else:
                found.extend(consumers.get(tensor, []))
                if tensor in outputs:
                    found.append(None)
        return found

    def only_int8(start: onnx.NodeProto, upstream: bool) -> bool:
        seen = {start.name}
        stack = [start]
        while stack:
            for node in neighbours(stack.pop(), upstream):
                if node is None:
                    return False
                if node.op_type in ops:
                    if node.name not in int8:
                        return False
                elif node.name not in seen and node.op_type != "Constant":
                    seen.add(node.name)
                    stack.append(node)
        return True

    def activation_of_int8(node: onnx.NodeProto) -> bool:
        # A Relu or Clip right after an int8 layer is quantized with it, and
        # ONNX Runtime folds it into the layer's output range.
        source = producers.get(node.input[0]) if node.input else None
        return (
            node.op_type in _FUSED_ACTIVATIONS
            and source is not None
            and source.op_type in ops
            and source.name in int8
        )

    return [
        node.name
        for node in proto.graph.node
        if node.op_type not in ops
        and node.op_type != "Constant"
        and not activation_of_int8(node)
        and not (only_int8(node, True) and only_int8(node, False))
    ]


def runtime_quantized_nodes(proto: onnx.ModelProto) -> list[str]:
    """Return the float Conv and Gemm nodes of a QDQ graph that ONNX Runtime quantizes when it loads it.

    ONNX Runtime's ``WeightBiasQuantization`` optimizer (in 1.32, the
    version this project runs) rewrites a Conv or Gemm with a float weight
    initializer to int8, with a symmetric per-tensor weight scale. It does
    so when the node's input comes from a per-tensor DequantizeLinear and
    its output reaches a QuantizeLinear through single-consumer Relu or
    Clip nodes. A layer kept in float between
    two int8 layers therefore runs in int8.
    """
    single = _single_consumers(proto)
    producers = {out: node for node in proto.graph.node for out in node.output}
    initializers = {t.name: t for t in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        source = producers.get(node.input[0])
        if source is None or source.op_type != "DequantizeLinear":
            continue
        scale = initializers.get(source.input[1])
        if scale is None or math.prod(scale.dims) != 1:
            continue
        weight = initializers.get(node.input[1])
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT:
            continue
        reached, _ = _through_activations(node, single)
        if reached is not None and reached.op_type == "QuantizeLinear":
            found.append(node.name)
    return found


def fp16_from_onnx(
    source: str | os.PathLike, destination: str | os.PathLike, keep_float: Sequence[str] = ()
) -> Path:
    """Convert an ONNX file to float16 with ONNX Runtime's converter; inputs and outputs stay float32.

    Args:
        source: float32 ONNX file.
        destination: output ONNX file, written only once complete.
        keep_float: node names that keep computing in float32. Defaults to none.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    destination = Path(destination)
    tmp = _temporary_path(destination)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proto = convert_float_to_float16(
                onnx.load(str(source)), keep_io_types=True, node_block_list=list(keep_float)
            )
        _drop_cast_round_trips(proto.graph)
        _sort_nodes(proto.graph)
        onnx.save(proto, str(tmp))
        check_onnx(tmp)
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    return destination


def fp16_from_onnx_without_overflow(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    feeds: Sequence[dict[str, np.ndarray]],
    max_rounds: int = 4,
) -> list[str]:
    """Convert to float16, keeping in float32 each module whose fp16 nodes overflow on ``feeds``.

    An overflow need not reach the output: a decomposed LayerNorm squares
    values near 3e4 to inf, and the following division turns that into
    zeros. So every intermediate tensor is checked, the first node with a
    non-finite value found, and all nodes of its module scope (``/1/Pow`` ->
    every ``/1/...`` node) kept in float32, for up to ``max_rounds`` rounds.
    Returns the node names kept in float32.

    Raises:
        ExportError: an overflow remains; the message names the first node.
    """
    proto = onnx.load(str(source))
    keep: list[str] = []
    for _ in range(max_rounds):
        fp16_from_onnx(source, destination, keep)
        first = next(
            (hit for feed in feeds if (hit := first_nonfinite_node(destination, feed))), None
        )
        if first is None:
            return keep
        scope = first[0].rsplit("/", 1)[0] + "/"
        added = [
            n.name for n in proto.graph.node if n.name.startswith(scope) and n.name not in keep
        ]
        if scope == "/" or not added:
            break
        keep += added
    Path(destination).unlink(missing_ok=True)
    raise ExportError(
        f"float16 overflows to inf or NaN first in node {first[0]} ({first[1]}), even with "
        f"{len(keep)} node(s) kept in float32; keep this model in fp32"
    )


def _drop_cast_round_trips(graph: onnx.GraphProto) -> None:
    # The converter casts the output of every float32 node to float16 and back
    # before the next float32 node reads it. Between two nodes kept in float32
    # that round trip overflows exactly where float32 was needed, so the
    # float32 reader takes the original tensor instead.
    producers = {out: node for node in graph.node for out in node.output}
    to_fp32 = onnx.TensorProto.FLOAT
    for node in graph.node:
        if node.op_type != "Cast" or _cast_target(node) != to_fp32:
            continue
        source = producers.get(node.input[0])
        if source is None or source.op_type != "Cast" or _cast_target(source) == to_fp32:
            continue
        original = source.input[0]
        for reader in graph.node:
            for index, name in enumerate(reader.input):
                if name == node.output[0]:
                    reader.input[index] = original
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
    while unused:
        for node in unused:
            graph.node.remove(node)
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        unused = [
            n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)
        ]


def _cast_target(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _sort_nodes(graph: onnx.GraphProto) -> None:
    # The converter appends its input casts at the end of the node list, but
    # the ONNX checker requires topological order.
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("the float16 graph has a cycle or an undefined input")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def first_nonfinite_node(
    path: str | os.PathLike, feeds: dict[str, np.ndarray]
) -> tuple[str, str] | None:
    """Return ``(node name, op type)`` of the first node, in graph order, whose output has inf or NaN.

    Every intermediate tensor becomes a graph output for one run, with graph
    optimizations off so that nodes keep their names. Returns None when all
    outputs are finite.
    """
    proto = onnx.load(str(path))
    known = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        for name in node.output:
            if name and name not in known:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feeds), strict=True))
    for node in proto.graph.node:
        for name in node.output:
            value = values.get(name)
            if (
                value is not None
                and np.issubdtype(value.dtype, np.floating)
                and not np.isfinite(value).all()
            ):
                return node.name, node.op_type
    return None


@contextlib.contextmanager
def _quiet_onnxruntime_logs():
    # The quantization tool logs every node it skips at INFO on the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


_NODE_NAME = re.compile(r"Name:'([^']*)'")


class OnnxRunner:
    """An ONNX Runtime CPU session with a fixed thread count.

    With ``profile_prefix``, ONNX Runtime's profiler records every node's run
    time to a JSON file starting with that path (see ``op_times``).

    Args:
        path: the ONNX file.
        threads: intra-op threads. Defaults to 1.
    """

    def __init__(
        self, path: str | os.PathLike, threads: int | None = None, profile_prefix: str | None = None
    ):
        options = ort.SessionOptions()
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        options.intra_op_num_threads = threads or 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Errors are raised as ExportError with the node name; ORT's own log
        # line for them would only repeat it on stderr.
        options.log_severity_level = 4
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ExportError(f"ONNX Runtime could not load {path}: {exc}") from exc
        self.path = Path(path)
        self.threads = threads or 1
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; on failure raise ExportError naming the failing node."""
        try:
            return self.session.run(None, feeds)
        except Exception as exc:
            match = _NODE_NAME.search(str(exc))
            node = f" in node {match.group(1)!r}" if match else ""
            shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
            message = str(exc).strip().splitlines()[0]
            raise ExportError(
                f"{self.path.name} failed{node} on inputs {shapes}: {message}"
            ) from exc

    def time(self, feeds: dict[str, np.ndarray], protocol: TimingProtocol) -> Latency:
        """Time one batch under ``protocol``, whose thread count must be the session's.

        Raises:
            ValueError: the session was created with another thread count, so
                the timing would not follow the protocol.
        """
        if protocol.threads != self.threads:
            raise ValueError(
                f"{self.path.name}: the session runs {self.threads} intra-op thread(s) but the "
                f"timing protocol prescribes {protocol.threads}; create the runner with "
                f"threads=protocol.threads"
            )
        return time_callable(lambda: self.session.run(None, feeds), protocol)


# Operator types of ONNX Runtime's optimized CPU graphs that compute a Conv2d
# or Linear layer. Every other operator converts, reshapes or normalizes.
LAYER_OPS = frozenset(
    {
        "Conv",
        "FusedConv",
        "ConvInteger",
        "QLinearConv",
        "Gemm",
        "FusedGemm",
        "QGemm",
        "MatMul",
        "FusedMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QLinearMatMul",
    }
)


def unprofiled_op_times(ops: dict[str, tuple[float, int]], run_ms: float) -> dict[str, float]:
    """Return ``op_totals``' times with the profiler's own cost per node taken off.

    The profiler adds to every node what recording it costs, 1-2 us on a fast
    CPU: most of a MaxPool or a Reorder in a small model. The excess of the
    profiled nodes over ``run_ms`` (the model's time per run without the
    profiler, less the session call) is split evenly between the nodes.
    """
    total = sum(ms for ms, _ in ops.values())
    nodes = sum(n for _, n in ops.values())
    excess = max(total - run_ms, 0.0) / nodes if nodes else 0.0
    return {op: max(ms - excess * n, 0.0) for op, (ms, n) in ops.items()}


def node_profile(
    path: str | os.PathLike, feeds: dict[str, np.ndarray], threads: int = 1, runs: int = 20
) -> list[tuple[str, str, float]]:
    """Return each node of ``path``'s optimized graph as (name, operator type, median ms per run), in run order.

    The model runs ``runs`` warm-up runs, then ``runs`` profiled ones, under
    ONNX Runtime's profiler with the same graph optimizations as
    ``OnnxRunner``. The operator types are those of the optimized graph,
    fused nodes included (``FusedConv``, ``FusedGemm``). Each node's time
    includes what recording it costs the profiler (see
    ``unprofiled_op_times``).
    """
    import json

    with tempfile.TemporaryDirectory(prefix="deploy-profile-") as folder:
        runner = OnnxRunner(path, threads, profile_prefix=str(Path(folder) / "ort"))
        for _ in range(2 * runs):
            runner.run(feeds)
        events = json.loads(Path(runner.session.end_profiling()).read_text())
    windows = [
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    ][-runs:]
    times: dict[tuple[str, str], list[float]] = {}
    starts: dict[tuple[str, str], list[float]] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        key = (event["name"][: -len("_kernel_time")], event.get("args", {}).get("op_name", "?"))
        for start, end in windows:
            if start <= event["ts"] <= end:
                times.setdefault(key, []).append(event["dur"] / 1000.0)
                starts.setdefault(key, []).append(event["ts"] - start)
                break
    order = sorted(times, key=lambda key: float(np.median(starts[key])))
    # A node that ran in some runs only counts as 0 ms in the others.
    return [
        (
            name,
            op,
            float(np.median(times[(name, op)] + [0.0] * (len(windows) - len(times[(name, op)])))),
        )
        for name, op in order
    ]


def node_owners(nodes: list[tuple[str, str, float]], layers: list[str]) -> list[str | None]:
    """Return the layer each of ``node_profile``'s nodes belongs to, or None for a node of no layer.

    A layer node (``LAYER_OPS``) belongs to the layer its name's module scope
    names. ONNX Runtime renames the convs it fuses with an activation or
    moves to NCHWc after the activation (``/blocks.1/act/Clip_output_0_nchwc``);
    where the layer nodes left over are as many as the layers left over,
    they are matched in run order. The rest (attention's MatMuls of two
    activations, reorders, pools, adds) belong to no layer.
    """
    layer_set = set(layers)
    owners: list[str | None] = []
    unmatched = []
    for k, (name, op, _) in enumerate(nodes):
        owner = None
        if op in LAYER_OPS:
            scopes = _scope_paths(name.removeprefix("fused ").split("/")[1:-1])
            owner = max((path for path in scopes if path in layer_set), key=len, default=None)
            if owner is None:
                unmatched.append(k)
        owners.append(owner)
    rest = [layer for layer in layers if layer not in set(owners)]
    if rest and len(rest) == len(unmatched):
        for k, layer in zip(unmatched, rest, strict=True):
            owners[k] = layer
    return owners


def layer_node_times(
    nodes: list[tuple[str, str, float]], layers: list[str], run_ms: float
) -> dict[str, float]:
    """Return each layer's time inside a model, in ms, from ``node_profile``'s nodes.

    Nodes are matched to layers by ``node_owners``; layers without a node
    are left out. The profiler's own cost per node is taken off
    (``unprofiled_op_times``), with ``run_ms`` the model's time per run
    without the profiler, less the session call.
    """
    total = sum(ms for _, _, ms in nodes)
    excess = max(total - run_ms, 0.0) / len(nodes) if nodes else 0.0
    found: dict[str, float] = {}
    for (_, _, ms), owner in zip(nodes, node_owners(nodes, layers), strict=True):
        if owner is not None:
            found[owner] = found.get(owner, 0.0) + max(ms - excess, 0.0)
    return found


def op_totals(nodes: list[tuple[str, str, float]]) -> dict[str, tuple[float, int]]:
    """Return, per operator type of ``node_profile``'s nodes, their summed ms and their count."""
    found: dict[str, tuple[float, int]] = {}
    for _, op, ms in nodes:
        total, count = found.get(op, (0.0, 0))
        found[op] = (total + ms, count + 1)
    return found


def op_times(
    path: str | os.PathLike, feeds: dict[str, np.ndarray], threads: int = 1, runs: int = 20
) -> dict[str, float]:
    """Return the median time per run of each operator type in ``path``, in ms (see ``node_profile``)."""
    return {op: ms for op, (ms, _) in op_totals(node_profile(path, feeds, threads, runs)).items()}
