"""Evaluation reports: the numbers ``ajpq evaluate`` prints, of the FP32 model, of a policy, or of an artifact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ajpq.artifact import _load_slim, base_model, model_record, read_artifact
from ajpq.checkpoint import load_checkpoint, load_weights
from ajpq.cost import CostModel
from ajpq.data import DataSplits, load_dataset
from ajpq.errors import DataError, ModelError
from ajpq.latency import latency_report
from ajpq.logs import log
from ajpq.models import build_model
from ajpq.policy import Policy
from ajpq.reference import reference_cache_path
from ajpq.train import evaluate_accuracy
from ajpq.workspace import Workspace, WorkspaceSpec


def inspect_report(workspace: Workspace) -> dict[str, Any]:
    """What ``ajpq inspect --json`` prints: the compressible layers, the coupled groups and the FP32 costs."""
    analysis = workspace.analysis
    cost = CostModel(analysis)
    layers = [
        {
            "name": layer.name,
            "type": layer.type,
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel_size": list(layer.kernel_size),
            "stride": list(layer.stride),
            "groups": layer.groups,
            "out_hw": layer.out_hw,
            "params": layer.params,
            "macs": layer.macs,
            "group": layer.group,
        }
        for layer in analysis.layers
    ]
    groups = [
        {
            "id": g.id,
            "channels": g.size,
            "members": g.members,
            "consumers": g.consumers,
            "prunable": g.prunable,
        }
        for g in analysis.groups
    ]
    return {
        "model": workspace.model_name,
        "dataset": workspace.splits.name,
        "input_shape": list(workspace.splits.input_shape),
        "fingerprint": analysis.fingerprint,
        "layers": layers,
        "groups": groups,
        "other_params": analysis.other_params,
        "reference": {"size_bits": cost.reference_size_bits, "bops": cost.reference_bops},
    }


def evaluation_report(workspace: Workspace, policy: Policy | None, split: str) -> dict[str, Any]:
    """Accuracy plus the cost model's figures of the FP32 model (no policy) or of the simulated compressed model."""
    if policy is None:
        costs = workspace.cost_model
        report: dict[str, Any] = {
            "accuracy": workspace.accuracy(None, split),
            "size_bits": costs.reference_size_bits,
            "size_ratio": 1.0,
            "compression_rate": 1.0,
            "bops": costs.reference_bops,
            "bops_ratio": 1.0,
            "reference_size_bits": costs.reference_size_bits,
            "reference_bops": costs.reference_bops,
        }
    else:
        report = {"accuracy": workspace.accuracy(policy, split), **workspace.cost(policy).as_dict()}
    return report


@dataclass
class ArtifactEvaluation:
    """An artifact measured on a split: its accuracy, its bytes and its CPU latency next to the FP32 model's."""

    name: str
    """The model the artifact was exported from."""
    dataset: str
    accuracy: float
    file_bytes: int
    payload_bytes: int
    header_bytes: int
    latency_ms: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        """What ``ajpq evaluate --artifact A --json`` prints."""
        return {
            "accuracy": self.accuracy,
            "file_bytes": self.file_bytes,
            "payload_bytes": self.payload_bytes,
            "header_bytes": self.header_bytes,
            "latency_ms": self.latency_ms,
        }


def _fp32_reference(model: torch.nn.Module, name: str, splits: DataSplits, weights: str | None) -> torch.nn.Module:
    """The FP32 model to time next to the artifact (weights do not change CPU latency, so none are trained)."""
    if weights is not None:
        load_weights(model, load_checkpoint(weights), name, str(weights))
        return model
    cached = reference_cache_path(name, splits)
    if cached.is_file():
        load_weights(model, load_checkpoint(cached), name, str(cached))
    else:
        log(f"no --weights and no cached reference for {name}: timing the FP32 architecture with fresh weights")
    return model


def evaluate_artifact(path: str | Path, spec: WorkspaceSpec, split: str = "test") -> ArtifactEvaluation:
    """Rebuild the slim model of an artifact and measure it on ``spec``'s data.

    Only a model of the user's own (``spec.model`` of the form ``pkg.mod:factory``) is imported; a factory named in
    the file is refused. ``spec.weights`` are the FP32 weights timed next to it (default: the cached reference).
    """
    source = str(path)
    artifact = read_artifact(path)
    info = model_record(artifact.header, source)
    user_model = None
    if ":" in spec.model:  # the user's own factory, named on the command line (never the file's name)
        user_model = build_model(spec.model, tuple(info["input_shape"]), info["num_classes"])
    fp32_model = base_model(artifact.header, user_model, source)  # refuses a file-named factory up front
    splits = load_dataset(spec.dataset, data_dir=spec.data_dir, split_seed=spec.split_seed, val_size=spec.val_size)
    if tuple(splits.input_shape) != tuple(info["input_shape"]) or splits.num_classes != info["num_classes"]:
        raise DataError(
            f"{path} takes inputs {tuple(info['input_shape'])} with {info['num_classes']} classes, but "
            f"{splits.name} has {tuple(splits.input_shape)} and {splits.num_classes}; use the dataset it was "
            f"exported on ({info.get('dataset')})"
        )
    try:
        slim = _load_slim(artifact.header, artifact.payload, fp32_model, source)
    except ModelError as exc:
        raise ModelError(f"{path}: cannot rebuild model {info['name']!r}: {exc}") from None
    accuracy = evaluate_accuracy(slim, splits.val if split == "val" else splits.test)
    name = spec.model if user_model is not None else info["name"]
    fp32 = _fp32_reference(fp32_model, name, splits, spec.weights)
    return ArtifactEvaluation(
        name=info["name"],
        dataset=splits.name,
        accuracy=accuracy,
        file_bytes=artifact.file_bytes,
        payload_bytes=artifact.payload_bytes,
        header_bytes=artifact.header_bytes,
        latency_ms=latency_report(slim, fp32, splits.input_shape),
    )
