"""Latency: timing a model where it will run, and the per-layer table that predicts a policy's latency from it.

Size and BOPs are counted; latency has to be measured, on the machine and runtime the model will run on, as AMC and
HAQ did with measured or simulated hardware feedback. Measuring every policy a search proposes would cost more than
evaluating it, so a :class:`LatencyTable` is measured once per model, target and batch size (and cached):

* each compressible layer is timed alone, as the exported slim model runs it (a dense layer with its folded bias
  and its activation quantizer in front), over a grid of kept input and output channels (:data:`KEPT_GRID` of its
  channels, and 1), and interpolated bilinearly between grid points. Pruned channels are what changes dense latency:
  a layer's channel bits do not (the exported torch model and the float ONNX compute in float) and neither does its
  weight sparsity (the kernels are dense), which is why the weight-sparse methods cannot meet a latency budget;
* what the layers do not cover (activations, pooling, residual additions, reshapes, the framework's per-call work)
  is the *residual*: the unpruned slim model's measured latency minus the table's sum at full width, attributed to
  the layers by their output volume and scaled with their kept outputs.

A policy's predicted latency is the sum of its layers' predictions, so it is additive like size and BOPs: the cost
model reports it (:class:`~ajpq.cost.CostReport.latency_ratio`), the budget checks it, the projection prunes until
it fits, and the greedy allocation prices a move by the layers it changes. The ratio is of the FP32 model's
measured latency (BatchNorm unfolded, no quantizers), as the size and BOPs budgets are ratios of FP32.
``experiments/bench_latency.py`` checks the prediction against the measured latency of exported models.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ajpq.analysis import LayerInfo, ModelAnalysis, layer_module
from ajpq.errors import ConfigError, shown
from ajpq.io import atomic_write_json, parse_json, read_text
from ajpq.logs import log

LATENCY_TARGETS: tuple[str, ...] = ("torch-cpu", "onnxruntime-cpu", "cuda")
"""Where a latency budget is measured: the exported slim torch model on the CPU or on CUDA, or its float ONNX file
(``--onnx-float``) in onnxruntime's CPU provider with all graph optimizations."""
KEPT_GRID: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
"""Fractions of a layer's input and output channels at which it is timed (1 channel is timed too)."""
TABLE_VERSION = 1
MAX_GRID = 16
"""Largest grid a table file may hold per axis (a file is refused beyond it)."""


MAX_TABLE_BYTES = 4 * 2**20
"""A table of a thousand layers takes ~200 KB; a larger file is refused unread."""


class LatencyError(ConfigError):
    """A latency table that cannot be used here, or a latency target this machine does not have."""


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def check_target_name(target: object) -> str:
    """``target`` if it names a latency target (:data:`LATENCY_TARGETS`); a one-line error otherwise. What a
    configuration checks; whether this machine can measure it is :func:`check_target`'s question."""
    if target not in LATENCY_TARGETS:
        raise LatencyError(f"latency_target must be one of {', '.join(LATENCY_TARGETS)}, but got {shown(target)}")
    return str(target)


def check_target(target: object) -> str:
    """``target`` if it is a latency target this machine can measure; a one-line error otherwise."""
    check_target_name(target)
    if target == "cuda" and not torch.cuda.is_available():
        raise LatencyError(
            "latency_target cuda needs a CUDA device, and torch sees none here; measure on the machine the model "
            "will run on, or use --latency-target torch-cpu"
        )
    if target == "onnxruntime-cpu":
        from ajpq.onnx_export import require_onnx

        require_onnx()
    return str(target)


def _warm_up(run: Callable[[], object], calls: int = 15, seconds: float = 0.3) -> None:
    """Run until both ``calls`` passes and ``seconds`` are done (oneDNN's first passes per shape are slow)."""
    deadline = time.perf_counter() + seconds
    done = 0
    while done < calls or time.perf_counter() < deadline:
        run()
        done += 1


