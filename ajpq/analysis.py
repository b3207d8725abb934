"""Model analysis: the compressible layers of any ``nn.Module``, their costs, and the channels coupled across them.

Everything that reasons about channels (the cost model, the policy validator, the environments, the exporter)
reads one :class:`ModelAnalysis`, so they all agree on what a channel is, which channels must be removed together
and how important each one is.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from ajpq.errors import ModelError

LayerType = Literal["conv", "depthwise", "grouped_conv", "linear"]
Criterion = Literal["l1", "l2"]
CRITERIA: tuple[str, ...] = ("l1", "l2")
NETWORK_INPUT = -1
"""Group id of input channels that come from the network input (never pruned)."""


@dataclass(frozen=True)
class LayerInfo:
    """One compressible layer (Conv2d or Linear), in execution order."""

    index: int
    name: str
    type: LayerType
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    out_hw: int
    """Output positions per channel: H*W of a conv's output, 1 for a linear layer on a vector."""
    params: int
    macs: int
    has_bias: bool
    """The layer has a bias or a BatchNorm folded into it (32 bits per kept channel in the cost model)."""
    bn_name: str | None
    group: int
    """Id of the coupled-channel group its output channels belong to."""

    @property
    def kernel_area(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def fan_in(self) -> int:
        """Weights per output channel when nothing is pruned."""
        return (self.in_channels // self.groups) * self.kernel_area


@dataclass
class ChannelGroup:
    """Output channels of several layers that must be kept or removed together.

    Channel ``k`` of a member layer is channel ``out_root[layer][k]`` of the group; the mapping is the identity in
    the usual cases (residual additions, depthwise convs) but kept explicit so nothing relies on that.
    """

    id: int
    size: int
    members: list[str]
    """Layers whose output channels are these channels (e.g. the convs feeding one residual sum)."""
    consumers: list[str]
    """Layers whose input channels read these channels (they lose inputs when a channel is removed)."""
    prunable: bool
    """False for the classifier's outputs (channels that reach the model output)."""
    order: np.ndarray = field(repr=False)
    """Channel indices of the group, most important first."""
    importance: np.ndarray = field(repr=False)
    """Group importance of each channel (sum of the members' normalized importances)."""
    fixed_reason: str = ""
    """Why the group is not prunable although layers read it (empty otherwise): see :func:`analyze_model`."""

    @property
    def status(self) -> str:
        """Why no channel of the group may be removed, in the words ``inspect`` and the policy validator use
        (empty for a prunable group)."""
        if self.prunable:
            return ""
        return f"kept whole: {self.fixed_reason}" if self.fixed_reason else "model outputs, never pruned"


@dataclass
class ModelAnalysis:
    """Compressible layers, coupled groups, importance and reference costs of one model."""

    model_name: str
    input_shape: tuple[int, ...]
    layers: list[LayerInfo]
    groups: list[ChannelGroup]
    fingerprint: str
    other_params: int
    """Parameters outside the compressible layers and their folded BatchNorms (counted at 32 bits)."""
    criterion: str
    layer_importance: dict[str, np.ndarray] = field(repr=False)
    """Per output channel importance of each layer (L1 or L2 norm of its BN-folded weights)."""
    in_group: dict[str, np.ndarray] = field(repr=False)
    """For each layer and input channel: id of the group it reads, or ``NETWORK_INPUT``."""
    in_root: dict[str, np.ndarray] = field(repr=False)
    """For each layer and input channel: index of the group channel it reads."""
    out_root: dict[str, np.ndarray] = field(repr=False)
    """For each layer and output channel: index of its channel in the layer's group."""

    def __post_init__(self) -> None:
        self._by_name = {layer.name: layer for layer in self.layers}
        self._rank: dict[str, np.ndarray] = {}
        self._order: dict[str, np.ndarray] = {}

    def layer(self, name: str) -> LayerInfo:
        return self._by_name[name]

    def has_layer(self, name: str) -> bool:
        return name in self._by_name

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def group_of(self, name: str) -> ChannelGroup:
        return self.groups[self._by_name[name].group]

    def channel_rank(self, name: str) -> np.ndarray:
        """For each output channel of layer ``name``, the position of its group channel in the group's importance
        order (0: the most important); read-only, computed once per layer."""
        rank = self._rank.get(name)
        if rank is None:
            group = self.group_of(name)
            group_rank = np.empty(group.size, dtype=np.int64)
            group_rank[group.order] = np.arange(group.size)
            rank = self._rank[name] = group_rank[self.out_root[name]]
            rank.flags.writeable = False
        return rank

    def channel_order(self, name: str) -> np.ndarray:
        """Output channels of a layer, most important first (the order of its group); read-only."""
        order = self._order.get(name)
        if order is None:
            order = self._order[name] = np.argsort(self.channel_rank(name))
            order.flags.writeable = False
        return order

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)


def fingerprint_of(model: nn.Module) -> str:
    """Hex digest of the compressible layers' names and weight shapes: identifies an architecture, not weights."""
    parts = [
        f"{name}:{tuple(module.weight.shape)}"
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    ]
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """Hex digest of the model's state (every parameter and buffer: name, dtype, shape and values): identifies the
    FP32 reference a run was measured against, which the same seed need not reproduce on another torch build."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _layer_type(module: nn.Module) -> LayerType:
    if isinstance(module, nn.Linear):
        return "linear"
    assert isinstance(module, nn.Conv2d)
    if module.groups == 1:
        return "conv"
    if module.groups == module.in_channels and module.out_channels % module.in_channels == 0:
        return "depthwise"
    return "grouped_conv"


def _trace(
    model: nn.Module, example: torch.Tensor
) -> tuple[list[tuple[str, nn.Module, tuple[int, ...]]], dict[str, str], torch.Tensor]:
    """Run one forward pass and record compressible layers in execution order and conv->BatchNorm pairs."""
    modules = dict(model.named_modules())
    compressible: dict[nn.Module, str] = {m: n for n, m in modules.items() if isinstance(m, nn.Conv2d | nn.Linear)}
    batchnorms: dict[nn.Module, str] = {
        m: n for n, m in modules.items() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)
    }
    order: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    seen: set[str] = set()
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    bn_of: dict[str, str] = {}
    handles = []

    def layer_hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        name = compressible[module]
        if name in seen:
            raise ModelError(
                f"layer '{name}' is called twice in one forward pass; AJPQ needs every Conv2d/Linear "
                "to run once (weight sharing cannot be compressed per channel)"
            )
        seen.add(name)
        order.append((name, module, tuple(output.shape)))
        produced[id(output)] = (name, output)

    def bn_hook(module: nn.Module, inputs: tuple) -> None:
        hit = produced.get(id(inputs[0]))
        if hit is not None and hit[1] is inputs[0] and hit[0] not in bn_of:
            bn_of[hit[0]] = batchnorms[module]

    for module in compressible:
        handles.append(module.register_forward_hook(layer_hook))
    for module in batchnorms:
        handles.append(module.register_forward_pre_hook(bn_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return order, bn_of, output


def layer_module(model: nn.Module, name: str) -> nn.Conv2d | nn.Linear:
    """The compressible layer (Conv2d or Linear) at qualified ``name``.

    Use it instead of ``model.get_submodule(name)`` for a layer of the analysis: ``get_submodule`` returns a plain
    ``nn.Module``, whose ``weight`` and ``bias`` type checkers can only see as ``Tensor | Module``; here they are
    tensors. A model that is not the one the analysis, policy or artifact was made for fails with one clear line.
    """
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ModelError(
            f"the model has no layer '{name}'; pass the model the policy or artifact was made for"
        ) from None
    if not isinstance(module, nn.Conv2d | nn.Linear):
        raise ModelError(
            f"'{name}' is a {type(module).__name__}, not a Conv2d or Linear layer; pass the model the policy or "
            "artifact was made for"
        )
    return module


def folded_weights(model: nn.Module, bn_of: dict[str, str]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Weights and biases of each compressible layer with its following BatchNorm folded in (eval statistics)."""
    modules = dict(model.named_modules())
    result: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for name, module in modules.items():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        weight = module.weight.detach().float()
        bias = module.bias.detach().float() if module.bias is not None else None
        bn_name = bn_of.get(name)
        if bn_name is not None:
            bn = modules[bn_name]
            assert isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d)
            mean = bn.running_mean.detach().float() if bn.running_mean is not None else torch.zeros(weight.shape[0])
            var = bn.running_var.detach().float() if bn.running_var is not None else torch.ones(weight.shape[0])
            gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(mean)
            beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(mean)
            factor = gamma / torch.sqrt(var + bn.eps)
            weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
            bias = ((bias if bias is not None else torch.zeros_like(mean)) - mean) * factor + beta
        result[name] = (weight, bias)
    return result


