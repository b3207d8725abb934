"""The run folder every search method writes, and reads back on ``--resume`` and ``ajpq export``.

Layout of ``runs/<model>__<dataset>__<seed>__<YYYYmmdd-HHMMSS>/``:

* ``config.yaml``: the search configuration as a ``default:`` block (usable again with ``--config``);
* ``run.json``: what the run was made on (model fingerprint, digest of the FP32 weights, FP32 accuracy, method, device
  and the versions of AJPQ, Python, torch, numpy, Gymnasium and stable-baselines3);
* ``episodes.jsonl``: one JSON line per evaluated episode (episode, reward, accuracy, size_ratio, bops_ratio,
  feasible, wall_time, ...), flushed line by line;
* ``policies.jsonl``: the policy of each episode, compactly (one digit per channel), for ``ajpq export --episode``;
* ``best_policy.json``: the best feasible policy with its metrics, a valid policy file, rewritten atomically;
* ``checkpoint/``: the method's state (``state.json`` names the checkpointed episode count; it is written last);
* ``tb/``: TensorBoard events;
* ``run.lock``: locked (``flock``) by the process writing the run, and holding its pid; the OS releases the lock when
  that process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ajpq._version import __version__
from ajpq.errors import ArtifactError, ConfigError
from ajpq.io import atomic_write_json, atomic_write_text, parse_json, parse_yaml, read_text
from ajpq.logs import log
from ajpq.policy import LayerPolicy, Policy, check_weight_sparsity, load_policy

EPISODES_FILE = "episodes.jsonl"
POLICIES_FILE = "policies.jsonl"
BEST_POLICY_FILE = "best_policy.json"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run.json"
STATE_FILE = "state.json"
LOCK_FILE = "run.lock"
TIME_KEYS: tuple[str, ...] = ("wall_time", "eval_time")
"""Keys of an episode record that measure time (the only ones that differ between two runs with the same seed)."""


def encode_policy(policy: Policy) -> dict[str, Any]:
    """A compact JSON form of a policy: one digit per channel, activation bits, and any weight sparsity."""
    encoded: dict[str, Any] = {
        "bits": {name: "".join(str(int(b)) for b in layer.weight_bits) for name, layer in policy.layers.items()},
        "abits": {name: int(layer.activation_bits) for name, layer in policy.layers.items()},
    }
    sparsity = {name: float(layer.weight_sparsity) for name, layer in policy.layers.items() if layer.weight_sparsity}
    if sparsity:
        encoded["sparsity"] = sparsity
    return encoded


def decode_policy(
    data: dict[str, Any], model_name: str | None, fingerprint: str | None, source: str = POLICIES_FILE
) -> Policy:
    """Inverse of :func:`encode_policy`; a malformed record is refused in one line naming ``source``."""
    bits, abits, sparsity = data.get("bits"), data.get("abits"), data.get("sparsity", {})
    if (
        not isinstance(bits, dict)
        or not isinstance(abits, dict)
        or not isinstance(sparsity, dict)
        or set(abits) != set(bits)
        or not set(sparsity) <= set(bits)
        or not all(isinstance(d, str) and d and set(d) <= set("012345678") for d in bits.values())
        or not all(_is_plain_int(a) for a in abits.values())
    ):
        raise ArtifactError(
            f"{source}: not a recorded policy (bits: one digit 0-8 per channel, abits: an integer per layer); "
            f"{_DAMAGED}"
        )
    layers = {
        name: LayerPolicy(
            np.frombuffer(digits.encode("ascii"), dtype=np.uint8).astype(np.int64) - ord("0"),
            int(abits[name]),
            check_weight_sparsity(sparsity.get(name, 0.0), f"{source}: sparsity of {name!r}"),
        )
        for name, digits in bits.items()
    }
    return Policy(layers=layers, model_name=model_name, fingerprint=fingerprint)


def _check_state(state: dict[str, Any], path: Path) -> None:
    """The fields of ``state.json`` the resume reads, checked: a slot folder name, the best episode's record, the
    random states and the method's state (a crafted file is refused in one line, not deep inside the method)."""
    best, rng, slot = state.get("best"), state.get("rng"), state.get("slot")
    problems = []
    if slot is not None and not (isinstance(slot, str) and slot.startswith("ep") and slot[2:].isdigit()):
        problems.append("slot is not a checkpoint folder name (epNNNNNN)")
    if best is not None and not (
        isinstance(best, dict)
        and _is_plain_int(best.get("episode"))
        and all(
            isinstance(best.get(k), int | float) and not isinstance(best.get(k), bool) for k in ("reward", "accuracy")
        )
    ):
        problems.append("best is not an episode record (episode, reward, accuracy)")
    if rng is not None and not (
        isinstance(rng, dict)
        and isinstance(rng.get("python"), str)
        and isinstance(rng.get("numpy"), list)
        and isinstance(rng.get("torch"), list)
    ):
        problems.append("rng is not the random states a checkpoint records")
    if not isinstance(state.get("method_state", {}), dict):
        problems.append("method_state is not an object")
    if problems:
        raise ArtifactError(f"{path} is not a checkpoint state ({'; '.join(problems)}); start a new run")