def _once(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def median_ms(run: Callable[[], object], repeats: int = 30, *, calls: int = 15, seconds: float = 0.3) -> float:
    """Median wall time of ``run`` in milliseconds over ``repeats`` calls, after a warm-up."""
    _warm_up(run, calls, seconds)
    return statistics.median(_once(run) for _ in range(repeats)) * 1000.0


def _on(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in eval mode on ``device``: itself when it is there already, else a copy (a caller's model, such
    as a workspace's, never changes device by being timed)."""
    if any(tensor.device.type != device.type for tensor in (*model.parameters(), *model.buffers())):
        model = copy.deepcopy(model).to(device)
    return model.eval()


def runner(model: nn.Module, example: torch.Tensor, target: str) -> Callable[[], object]:
    """A function that runs one forward pass of ``model`` on ``example`` on ``target`` (and waits for it)."""
    if target == "onnxruntime-cpu":
        from ajpq.onnx_export import _torch_export, session

        runtime = session(_torch_export(_on(model, torch.device("cpu")), tuple(example.shape[1:])))
        feed = {"input": example.cpu().numpy().astype(np.float32)}
        return lambda: runtime.run(None, feed)
    device = torch.device("cuda" if target == "cuda" else "cpu")
    model = _on(model, device)
    x = example.to(device)

    @torch.inference_mode()
    def run() -> object:
        out = model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def measure_latency(
    model: nn.Module, input_shape: tuple[int, ...], batch: int, *, target: str = "torch-cpu", repeats: int = 30
) -> float:
    """Median wall time of one forward pass of a batch on ``target`` in milliseconds, after a warm-up."""
    return median_ms(runner(model, torch.randn(batch, *input_shape), target), repeats)


def latency_report(
    slim: nn.Module, fp32: nn.Module, input_shape: tuple[int, ...], *, repeats: int = 30
) -> dict[str, float]:
    """``{"batch1", "batch64", "fp32_batch1", "fp32_batch64"}``: CPU milliseconds (:func:`paired_latency`), median
    of ``2 * repeats`` passes at batch 1 and ``repeats`` at batch 64."""
    report = {}
    for batch, count in ((1, repeats * 2), (64, repeats)):
        report[f"batch{batch}"], report[f"fp32_batch{batch}"] = paired_latency(
            slim, fp32, input_shape, batch, "torch-cpu", count
        )
    return {key: report[key] for key in ("batch1", "batch64", "fp32_batch1", "fp32_batch64")}


def paired_latency(
    model: nn.Module, reference: nn.Module, input_shape: tuple[int, ...], batch: int, target: str, repeats: int = 30
) -> tuple[float, float]:
    """Median milliseconds of ``model`` and of ``reference`` on ``target``, timed alternately (a load spike from
    another process hits both alike)."""
    x = torch.randn(batch, *input_shape)
    run_model, run_reference = runner(model, x, target), runner(reference, x, target)
    _warm_up(run_model)
    _warm_up(run_reference)
    pairs = [(_once(run_model), _once(run_reference)) for _ in range(repeats)]
    return statistics.median(p[0] for p in pairs) * 1000.0, statistics.median(p[1] for p in pairs) * 1000.0


def machine_signature(target: str) -> dict[str, Any]:
    """What a latency measurement depends on besides the model: processor, cores, threads, torch, device."""
    processor = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    signature: dict[str, Any] = {
        "target": target,
        "machine": platform.machine(),
        "processor": processor,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if target == "cuda" and torch.cuda.is_available():
        signature["device"] = torch.cuda.get_device_name()
    if target == "onnxruntime-cpu":
        try:
            import onnxruntime

            signature["onnxruntime"] = onnxruntime.__version__
        except ImportError:
            pass
    return signature


def signature_digest(signature: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------


def _interp(grid: np.ndarray, values: np.ndarray, x: float) -> float:
    """Piecewise-linear through the grid points, extended linearly beyond the last two at either end."""
    if grid.size == 1:
        return float(values[0])
    if x <= grid[0]:
        i = 0
    elif x >= grid[-1]:
        i = grid.size - 2
    else:
        return float(np.interp(x, grid, values))
    slope = (values[i + 1] - values[i]) / (grid[i + 1] - grid[i])
    return float(values[i] + slope * (x - grid[i]))


@dataclass
class LayerLatency:
    """One layer's measured latency over kept input and output channels (milliseconds)."""

    name: str
    in_grid: np.ndarray
    """Kept input channels timed (increasing); one entry for a grouped layer, whose inputs are pruned with its
    outputs."""
    out_grid: np.ndarray
    """Kept output channels timed (increasing)."""
    ms: np.ndarray
    """``(len(in_grid), len(out_grid))`` medians."""
    residual_ms: float = 0.0
    """This layer's share of what the layers do not cover, at all its output channels."""
    out_channels: int = 1

    def predict(self, kept_in: int, kept_out: int) -> float:
        """Latency at ``kept_in`` inputs and ``kept_out`` outputs: bilinear between grid points, plus the residual;
        0 when no output channel is kept (the layer is gone)."""
        if kept_out <= 0:
            return 0.0
        along_out = [_interp(self.out_grid, row, kept_out) for row in self.ms]
        value = _interp(self.in_grid, np.array(along_out), kept_in) if self.in_grid.size > 1 else along_out[0]
        return max(value, 0.0) + self.residual_ms * kept_out / self.out_channels

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in_grid": self.in_grid.tolist(),
            "out_grid": self.out_grid.tolist(),
            "ms": self.ms.tolist(),
            "residual_ms": self.residual_ms,
            "out_channels": self.out_channels,
        }


@dataclass
class LatencyTable:
    """Measured per-layer latencies of one model on one target at one batch size (see the module docstring)."""

    model_name: str
    fingerprint: str
    target: str
    batch: int
    reference_ms: float
    """The FP32 model's measured latency (BatchNorm unfolded, no quantizers): the denominator of the ratio."""
    layers: dict[str, LayerLatency]
    machine: dict[str, Any] = field(default_factory=dict)
    measured: str = ""
    full_slim_ms: float = 0.0
    """The unpruned slim model's measured latency (what the table's sum at full width is calibrated to)."""

    def layer_ms(self, layer: LayerInfo, kept_in: int, kept_out: int) -> float:
        return self.layers[layer.name].predict(kept_in, kept_out)

    def machine_difference(self) -> str | None:
        """How this machine differs from the one the table was measured on (None: the same)."""
        here = machine_signature(self.target)
        changed = [
            f"{key} {self.machine.get(key)!r} -> {here[key]!r}" for key in here if self.machine.get(key) != here[key]
        ]
        return "; ".join(changed) if changed else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "ajpq-latency-table",
            "version": TABLE_VERSION,
            "model": self.model_name,
            "fingerprint": self.fingerprint,
            "target": self.target,
            "batch": self.batch,
            "reference_ms": self.reference_ms,
            "full_slim_ms": self.full_slim_ms,
            "machine": self.machine,
            "measured": self.measured,
            "layers": [layer.as_dict() for layer in self.layers.values()],
        }

    @classmethod
    def from_dict(cls, data: Any, analysis: ModelAnalysis, source: str) -> LatencyTable:
        """A table read from a file, checked against ``analysis`` (one line naming the problem otherwise)."""

        def bad(what: str) -> LatencyError:
            return LatencyError(
                f"{source}: {what}; it is not a latency table of this model (delete it and the search measures anew)"
            )

        if not isinstance(data, dict) or data.get("format") != "ajpq-latency-table":
            raise bad("not an AJPQ latency table")
        if data.get("version") != TABLE_VERSION:
            raise bad(f"version {shown(data.get('version'))}, expected {TABLE_VERSION}")
        if data.get("fingerprint") != analysis.fingerprint:
            raise bad("it was measured on another architecture (fingerprint differs)")
        if data.get("target") not in LATENCY_TARGETS:
            raise bad(f"unknown target {shown(data.get('target'))}")
        batch, reference = data.get("batch"), data.get("reference_ms")
        if not (isinstance(batch, int) and not isinstance(batch, bool) and 1 <= batch <= 1_000_000):
            raise bad(f"batch {shown(batch)} is not a count")
        if not _positive(reference):
            raise bad(f"reference_ms {shown(reference)} is not a positive number")
        entries = data.get("layers")
        if not isinstance(entries, list) or len(entries) != len(analysis.layers):
            raise bad(f"it must time the model's {len(analysis.layers)} layers")
        layers: dict[str, LayerLatency] = {}
        for entry, info in zip(entries, analysis.layers, strict=True):
            if not isinstance(entry, dict) or entry.get("name") != info.name:
                raise bad(f"its layers must be {info.name!r} and the others in the model's order")
            grids = []
            for key in ("in_grid", "out_grid"):
                grid = entry.get(key)
                if not (
                    isinstance(grid, list)
                    and 1 <= len(grid) <= MAX_GRID
                    and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
                    and grid == sorted(set(grid))
                ):
                    raise bad(f"layer {info.name!r}: {key} must be 1 to {MAX_GRID} increasing channel counts")
                grids.append(np.array(grid, dtype=np.int64))
            ms = entry.get("ms")
            if not (
                isinstance(ms, list)
                and len(ms) == grids[0].size
                and all(
                    isinstance(row, list) and len(row) == grids[1].size and all(_finite(v) for v in row) for row in ms
                )
            ):
                raise bad(f"layer {info.name!r}: ms must be a {grids[0].size} x {grids[1].size} table of numbers")
            residual = entry.get("residual_ms", 0.0)
            if not (_finite(residual) and residual >= 0):
                raise bad(f"layer {info.name!r}: residual_ms must be a number >= 0")
            layers[info.name] = LayerLatency(
                info.name, grids[0], grids[1], np.array(ms, dtype=float), float(residual), info.out_channels
            )
        machine = data.get("machine")
        return cls(
            model_name=str(data.get("model", analysis.model_name))[:200],
            fingerprint=analysis.fingerprint,
            target=data["target"],
            batch=batch,
            reference_ms=float(reference),  # type: ignore[arg-type]  # checked by _positive above
            layers=layers,
            machine=machine if isinstance(machine, dict) else {},
            measured=str(data.get("measured", ""))[:100],
            full_slim_ms=float(data["full_slim_ms"]) if _finite(data.get("full_slim_ms")) else 0.0,
        )

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, analysis: ModelAnalysis) -> LatencyTable:
        """A table file, checked (:meth:`from_dict`); a file larger than any table is refused before it is read."""
        try:
            size = Path(path).stat().st_size
        except OSError:
            size = 0  # read_text says what is wrong with the path
        if size > MAX_TABLE_BYTES:
            raise LatencyError(
                f"{path}: {size:,} bytes, more than any latency table ({MAX_TABLE_BYTES:,}); it is not one"
            )
        text = read_text(path, str(path), LatencyError)
        return cls.from_dict(parse_json(text, str(path), "a latency table", LatencyError), analysis, str(path))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _finite(value) and value > 0


# ---------------------------------------------------------------------------------------------------------------
# Measuring a table
# ---------------------------------------------------------------------------------------------------------------


def kept_grid(channels: int) -> np.ndarray:
    """Channel counts a layer is timed at: 1 and :data:`KEPT_GRID` of ``channels`` (distinct, increasing)."""
    return np.array(sorted({1, *(max(1, round(f * channels)) for f in KEPT_GRID)}), dtype=np.int64)


def _is_grouped(layer: LayerInfo) -> bool:
    """Depthwise and grouped layers: timed along their outputs only (their inputs are pruned with them)."""
    return layer.groups > 1


def _layer_inputs(model: nn.Module, analysis: ModelAnalysis, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The input shape of every compressible layer on ``example`` (one forward pass)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for layer in analysis.layers:

        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], name: str = layer.name) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape))

        handles.append(layer_module(model, layer.name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _sliced(module: nn.Module, layer: LayerInfo, kept_in: int, kept_out: int) -> nn.Module:
    """A dense layer like ``module`` with ``kept_in`` inputs and ``kept_out`` outputs, a bias (folded BatchNorm) and
    an activation quantizer in front, as the exported slim model runs it."""
    from ajpq.artifact import ActivationFakeQuant

    if isinstance(module, nn.Conv2d):
        conv: Any = module  # torch types its tuples as tuple[int, ...]
        if _is_grouped(layer) and layer.groups == layer.in_channels:
            groups = kept_out  # depthwise
        else:
            groups = math.gcd(kept_in, kept_out, layer.groups) if _is_grouped(layer) else 1
        new: nn.Module = nn.Conv2d(
            kept_in,
            kept_out,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=groups,
            bias=True,
            padding_mode=conv.padding_mode,
        )
    else:
        new = nn.Linear(kept_in, kept_out, bias=True)
    new.register_forward_pre_hook(ActivationFakeQuant(8, 1.0, signed=True))
    return new.eval()


def _example_input(shape: tuple[int, ...], module: nn.Module, kept_in: int) -> torch.Tensor:
    dims = list(shape)
    dims[1 if isinstance(module, nn.Conv2d) else -1] = kept_in
    return torch.randn(*dims)


def measure_table(
    model: nn.Module,
    analysis: ModelAnalysis,
    input_shape: tuple[int, ...],
    *,
    target: str,
    batch: int,
    model_name: str,
    repeats: int = 15,
    progress: bool = True,
) -> LatencyTable:
    """Time every compressible layer of ``model`` over its kept-channel grid on ``target`` (see the module doc)."""
    from ajpq.artifact import slim_structure

    check_target(target)
    model = _on(model, torch.device("cpu"))
    example = torch.randn(batch, *input_shape)
    shapes = _layer_inputs(model, analysis, example)
    grids = {}
    for layer in analysis.layers:
        outs = kept_grid(layer.out_channels)
        grids[layer.name] = (
            np.array([layer.in_channels]) if _is_grouped(layer) else kept_grid(layer.in_channels),
            outs,
        )
    total = sum(g[0].size * g[1].size for g in grids.values()) + 2
    disable = not progress or os.environ.get("AJPQ_NO_PROGRESS") == "1"
    bar = tqdm(
        total=total, desc=f"latency table ({target}, batch {batch})", unit="timing", disable=disable, leave=False
    )

    def timed(module: nn.Module, x: torch.Tensor) -> float:
        bar.update(1)
        return median_ms(runner(module, x, target), repeats, calls=3, seconds=0.02)

    layers: dict[str, LayerLatency] = {}
    with torch.no_grad():
        for layer in analysis.layers:
            module = layer_module(model, layer.name)
            ins, outs = grids[layer.name]
            ms = np.zeros((ins.size, outs.size))
            for j, kout in enumerate(outs):
                for i, kin in enumerate(ins):
                    # a grouped layer's inputs are pruned with its outputs (they are one coupled group)
                    k_in = (
                        max(1, round(int(kout) * layer.in_channels / layer.out_channels))
                        if _is_grouped(layer)
                        else int(kin)
                    )
                    x = _example_input(shapes[layer.name], module, k_in)
                    ms[i, j] = timed(_sliced(module, layer, k_in, int(kout)), x)
            layers[layer.name] = LayerLatency(layer.name, ins, outs, ms, 0.0, layer.out_channels)
        reference = timed(model, example)
        full = slim_structure(model, analysis, None, input_shape)
        full_ms = timed(full, example)
    bar.close()
    covered = sum(entry.predict(int(entry.in_grid[-1]), entry.out_channels) for entry in layers.values())
    residual = max(0.0, full_ms - covered)
    volume = {layer.name: layer.out_channels * layer.out_hw for layer in analysis.layers}
    for name, entry in layers.items():
        entry.residual_ms = residual * volume[name] / sum(volume.values())
    return LatencyTable(
        model_name=model_name,
        fingerprint=analysis.fingerprint,
        target=target,
        batch=batch,
        reference_ms=reference,
        layers=layers,
        machine=machine_signature(target),
        measured=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        full_slim_ms=full_ms,
    )


def table_path(cache: Path, model_name: str, analysis: ModelAnalysis, target: str, batch: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)[:80]
    digest = signature_digest(machine_signature(target))
    return cache / f"{safe}__{analysis.fingerprint[:16]}__{target}__b{batch}__{digest}.json"


def load_or_measure_table(
    model: nn.Module,
    analysis: ModelAnalysis,
    input_shape: tuple[int, ...],
    *,
    target: str,
    batch: int,
    model_name: str,
    cache: Path | None,
    progress: bool = True,
) -> tuple[LatencyTable, bool]:
    """The cached table of this model, target, batch and machine, or a new measurement (then cached).

    Returns the table and whether it came from the cache. A damaged cache file is measured anew, not trusted.
    """
    check_target(target)
    path = None if cache is None else table_path(cache, model_name, analysis, target, batch)
    if path is not None and path.is_file():
        try:
            table = LatencyTable.load(path, analysis)
        except LatencyError:
            table = None
        if table is not None and table.target == target and table.batch == batch:
            return table, True
    table = measure_table(
        model, analysis, input_shape, target=target, batch=batch, model_name=model_name, progress=progress
    )
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            table.save(path)
        except OSError:
            pass  # a read-only cache only costs a re-measurement next time
    return table, False


def warn_if_other_machine(table: LatencyTable, source: str) -> None:
    """Log a warning when ``table`` was measured on a machine unlike this one (its predictions may not hold)."""
    difference = table.machine_difference()
    if difference is not None:
        log(
            f"warning: {source} was measured on another machine or set-up ({difference}); its latency predictions "
            "may not hold here. A new search measures a table for this machine"
        )


__all__ = [
    "KEPT_GRID",
    "LATENCY_TARGETS",
    "LatencyError",
    "LatencyTable",
    "LayerLatency",
    "check_target",
    "latency_report",
    "load_or_measure_table",
    "machine_signature",
    "measure_latency",
    "measure_table",
    "median_ms",
    "runner",
]