def channel_importance(weight: torch.Tensor, criterion: str = "l1") -> np.ndarray:
    """Importance of each output channel: the L1 (default) or L2 norm of its weights."""
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    if criterion == "l1":
        values = flat.abs().sum(dim=1)
    elif criterion == "l2":
        values = flat.pow(2).sum(dim=1).sqrt()
    else:
        raise ModelError(f"importance criterion must be one of {', '.join(CRITERIA)}, but got '{criterion}'")
    return values.cpu().numpy().astype(np.float64)


def _build_dependency_graph(model: nn.Module, example: torch.Tensor):
    import torch_pruning as tp

    try:
        # torch-pruning traces through autograd: enabled here, since users analyse from inference code (no_grad)
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            return tp, tp.DependencyGraph().build_dependency(model, example_inputs=example)
    except Exception as exc:  # torch-pruning raises many types on unsupported graphs
        raise ModelError(
            f"could not trace the channel dependencies of this model with torch-pruning ({type(exc).__name__}: "
            f"{exc}); check that the model runs on the example input shape"
        ) from exc


def analyze_model(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    model_name: str = "model",
    criterion: str = "l1",
) -> ModelAnalysis:
    """Find the compressible layers of ``model`` on an input of ``input_shape`` (without batch dimension).

    Coupled channels are found with torch-pruning's dependency graph, so residual additions, depthwise convs,
    concatenations and flattens are handled for any architecture torch-pruning can trace. The graph is not trusted
    blindly: :func:`verify_coupling` perturbs one channel of every group and checks that exactly the reader inputs the
    graph names change. A group whose channels reach its readers otherwise (a channel shuffle through
    view/transpose/reshape, a LayerNorm or GroupNorm over the channels) is kept whole (``prunable`` False, with the
    reason in ``fixed_reason``): its channels are still quantized, but removing one would make the slim model differ
    from the simulation. So is every group a grouped (not depthwise) convolution writes or reads, since removing
    different numbers of channels in different conv groups has no slim equivalent.
    """
    if criterion not in CRITERIA:
        raise ModelError(f"importance criterion must be one of {', '.join(CRITERIA)}, but got '{criterion}'")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = torch.randn(1, *input_shape, device=device)
    try:
        order, bn_of, _ = _trace(model, example)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"the model does not run on input shape {tuple(input_shape)}: {type(exc).__name__}: {exc}"
        ) from exc
    if not order:
        raise ModelError("the model has no Conv2d or Linear layer to compress")

    tp, graph = _build_dependency_graph(model, example)
    name_of = {module: name for name, module, _ in order}
    modules = {name: module for name, module, _ in order}

    group_of_layer: dict[str, int] = {}
    out_root: dict[str, np.ndarray] = {}
    in_group = {name: np.full(_in_channels(m), NETWORK_INPUT, dtype=np.int64) for name, m in modules.items()}
    in_root = {name: np.zeros(_in_channels(m), dtype=np.int64) for name, m in modules.items()}
    raw_groups: list[tuple[int, list[str], list[str]]] = []

    for name, module, _ in order:
        if name in group_of_layer:
            continue
        gid = len(raw_groups)
        size = _out_channels(module)
        prune_out = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
        pruning_group = graph.get_pruning_group(module, prune_out, idxs=list(range(size)))
        members: list[str] = []
        consumers: list[str] = []
        for item in pruning_group.items:
            target = item.dep.target.module
            target_name = name_of.get(target)
            if target_name is None:
                continue
            handler = getattr(item.dep.handler, "__name__", str(item.dep.handler))
            idxs = np.asarray([int(i) for i in item.idxs], dtype=np.int64)
            roots = np.asarray([int(r) for r in item.root_idxs], dtype=np.int64)
            if "out_channels" in handler:
                if target_name in group_of_layer:
                    continue
                group_of_layer[target_name] = gid
                mapping = np.zeros(_out_channels(target), dtype=np.int64)
                mapping[idxs] = roots
                out_root[target_name] = mapping
                members.append(target_name)
                is_depthwise = _layer_type(target) == "depthwise"
                if is_depthwise and _in_channels(target) == _out_channels(target) and target_name not in consumers:
                    consumers.append(target_name)
                    in_group[target_name][:] = gid
                    in_root[target_name][:] = mapping
            elif "in_channels" in handler:
                in_group[target_name][idxs] = gid
                in_root[target_name][idxs] = roots
                if target_name not in consumers:
                    consumers.append(target_name)
        if name not in group_of_layer:  # torch-pruning did not report the root itself (should not happen)
            group_of_layer[name] = gid
            out_root[name] = np.arange(size)
            members.append(name)
        raw_groups.append((size, members, consumers))

    fixed_reasons = verify_coupling(model, example, modules, group_of_layer, out_root, in_group, in_root)
    for name, module in modules.items():
        if _layer_type(module) == "grouped_conv":
            for gid in {group_of_layer[name], *(int(g) for g in np.unique(in_group[name]) if g != NETWORK_INPUT)}:
                fixed_reasons.setdefault(gid, f"written or read by the grouped convolution '{name}'")
    weights = folded_weights(model, bn_of)
    layer_importance = {name: channel_importance(weights[name][0], criterion) for name in modules}
    groups: list[ChannelGroup] = []
    for gid, (size, members, consumers) in enumerate(raw_groups):
        score = np.zeros(size)
        for member in members:
            values = layer_importance[member]
            mean = values.mean()
            normalized = values / mean if mean > 0 else values
            np.add.at(score, out_root[member], normalized)
        real_consumers = [c for c in consumers if c not in members]
        fixed = fixed_reasons.get(gid, "") if real_consumers else ""
        groups.append(
            ChannelGroup(
                id=gid,
                size=size,
                members=members,
                consumers=consumers,
                prunable=bool(real_consumers) and not fixed,
                order=np.argsort(-score, kind="stable"),
                importance=score,
                fixed_reason=fixed,
            )
        )

    layers: list[LayerInfo] = []
    counted: set[int] = set()
    for index, (name, module, out_shape) in enumerate(order):
        counted.update(id(p) for p in module.parameters(recurse=False))
        bn_name = bn_of.get(name)
        if bn_name is not None:
            counted.update(id(p) for p in dict(model.named_modules())[bn_name].parameters(recurse=False))
        layers.append(_layer_info(index, name, module, out_shape, bn_name, group_of_layer[name]))
    other = sum(p.numel() for p in model.parameters() if id(p) not in counted)

    return ModelAnalysis(
        model_name=model_name,
        input_shape=tuple(input_shape),
        layers=layers,
        groups=groups,
        fingerprint=fingerprint_of(model),
        other_params=int(other),
        criterion=criterion,
        layer_importance=layer_importance,
        in_group=in_group,
        in_root=in_root,
        out_root=out_root,
    )


