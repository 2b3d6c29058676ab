"""Turn an ExportedProgram back into a module with real Conv2d, Linear and BatchNorm layers.

``ExportedProgram.module()`` calls ``aten.conv2d`` and friends on bare weight
attributes, which the passes cannot factorize or prune. This rewrite gives
each such call its own ``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm*d`` module,
named after the weight's owner in the original model (``features.0``), so that
layer names match the user's model.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from deploy.errors import DeployError

aten = torch.ops.aten


def _attr(module: nn.Module, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = module
        for part in node.target.split("."):
            value = getattr(value, part)
        return value
    return None


def _owner(node: fx.Node) -> str:
    return node.target.rsplit(".", 1)[0] if "." in node.target else node.target


def _conv(args, weight, bias) -> nn.Conv2d:
    stride, padding, dilation, groups = (list(args[3:]) + [1, 0, 1, 1][len(args) - 3 :])[:4]
    out_channels, in_per_group, kh, kw = weight.shape
    layer = nn.Conv2d(
        in_per_group * groups,
        out_channels,
        (kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias is not None,
    )
    return layer


def _batch_norm(input_node: fx.Node, args, weight) -> nn.Module:
    rank = len(input_node.meta["val"].shape) if "val" in input_node.meta else 4
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    eps = args[7] if len(args) > 7 else 1e-5
    return cls(weight.shape[0], eps=eps)


def module_from_exported_program(program: torch.export.ExportedProgram) -> nn.Module:
    """Return an eval-mode module equivalent to ``program`` with layer calls as submodules."""
    module = program.module()
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            # The guard re-checks the example shapes; the rewritten module must accept any batch.
            graph.erase_node(node)
            continue
        if node.op != "call_function":
            continue
        if node.target not in (aten.conv2d.default, aten.linear.default, aten.batch_norm.default):
            continue
        weight, bias = (
            _attr(module, node.args[1]),
            _attr(module, node.args[2]) if len(node.args) > 2 else None,
        )
        if weight is None:
            continue
        name = _owner(node.args[1])
        if node.target is aten.conv2d.default:
            if weight.dim() != 4:
                continue
            layer = _conv(node.args, weight, bias)
            state = {"weight": weight, **({"bias": bias} if bias is not None else {})}
        elif node.target is aten.linear.default:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            state = {"weight": weight, **({"bias": bias} if bias is not None else {})}
        else:
            mean, var = _attr(module, node.args[3]), _attr(module, node.args[4])
            if mean is None or var is None or bias is None:
                continue
            layer = _batch_norm(node.args[0], node.args, weight)
            state = {"weight": weight, "bias": bias, "running_mean": mean, "running_var": var}
        layer.load_state_dict(state, strict=False)
        module.set_submodule(name, layer.eval())
        with graph.inserting_before(node):
            replacement = graph.call_module(name, (node.args[0],))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    try:
        graph.lint()
    except Exception as exc:  # fx raises bare RuntimeErrors for a broken graph
        raise DeployError(f"the ExportedProgram could not be rewritten into layers: {exc}") from exc
    # A plain GraphModule: the one ExportedProgram.module() returns rejects eval().
    return fx.GraphModule(module, graph).eval()
