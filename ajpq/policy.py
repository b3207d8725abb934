"""The policy file: per-output-channel weight bits (0 = removed) and per-layer activation bits, as versioned JSON.

It is the contract between every part of AJPQ: searches write it, ``evaluate``/``finetune``/``export-model`` read
it, and a user can edit it by hand. Loading validates it completely against the model it is applied to.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ajpq._version import __version__
from ajpq.analysis import ModelAnalysis
from ajpq.errors import PolicyError, shown
from ajpq.io import atomic_write_json, parse_json
from ajpq.quant import ACTIVATION_BITS_ALLOWED, MAX_WEIGHT_BITS

POLICY_FORMAT = "ajpq-policy"
POLICY_VERSION = 2
READABLE_VERSIONS: tuple[int, ...] = (1, 2)
"""Version 1: channel bits and activation bits. Version 2 adds an optional per-layer ``weight_sparsity``."""
DEFAULT_WEIGHT_BITS = 8
DEFAULT_ACTIVATION_BITS = 8
_LAYER_KEYS_V1 = ("name", "weight_bits", "activation_bits")
_LAYER_KEYS = (*_LAYER_KEYS_V1, "weight_sparsity")
_TOP_KEYS = ("format", "version", "model", "layers", "metrics", "meta")


@dataclass
class LayerPolicy:
    """Bits of one layer: ``weight_bits[c]`` for output channel ``c`` and the bits of its input activations.

    ``weight_sparsity`` (policy version 2) is the fraction of the kept channels' weights (those reading kept inputs)
    removed by magnitude inside the layer, in ``[0, 1)``; 0 keeps the layer dense.
    """

    weight_bits: np.ndarray
    activation_bits: int = DEFAULT_ACTIVATION_BITS
    weight_sparsity: float = 0.0

    def __post_init__(self) -> None:
        self.weight_bits = np.asarray(self.weight_bits, dtype=np.int64)
        self.weight_sparsity = check_weight_sparsity(self.weight_sparsity, "weight_sparsity")

    @property
    def sparse(self) -> bool:
        return self.weight_sparsity > 0

    @property
    def kept(self) -> np.ndarray:
        return self.weight_bits > 0


@dataclass
class Policy:
    """A complete or partial compression policy; :func:`validate_policy` completes and checks it for a model."""

    layers: dict[str, LayerPolicy]
    model_name: str | None = None
    fingerprint: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def uniform(
        cls,
        analysis: ModelAnalysis,
        weight_bits: int = DEFAULT_WEIGHT_BITS,
        activation_bits: int = DEFAULT_ACTIVATION_BITS,
    ) -> Policy:
        """The same bits for every channel of every layer (nothing pruned unless ``weight_bits`` is 0)."""
        return cls(
            layers={
                layer.name: LayerPolicy(np.full(layer.out_channels, weight_bits, dtype=np.int64), activation_bits)
                for layer in analysis.layers
            },
            model_name=analysis.model_name,
            fingerprint=analysis.fingerprint,
        )

    def group_kept(self, analysis: ModelAnalysis, group_id: int, member: str | None = None) -> np.ndarray:
        """Which channels of coupled group ``group_id`` the policy keeps, indexed by group channel.

        Read from layer ``member`` (default: the group's first member; in a validated policy every member agrees).
        """
        group = analysis.groups[group_id]
        name = group.members[0] if member is None else member
        kept = np.empty(group.size, dtype=bool)
        kept[analysis.out_root[name]] = self.layers[name].kept
        return kept

    def prune_group(self, analysis: ModelAnalysis, group_id: int, channels: Sequence[int] | np.ndarray) -> None:
        """Give group channels ``channels`` of coupled group ``group_id`` 0 bits in every member layer (coupled
        channels are removed together)."""
        for member in analysis.groups[group_id].members:
            self.layers[member].weight_bits[np.isin(analysis.out_root[member], channels)] = 0

    def copy(self) -> Policy:
        return Policy(
            layers={
                k: LayerPolicy(v.weight_bits.copy(), v.activation_bits, v.weight_sparsity)
                for k, v in self.layers.items()
            },
            model_name=self.model_name,
            fingerprint=self.fingerprint,
            metrics=dict(self.metrics),
            meta=dict(self.meta),
        )

    def to_dict(self) -> dict[str, Any]:
        model: dict[str, Any] = {"name": self.model_name}
        if self.fingerprint:
            model["fingerprint"] = self.fingerprint
        return {
            "format": POLICY_FORMAT,
            "version": POLICY_VERSION,
            "model": model,
            "layers": [_layer_dict(name, layer) for name, layer in self.layers.items()],
            "metrics": _jsonable(self.metrics),
            "meta": _jsonable(self.meta),
        }

    def save(self, path: str | Path) -> Path:
        """Write the policy atomically (a reader never sees a half-written file)."""
        return atomic_write_json(path, self.to_dict())

    def with_meta(self, method: str, seed: int | None = None, **extra: Any) -> Policy:
        """A copy stamped with how and when it was made."""
        policy = self.copy()
        policy.meta = {
            "method": method,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ajpq_version": __version__,
            "seed": seed,
            **extra,
        }
        return policy


def _layer_dict(name: str, layer: LayerPolicy) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "weight_bits": [int(b) for b in layer.weight_bits],
        "activation_bits": int(layer.activation_bits),
    }
    if layer.weight_sparsity > 0:
        entry["weight_sparsity"] = float(layer.weight_sparsity)
    return entry


def check_weight_sparsity(value: Any, where: str) -> float:
    """``value`` as a float in ``[0, 1)``, or a :class:`PolicyError` saying what is allowed."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise PolicyError(
            f"{where} must be a number in [0, 1) (the fraction of the layer's weights removed by magnitude), "
            f"but got {json.dumps(value) if isinstance(value, str | bool | None) else type(value).__name__}"
        )
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise PolicyError(
            f"{where} must be in [0, 1) (the fraction of the layer's weights removed by magnitude; 0 = dense), "
            f"but got {number!r}"
        )
    return number


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def policy_from_dict(data: Any, source: str = "policy") -> Policy:
    """Parse the JSON structure of a policy file (no model needed); raise :class:`PolicyError` on any defect."""
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: expected a JSON object at the top level, but got {type(data).__name__}")
    if data.get("format") != POLICY_FORMAT:
        raise PolicyError(
            f'{source}: not an AJPQ policy (expected "format": "{POLICY_FORMAT}", but got '
            f"{shown(data.get('format'))}); export one with `ajpq export` or write it by the README's format"
        )
    version = data.get("version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_VERSIONS)
        raise PolicyError(
            f"{source}: policy format version {shown(version)} is not readable by this build of AJPQ, "
            f"which reads version(s) {readable}; upgrade AJPQ or re-export the policy"
        )
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise PolicyError(f"{source}: unknown top-level key(s) {unknown}; expected some of {list(_TOP_KEYS)}")
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise PolicyError(f'{source}: "model" must be an object with "name" and optional "fingerprint"')
    fingerprint = model.get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise PolicyError(f'{source}: "model.fingerprint" must be a hex string, but got {shown(fingerprint)}')
    raw_layers = data.get("layers")
    if not isinstance(raw_layers, list):
        raise PolicyError(f'{source}: "layers" must be a list of {{"name", "weight_bits", ...}} objects')
    layers: dict[str, LayerPolicy] = {}
    for position, entry in enumerate(raw_layers):
        where = f"{source}: layers[{position}]"
        if not isinstance(entry, dict):
            raise PolicyError(f"{where} must be an object, but got {type(entry).__name__}")
        allowed = _LAYER_KEYS if version >= 2 else _LAYER_KEYS_V1
        extra = sorted(set(entry) - set(allowed))
        if extra:
            hint = ' ("weight_sparsity" needs "version": 2)' if "weight_sparsity" in extra else ""
            raise PolicyError(f"{where}: unknown key(s) {extra}; a layer entry has {list(allowed)}{hint}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise PolicyError(f'{where}: "name" must be the layer\'s qualified module name, but got {name!r}')
        where = f"{source}: layer '{name}'"
        if name in layers:
            raise PolicyError(f"{where} appears twice; give each layer once")
        bits = entry.get("weight_bits")
        if not isinstance(bits, list) or not bits:
            raise PolicyError(f'{where}: "weight_bits" must be a non-empty list with one integer per channel')
        bad = [(i, b) for i, b in enumerate(bits) if not _is_int(b) or not 0 <= b <= MAX_WEIGHT_BITS]
        if bad:
            index, value = bad[0]
            raise PolicyError(
                f"{where}: weight bits must be integers from 0 to {MAX_WEIGHT_BITS} (0 removes the channel), "
                f"but channel {index} has {shown(value)}"
                + (f" ({len(bad)} channels are out of range)" if len(bad) > 1 else "")
            )
        act = entry.get("activation_bits", DEFAULT_ACTIVATION_BITS)
        if not _is_int(act) or act not in ACTIVATION_BITS_ALLOWED:
            raise PolicyError(
                f"{where}: activation_bits must be one of {list(ACTIVATION_BITS_ALLOWED)} (32 = unquantized), "
                f"but got {shown(act)}"
            )
        sparsity = check_weight_sparsity(entry.get("weight_sparsity", 0.0), f'{where}: "weight_sparsity"')
        layers[name] = LayerPolicy(np.asarray(bits, dtype=np.int64), int(act), sparsity)
    metrics = data.get("metrics", {}) or {}
    meta = data.get("meta", {}) or {}
    if not isinstance(metrics, dict) or not isinstance(meta, dict):
        raise PolicyError(f'{source}: "metrics" and "meta" must be objects when given')
    return Policy(layers=layers, model_name=model.get("name"), fingerprint=fingerprint, metrics=metrics, meta=meta)


def validate_policy(policy: Policy, analysis: ModelAnalysis, source: str = "policy") -> Policy:
    """Check ``policy`` against a model and return a complete copy (left-out layers get 8/8 bits).

    Raises :class:`PolicyError` with one message naming the first defect and what to do about it.
    """
    if policy.fingerprint and policy.fingerprint != analysis.fingerprint:
        raise PolicyError(
            f"{source}: made for model '{policy.model_name}' with fingerprint {policy.fingerprint}, but "
            f"'{analysis.model_name}' has fingerprint {analysis.fingerprint} (other layers or weight shapes); "
            'use a policy searched on this model, or remove "fingerprint" to apply it by layer names'
        )
    complete = Policy.uniform(analysis)
    complete.model_name = policy.model_name or analysis.model_name
    complete.fingerprint = analysis.fingerprint
    complete.metrics = dict(policy.metrics)
    complete.meta = dict(policy.meta)
    for name, layer_policy in policy.layers.items():
        if not analysis.has_layer(name):
            close = difflib.get_close_matches(name, analysis.layer_names, n=1, cutoff=0.4)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise PolicyError(
                f"{source}: model '{analysis.model_name}' has no compressible layer '{name}'{hint} "
                f"(`ajpq inspect` lists its {len(analysis.layers)} layers)"
            )
        layer = analysis.layer(name)
        if layer_policy.weight_bits.shape != (layer.out_channels,):
            raise PolicyError(
                f"{source}: layer '{name}' has {layer.out_channels} output channels, but weight_bits has "
                f"{layer_policy.weight_bits.size} entries; give one entry per channel"
            )
        complete.layers[name] = LayerPolicy(
            layer_policy.weight_bits.copy(), layer_policy.activation_bits, layer_policy.weight_sparsity
        )

    for name, layer_policy in complete.layers.items():
        kept = layer_policy.kept
        group = analysis.group_of(name)
        if not group.prunable and not kept.all():
            pruned = np.flatnonzero(~kept).tolist()
            raise PolicyError(
                f"{source}: layer '{name}' cannot be pruned ({group.status}), but channels "
                f"{_short(pruned)} have 0 bits; give them 1 to 8 bits"
            )
        if not kept.any():
            raise PolicyError(
                f"{source}: every channel of layer '{name}' has 0 bits, which would cut the network; "
                "keep at least one channel"
            )
    for group in analysis.groups:
        if len(group.members) < 2:
            continue
        reference_name = group.members[0]
        reference = complete.group_kept(analysis, group.id)
        for member in group.members[1:]:
            kept = complete.group_kept(analysis, group.id, member)
            differ = np.flatnonzero(kept != reference)
            if differ.size:
                channel = int(differ[0])
                state = "pruned" if not reference[channel] else "kept"
                other = "kept" if not reference[channel] else "pruned"
                raise PolicyError(
                    f"{source}: coupled channels disagree in group {group.id} (layers {', '.join(group.members)}):"
                    f" channel {channel} is {state} in '{reference_name}' but {other} in '{member}'; coupled "
                    "channels must be all 0 bits or all non-0"
                    + (f" ({differ.size} channels differ)" if differ.size > 1 else "")
                )
    return complete


def _short(values: list[int], limit: int = 8) -> str:
    text = ", ".join(str(v) for v in values[:limit])
    return f"[{text}{', ...' if len(values) > limit else ''}]"


def load_policy(path: str | Path, analysis: ModelAnalysis | None = None) -> Policy:
    """Read a policy file; with ``analysis``, validate it against that model and complete it."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"policy file {source} does not exist; export one with `ajpq export`") from None
    except IsADirectoryError:
        raise PolicyError(f"policy file {source} is a folder; give the policy's .json file") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(
            f"{source}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); a policy file is the "
            "JSON written by `ajpq export` or `ajpq inspect --write-policy`"
        ) from None
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {source}: {exc.strerror}") from None
    data = parse_json(text, source, "policy file", PolicyError, "the file may be truncated or not a policy")
    policy = policy_from_dict(data, source)
    return validate_policy(policy, analysis, source) if analysis is not None else policy