@torch.no_grad()
def verify_coupling(
    model: nn.Module,
    example: torch.Tensor,
    modules: dict[str, nn.Module],
    group_of_layer: dict[str, int],
    out_root: dict[str, np.ndarray],
    in_group: dict[str, np.ndarray],
    in_root: dict[str, np.ndarray],
) -> dict[int, str]:
    """Check the channel mapping of every group empirically; returns, by group id, why a group must stay whole.

    For each group, one channel of every member layer's output is pushed far up (then far down) while every
    compressible layer's output is otherwise held at its unperturbed value, so the change reaches only the layers
    that read this group directly. The input channels of those readers that change must be among the ones the
    dependency graph maps to that channel; a change anywhere else means the graph's mapping is wrong there.
    """
    was_training = model.training
    model.eval()
    batch = torch.randn(1, *example.shape[1:], generator=torch.Generator().manual_seed(0)).to(example.device)
    channel_dim = {name: 1 if isinstance(module, nn.Conv2d) else -1 for name, module in modules.items()}
    baseline_out: dict[str, torch.Tensor] = {}
    seen_in: dict[str, torch.Tensor] = {}
    state: dict[str, object] = {"mode": "record", "group": -1, "channel": 0, "delta": 0.0}

    def pre_hook(module: nn.Module, args: tuple, name: str = "") -> None:
        seen_in[name] = args[0].detach().clone()

    def hook(module: nn.Module, args: tuple, output: torch.Tensor, name: str = "") -> torch.Tensor | None:
        if state["mode"] == "record":
            baseline_out[name] = output.detach().clone()
            return None
        base = baseline_out[name]
        if group_of_layer[name] != state["group"]:
            return base
        index = np.flatnonzero(out_root[name] == state["channel"])
        changed = base.clone()
        scale = float(base.abs().max()) + 1.0
        step = torch.zeros(base.shape[channel_dim[name]], device=base.device, dtype=base.dtype)
        delta = state["delta"]
        assert isinstance(delta, float)
        step[torch.from_numpy(index).to(base.device)] = delta * scale
        shape = [1] * base.dim()
        shape[channel_dim[name]] = -1
        return changed + step.reshape(shape)

    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: pre_hook(m, a, n)))
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: hook(m, a, o, n)))
    reasons: dict[int, str] = {}
    try:
        model(batch)
        baseline_in = {name: x for name, x in seen_in.items()}
        for gid in sorted(set(group_of_layer.values())):
            member = next(n for n, g in group_of_layer.items() if g == gid)
            channel = int(out_root[member][len(out_root[member]) // 2])
            for delta in (10.0, -10.0):
                state.update(mode="perturb", group=gid, channel=channel, delta=delta)
                seen_in.clear()
                model(batch)
                for name, x in seen_in.items():
                    base = baseline_in[name]
                    if x.shape != base.shape:
                        continue
                    axis = channel_dim[name] % x.dim()
                    dims = [d for d in range(x.dim()) if d != axis]
                    moved = np.flatnonzero(((x - base).abs().amax(dim=dims) > 0).cpu().numpy())
                    allowed = (in_group[name] == gid) & (in_root[name] == channel)
                    unexpected = moved[~allowed[moved]] if moved.size else moved
                    if unexpected.size and gid not in reasons:
                        reasons[gid] = _coupling_reason(channel, unexpected, moved.size, name, modules[name], x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return reasons


def _coupling_reason(
    channel: int, unexpected: np.ndarray, moved: int, name: str, module: nn.Module, seen: torch.Tensor
) -> str:
    """Why a group whose channel reaches the ``unexpected`` inputs of reader ``name`` must stay whole, in words that
    fit the reader: a Linear over the last axis of a 3-d or larger tensor mixes along that axis (tokens, positions),
    not along the channels; otherwise the channels were permuted or normalized together on the way."""
    if isinstance(module, nn.Linear) and seen.dim() > 2:
        return (
            f"its channel {channel} reaches {moved} of the {module.in_features} inputs of '{name}', a Linear "
            f"over the last axis of a {'x'.join(str(s) for s in seen.shape[1:])} tensor: it mixes along another axis "
            "than the channels (tokens or positions), so no channel can be removed alone"
        )
    return (
        f"its channel {channel} reaches inputs {unexpected[:4].tolist()} of '{name}', which the dependency graph "
        "does not map to it (a channel shuffle, or a norm over the channels?)"
    )


def _in_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels
    assert isinstance(module, nn.Linear)  # the analysis holds only Conv2d and Linear layers
    return module.in_features


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    assert isinstance(module, nn.Linear)  # the analysis holds only Conv2d and Linear layers
    return module.out_features


def _layer_info(
    index: int, name: str, module: nn.Module, out_shape: tuple[int, ...], bn_name: str | None, group: int
) -> LayerInfo:
    params = sum(p.numel() for p in module.parameters(recurse=False))
    if isinstance(module, nn.Conv2d):
        kernel = (int(module.kernel_size[0]), int(module.kernel_size[1]))
        stride = (int(module.stride[0]), int(module.stride[1]))
        out_hw = int(np.prod(out_shape[2:])) if len(out_shape) > 2 else 1
        groups = int(module.groups)
        in_ch, out_ch = int(module.in_channels), int(module.out_channels)
    else:
        assert isinstance(module, nn.Linear)
        kernel, stride, groups = (1, 1), (1, 1), 1
        out_hw = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
        in_ch, out_ch = int(module.in_features), int(module.out_features)
    macs = out_ch * (in_ch // groups) * kernel[0] * kernel[1] * out_hw
    return LayerInfo(
        index=index,
        name=name,
        type=_layer_type(module),
        in_channels=in_ch,
        out_channels=out_ch,
        kernel_size=kernel,
        stride=stride,
        groups=groups,
        out_hw=out_hw,
        params=int(params),
        macs=int(macs),
        has_bias=module.bias is not None or bn_name is not None,
        bn_name=bn_name,
        group=group,
    )