def _is_plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def best_by_phase(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The best feasible episode (highest reward, earliest on ties) of each ``phase`` the records name, in the order
    of their first feasible episodes: what each part of a search (``ajpq``'s warm start, RL episodes and refinement)
    found, so a user sees whether the RL improved on its start."""
    best: dict[str, dict[str, Any]] = {}
    for record in records:
        phase = record.get("phase")
        if (
            phase is not None
            and record.get("feasible")
            and (phase not in best or record["reward"] > best[phase]["reward"])
        ):
            best[phase] = {key: record[key] for key in ("episode", "reward", "accuracy")}
    return best


def software_environment(device: torch.device | None = None) -> dict[str, str]:
    """The versions (and the device) that decide a run's numbers: a seed repeats a run only on the same ones (torch
    does not promise bit-identical results across versions, builds and devices, so even the cached FP32 reference
    differs)."""
    import gymnasium
    import stable_baselines3

    environment = {
        "ajpq": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "gymnasium": gymnasium.__version__,
        "stable_baselines3": stable_baselines3.__version__,
    }
    if device is not None:
        environment["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return environment


_DAMAGED = "the run folder is damaged: restore the file from a copy, or start a new run"


EPISODE_FIELDS: dict[str, tuple[type, ...]] = {"reward": (int, float), "accuracy": (int, float), "feasible": (bool,)}
"""Fields every episode record has, and that readers of a run use (:func:`best_by_phase`, ``ajpq export``)."""
EPISODE_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {"phase": (str,), "latency_ratio": (int, float)}
"""Fields some episode records have (a phased method's, a latency-budgeted search's), of these types when present."""


def _read_jsonl(
    path: Path,
    fields: dict[str, tuple[type, ...]] | None = None,
    optional: dict[str, tuple[type, ...]] | None = None,
) -> list[dict[str, Any]]:
    """The records of a JSON-lines file of the run folder, each an object with an integer ``episode``.

    Only a torn last line (no newline: a process killed mid-write) is dropped; any other line that is not such a
    record refuses the whole file with one line naming it and the line (a reader that stopped there would make a
    resume rewrite the file without every later episode).
    """
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror}") from None
    records = []
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1] follows the last newline: empty, or torn
        record = parse_json(line, f"{path}, line {number}", "episode record", ArtifactError, _DAMAGED)
        episode = record.get("episode") if isinstance(record, dict) else None
        if isinstance(episode, bool) or not isinstance(episode, int) or episode < 1:
            raise ArtifactError(
                f"{path}, line {number}: not an episode record (an object with an integer episode >= 1); {_DAMAGED}"
            )
        checked = {**(fields or {}), **{k: t for k, t in (optional or {}).items() if k in record}}
        for key, types in checked.items():
            value = record.get(key)
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                raise ArtifactError(
                    f"{path}, line {number}: episode {episode} has no {key} of type "
                    f"{' or '.join(t.__name__ for t in types)}; {_DAMAGED}"
                )
        records.append(record)
    return records


def bit_allocation_figure(policy: Policy, importance: dict[str, np.ndarray] | None = None) -> Any:
    """A matplotlib figure of a policy: one labelled row per layer, its channels left to right in decreasing
    importance (when given), coloured by weight bits on a 1..8 scale with a colour bar; pruned channels in red."""
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure

    names = list(policy.layers)
    width = max(len(layer.weight_bits) for layer in policy.layers.values())
    grid = np.full((len(names), width), np.nan)
    for row, name in enumerate(names):
        bits = policy.layers[name].weight_bits
        order = np.arange(bits.size)
        if importance is not None and name in importance and len(importance[name]) == bits.size:
            order = np.argsort(-np.asarray(importance[name]), kind="stable")
        grid[row, : bits.size] = bits[order]
    viridis = colormaps["viridis"]
    colors = np.vstack([[0.839, 0.153, 0.157, 1.0], viridis(np.linspace(0.0, 1.0, 8))])  # red, then 1..8 bits
    cmap = ListedColormap(colors).with_extremes(bad="white")
    figure = Figure(figsize=(10, 1.2 + 0.32 * len(names)), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(
        np.ma.masked_invalid(grid),
        cmap=cmap,
        norm=BoundaryNorm(np.arange(-0.5, 9.5), 9),
        aspect="auto",
        interpolation="nearest",
    )
    axes.set_yticks(range(len(names)), names, fontsize=8)
    order_text = "in decreasing importance" if importance is not None else "by index"
    axes.set_xlabel(f"output channels, {order_text} (white: layer has fewer channels)")
    axes.set_title("weight bits per channel (red: pruned)")
    bar = figure.colorbar(image, ax=axes, ticks=range(9), pad=0.01)
    bar.set_label("bits")
    bar.ax.set_yticklabels(["0 pruned", *(str(b) for b in range(1, 9))])
    return figure


class RunDir:
    """One run folder (see the module docstring); used by every search method."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._writer: Any = None
        self._purge_step: int | None = None
        self._lock: Any = None

    def lock(self) -> None:
        """Take the run folder for this process: a second search or ``--resume`` of it is refused, naming our pid.

        ``flock`` on ``run.lock``; the lock goes with the process (kill -9 included), so a stale file never blocks.
        """
        if self._lock is not None:
            return
        path = self.path / LOCK_FILE
        try:
            handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="ascii")
        except OSError as exc:
            raise ConfigError(f"cannot lock run folder {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = handle.read(32).strip() or "unknown"
            handle.close()
            raise ConfigError(
                f"run folder {self.path} is in use by another ajpq process (pid {other}); wait for it to end or stop "
                "it, then --resume"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle  # closed (and so unlocked) by unlock(), or when this object is collected

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @classmethod
    def create(cls, root: str | Path, model: str, dataset: str, seed: int, *, path: str | Path | None = None) -> RunDir:
        """Make a new run folder under ``root`` (or exactly at ``path``), refusing to reuse a non-empty one."""
        if path is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            safe, data = (name.replace(":", "_").replace("/", "_") for name in (model, dataset))
            base = Path(root) / f"{safe}__{data}__{seed}__{stamp}"
            candidate, suffix = base, 1
            while candidate.exists():
                suffix += 1
                candidate = base.with_name(f"{base.name}-{suffix}")
        else:
            candidate = Path(path)
            if candidate.exists() and any(candidate.iterdir()):
                raise ConfigError(
                    f"run folder {candidate} already exists and is not empty; pick another --run-dir, "
                    f"or continue it with --resume {candidate}"
                )
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create run folder {candidate}: {exc.strerror}; pick another --run-dir") from None
        run = cls(candidate)
        run.lock()
        return run

    @classmethod
    def open(cls, path: str | Path, what: str = "--resume") -> RunDir:
        """An existing run folder; refuse a path that is not one with a message that says so."""
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{what} {path}: no such run folder; give a folder made by `ajpq search` (runs/...)")
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"{what} {path}: not a run folder (it has no {CONFIG_FILE})")
        return cls(path)

    # ---- files -------------------------------------------------------------------------------------------
    @property
    def episodes_path(self) -> Path:
        return self.path / EPISODES_FILE

    @property
    def policies_path(self) -> Path:
        return self.path / POLICIES_FILE

    @property
    def best_policy_path(self) -> Path:
        return self.path / BEST_POLICY_FILE

    @property
    def latency_table_path(self) -> Path:
        """The latency table a search with a latency budget predicts with (:mod:`ajpq.latency`)."""
        return self.path / "latency_table.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tb"

    def write_config(self, config: dict[str, Any]) -> None:
        """Write ``config.yaml`` as a ``default:`` block (the format ``--config`` reads)."""
        text = "# written by ajpq search; reuse it with `ajpq search --config <this file>`\n"
        text += yaml.safe_dump({"default": config}, sort_keys=False)
        atomic_write_text(self.path / CONFIG_FILE, text)

    def read_config(self) -> dict[str, Any]:
        path = self.path / CONFIG_FILE
        data = parse_yaml(read_text(path, str(path), ConfigError), str(path), ConfigError)
        if not isinstance(data, dict) or not isinstance(data.get("default"), dict):
            raise ConfigError(f"{self.path / CONFIG_FILE} has no `default:` block")
        return dict(data["default"])

    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.path / RUN_INFO_FILE, info)

    def read_info(self) -> dict[str, Any]:
        """``run.json`` (empty when the run has none yet); a damaged file is refused in one line."""
        path = self.path / RUN_INFO_FILE
        if not path.is_file():
            return {}
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"cannot read {path}: {exc.strerror}") from None
        info = parse_json(data, str(path), "run record", ArtifactError, _DAMAGED)
        if not isinstance(info, dict):
            raise ArtifactError(f"{path}: expected a JSON object, but got {type(info).__name__}; {_DAMAGED}")
        return info

    def check_resumable(
        self, weights_digest: str, device: torch.device | None = None, val_digest: str | None = None
    ) -> None:
        """Refuse to continue the run on other FP32 weights or other validation data (its episodes would mix two
        references or two scores); note other software, on which the resumed episodes will not repeat an
        uninterrupted run's."""
        info = self.read_info()
        recorded_val = info.get("val_digest")
        if recorded_val is not None and val_digest is not None and recorded_val != val_digest:
            raise ConfigError(
                f"run {self.path} was scored on validation data with digest {recorded_val}, but the validation data "
                f"now has digest {val_digest}; resume with the data the run was made on, or start a new run"
            )
        recorded = info.get("weights_digest")
        if recorded is not None and recorded != weights_digest:
            raise ConfigError(
                f"run {self.path} was made on FP32 weights with digest {recorded}, but the weights now have digest "
                f"{weights_digest}; resume with the weights the run was made on (the file its config.yaml names, or "
                "the cached reference it used, unchanged), or start a new run"
            )
        recorded_env = info.get("environment")
        if isinstance(recorded_env, dict):
            now = software_environment(device)
            changed = [
                f"{k} {recorded_env[k]} -> {now.get(k, 'absent')}"
                for k in recorded_env
                if recorded_env[k] != now.get(k)
            ]
            if changed:
                log(
                    f"note: run {self.path} was made with other software ({', '.join(changed)}); the resumed "
                    "episodes will not repeat an uninterrupted run's exactly"
                )

    # ---- episodes ----------------------------------------------------------------------------------------
    def append_episode(self, record: dict[str, Any], policy: Policy | None = None) -> None:
        """Append one episode line (and its policy line), handed to the OS at once.

        Closing the file after each line is enough for a killed search to keep every finished episode; an fsync per
        line would cost more than a small model's evaluation, and resume truncates to the last checkpoint anyway.
        """
        for path, obj in (
            (self.policies_path, None if policy is None else {"episode": record["episode"], **encode_policy(policy)}),
            (self.episodes_path, record),
        ):
            if obj is None:
                continue
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(obj) + "\n")

    def read_episodes(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.episodes_path, EPISODE_FIELDS, EPISODE_OPTIONAL_FIELDS)

    def check_records(self) -> None:
        """Read both JSON-lines files and every recorded policy (a damaged one refused in one line), so that a
        resume refuses a damaged run before any work."""
        self.read_episodes()
        for row in _read_jsonl(self.policies_path):
            decode_policy(row, None, None, f"{self.policies_path}, episode {row['episode']}")

    def read_policy(self, episode: int, model_name: str | None, fingerprint: str | None) -> Policy:
        """The policy of one recorded episode; :class:`ConfigError` if the run has no such episode."""
        for row in _read_jsonl(self.policies_path):
            if row["episode"] == episode:
                return decode_policy(row, model_name, fingerprint, f"{self.policies_path}, episode {episode}")
        count = len(self.read_episodes())
        raise ConfigError(
            f"run {self.path} has no episode {episode}; it recorded episodes 1 to {count}"
            if count
            else f"run {self.path} has recorded no episode yet"
        )

    def read_policies(self, model_name: str | None, fingerprint: str | None) -> dict[int, Policy]:
        """Every recorded episode's policy, by episode number (one read of ``policies.jsonl``)."""
        return {
            int(row["episode"]): decode_policy(row, model_name, fingerprint) for row in _read_jsonl(self.policies_path)
        }

    def export_policy(self, episode: int | None = None) -> Policy:
        """The run's best feasible policy, or episode ``episode``'s with its metrics and meta (``ajpq export``)."""
        if episode is None:
            if not self.best_policy_path.is_file():
                raise ConfigError(f"run {self.path} has no best_policy.json yet (no feasible episode recorded)")
            return load_policy(self.best_policy_path)
        info = self.read_info()
        config = self.read_config()
        policy = self.read_policy(episode, config.get("model"), info.get("fingerprint"))
        record = next((r for r in self.read_episodes() if r.get("episode") == episode), {})
        policy.metrics = {k: v for k, v in record.items() if k not in ("wall_time", "eval_time")}
        return policy.with_meta(str(config.get("method", "ajpq")), config.get("seed"), run=str(self.path))

    def truncate(self, episodes: int) -> None:
        """Keep the first ``episodes`` records of the JSON-lines files (drops what came after a checkpoint)."""
        read = {self.episodes_path: self.read_episodes(), self.policies_path: _read_jsonl(self.policies_path)}
        kept = {path: [row for row in rows if row["episode"] <= episodes] for path, rows in read.items()}
        for path, rows in kept.items():  # both files read (and checked) before either is rewritten
            atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
        self._purge_step = episodes + 1

    # ---- best policy -------------------------------------------------------------------------------------
    def write_best(self, policy: Policy) -> None:
        """Atomically replace ``best_policy.json`` (the policy carries its metrics and meta)."""
        policy.save(self.best_policy_path)

    # ---- checkpoint state --------------------------------------------------------------------------------
    def save_state(self, state: dict[str, Any]) -> None:
        """Commit a checkpoint: ``state.json`` is written last and atomically, after the files it refers to."""
        atomic_write_json(self.checkpoint_dir / STATE_FILE, state)

    def load_state(self) -> dict[str, Any] | None:
        path = self.checkpoint_dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"cannot read {path}: {exc.strerror}") from None
        state = parse_json(data, str(path), "checkpoint state", ArtifactError, "start a new run")
        if not isinstance(state, dict) or not _is_plain_int(state.get("episode")) or state["episode"] < 0:
            raise ArtifactError(f"{path} is not a checkpoint state (no episode count); start a new run")
        _check_state(state, path)
        return state

    def checkpoint_slot(self, episode: int) -> Path:
        """A fresh folder for the files of the checkpoint at ``episode``."""
        slot = self.checkpoint_dir / f"ep{episode:06d}"
        if slot.exists():
            shutil.rmtree(slot)
        slot.mkdir(parents=True)
        return slot

    def prune_checkpoints(self, keep: Path) -> None:
        """Remove checkpoint slots other than ``keep`` (after ``state.json`` points to it)."""
        for slot in self.checkpoint_dir.glob("ep*"):
            if slot.is_dir() and slot != keep:
                shutil.rmtree(slot, ignore_errors=True)

    # ---- TensorBoard -------------------------------------------------------------------------------------
    @property
    def writer(self) -> Any:
        """A ``SummaryWriter`` on ``tb/`` (after a resume, events past the checkpoint are purged from view)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
        return self._writer

    def add_scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, float(value), step)

    def add_policy_summaries(
        self, policy: Policy, step: int, tag: str = "best_policy", importance: dict[str, np.ndarray] | None = None
    ) -> None:
        """Bit-allocation figure (see :func:`bit_allocation_figure`), histogram of weight bits, the policy as text."""
        self.writer.add_figure(f"{tag}/bits", bit_allocation_figure(policy, importance), step, close=True)
        all_bits = np.concatenate([layer.weight_bits for layer in policy.layers.values()])
        self.writer.add_histogram(f"{tag}/weight_bits", all_bits, step, bins=np.arange(-0.5, 9.5))
        lines = ["| layer | kept | mean bits | act bits |", "|---|---|---|---|"]
        for name, layer in policy.layers.items():
            kept = layer.weight_bits > 0
            mean = float(layer.weight_bits[kept].mean()) if kept.any() else 0.0
            lines.append(f"| {name} | {int(kept.sum())}/{kept.size} | {mean:.2f} | {layer.activation_bits} |")
        self.writer.add_text(f"{tag}/table", "\n".join(lines), step)
        self.writer.add_text(f"{tag}/json", "    " + json.dumps(encode_policy(policy)), step)

    def add_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Hyperparameters as a markdown table and in the HPARAMS plugin (written under the run's own folder)."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in hparams.items()}
        table = "| parameter | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in clean.items())
        self.writer.add_text("hparams/table", table, 0)
        exp, ssi, sei = hparams_summary(clean, metrics)
        file_writer = self.writer.file_writer
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, 0)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        self.unlock()
