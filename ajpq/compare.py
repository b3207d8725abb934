"""``ajpq compare``: every method at every budget on one model, fine-tuned alike, in one table and one plot.

For each size budget and each method, the method runs through :func:`ajpq.runner.run_search` (each in its own run
folder under ``out_dir``; ajpq, local and random with the config's ``search`` options, the others with their
``method_options``), its policy is fine-tuned for
the same ``finetune_epochs`` with :func:`ajpq.qat.finetune` (on the method's weights: the retrained ones for
OLMP and ADMM; distilled from the FP32 reference), exported (``model.ajpq`` in the method's run folder), and one row is
written: method, budget, size and BOPs compression, validation and test accuracy before and after fine-tuning, search
wall time and evaluations, and for the exported artifact its file bytes, its own test accuracy (measured on the slim
model rebuilt from the file) and its CPU latency at batch 1 and 64 next to the FP32 model's. Outputs:
``compare.csv``, ``compare.md`` (markdown table) and ``compare_pareto.png`` (test accuracy after fine-tuning against
compression rate, log x).
"""

from __future__ import annotations

import copy
import csv
import difflib
import io
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from ajpq.analysis import weights_digest
from ajpq.artifact import build_artifact, load_compressed
from ajpq.backends import BackendOptions, default_threads
from ajpq.budget import Budget, parse_ratio
from ajpq.config import check_int, load_config_file
from ajpq.errors import AJPQError, ConfigError
from ajpq.io import atomic_write_bytes, atomic_write_text
from ajpq.latency import check_target_name, latency_report, paired_latency
from ajpq.logs import log
from ajpq.methods import MethodOptions, method_class
from ajpq.methods.common import load_method_weights, simulate
from ajpq.policy import Policy, load_policy
from ajpq.qat import FinetuneResult, finetune, finetune_config
from ajpq.runner import run_search
from ajpq.runs import software_environment
from ajpq.search_config import SearchConfig
from ajpq.train import evaluate_accuracy, seed_everything
from ajpq.workspace import SPEC_KEYS, WorkspaceSpec, open_workspace

ALL_METHODS: tuple[str, ...] = ("ajpq", "local", "random", "uniform", "opq", "olmp", "admm")
LATENCY_METHODS: tuple[str, ...] = ("ajpq", "local", "random", "uniform")
"""The methods that remove channels, so can meet a latency budget."""
SEARCH_METHODS: tuple[str, ...] = ("ajpq", "local", "random")
"""The methods that search ajpq's own space with the search's configuration: the same episodes, proxy and budget
(``local`` is ajpq without its agents, ``random`` without any learning), so their rows differ only in the search."""
COLUMNS: tuple[str, ...] = (
    "method",
    "budget",
    "size_compression",
    "bops_compression",
    "val_before",
    "test_before",
    "val_after",
    "test_after",
    "search_wall_time",
    "evaluations",
    "file_bytes",
    "test_artifact",
    "latency_b1_ms",
    "latency_b64_ms",
    "fp32_latency_b1_ms",
    "fp32_latency_b64_ms",
    "latency_ms",
    "fp32_latency_ms",
    "latency_ratio",
    "latency_ratio_predicted",
)
"""The last four are filled in the rows of latency budgets: the exported model on the latency target and batch."""


@dataclass
class CompareConfig:
    """A comparison (the keys of ``experiments/compare_*.yaml``'s ``default:`` block)."""

    workspace: WorkspaceSpec = field(default_factory=WorkspaceSpec)
    """The model and data (flat keys model, dataset, data_dir, weights, ... as in ``ajpq search``)."""
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    """Methods to run, from ajpq, local, random, uniform, opq, olmp, admm."""
    budgets: list[Any] = field(default_factory=lambda: ["1/16", "1/32", "1/64"])
    """Size budgets as ratios of FP32 (numbers or "1/16" strings)."""
    bops_budgets: list[Any] = field(default_factory=list)
    """BOPs budgets as ratios of FP32, each run as a row of its own (no size budget)."""
    joint_budgets: list[Any] = field(default_factory=list)
    """Size and BOPs budgets met together: each a pair ``[size, bops]`` of ratios (e.g. ``["1/100", "1/300"]``),
    run as a row of its own."""
    latency_budgets: list[Any] = field(default_factory=list)
    """Latency budgets as ratios of the FP32 model's measured latency on ``latency_target`` at ``latency_batch``,
    each a row of its own. Methods that remove no channels (opq, olmp, admm: weight sparsity does not lower dense
    latency) run at the same ratio as a BOPs budget instead; their rows show the latency they reach."""
    latency_target: str = "torch-cpu"
    """Where latency budgets are measured (torch-cpu, onnxruntime-cpu, cuda)."""
    latency_batch: int = 1
    """Batch size latency budgets are measured at."""
    seed: int = 0
    """Seed of every method and of fine-tuning."""
    episodes: int = 100
    """Evaluated episodes of ajpq, local and random (the same for all three)."""
    finetune_epochs: int = 3
    """Fine-tuning epochs given to every result (0: no fine-tuning; 'after' equals 'before')."""
    finetune_lr: float = 0.005
    """Fine-tuning learning rate (OPQ's recipe)."""
    distill: bool = True
    """Fine-tune every result by distilling from the FP32 reference (soft targets mixed with the labels)."""
    learn_ranges: bool = True
    """Fine-tune every result with learned activation ranges (``ajpq finetune``'s default), exported with them; false:
    ranges calibrated after every epoch (``--no-learn-ranges``)."""
    search: dict[str, Any] = field(default_factory=dict)
    """Extra ``ajpq search`` options for ajpq, local and random (keys of its configuration; e.g. the proxy, and
    ``search_activation_bits``, which all then search), so they search the same space with the same score."""
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Options per method name (see each method's DEFAULTS in the README)."""
    out_dir: str = "runs/compare"
    """Folder of the outputs and of one run folder per method and budget."""

    def __post_init__(self) -> None:
        if not isinstance(self.methods, list) or not self.methods:
            raise ConfigError(f"methods must be a non-empty list from {list(ALL_METHODS)}, but got {self.methods!r}")
        for method in self.methods:
            if method not in ALL_METHODS:
                close = difflib.get_close_matches(str(method), ALL_METHODS, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"unknown method {method!r} in methods{hint} (known: {', '.join(ALL_METHODS)})")
        for name in ("budgets", "bops_budgets", "joint_budgets", "latency_budgets"):
            if not isinstance(getattr(self, name), list):
                raise ConfigError(f"{name} must be a list of ratios, but got {getattr(self, name)!r}")
        if not self.budgets and not self.bops_budgets and not self.joint_budgets and not self.latency_budgets:
            raise ConfigError(
                "budgets, bops_budgets, joint_budgets and latency_budgets are all empty; give at least one ratio, "
                "e.g. budgets: [1/16]"
            )
        self.budgets = [parse_ratio("budgets", b) for b in self.budgets]
        self.latency_budgets = [parse_ratio("latency_budgets", b) for b in self.latency_budgets]
        check_target_name(self.latency_target)
        check_int("latency_batch", self.latency_batch, 1)
        self.bops_budgets = [parse_ratio("bops_budgets", b) for b in self.bops_budgets]
        for pair in self.joint_budgets:
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise ConfigError(
                    f"joint_budgets entries must be [size, bops] pairs of ratios such as ['1/100', '1/300'], "
                    f"but got {pair!r}"
                )
        self.joint_budgets = [
            [parse_ratio("joint_budgets size", size), parse_ratio("joint_budgets bops", bops)]
            for size, bops in self.joint_budgets
        ]
        if not isinstance(self.workspace, WorkspaceSpec):
            raise ConfigError(f"workspace must be a WorkspaceSpec, but got {self.workspace!r}")
        for name in ("seed", "episodes", "finetune_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "episodes" else 0):
                raise ConfigError(f"{name} must be a non-negative integer, but got {value!r}")
        for name in ("distill", "learn_ranges"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, but got {getattr(self, name)!r}")
        if not isinstance(self.finetune_lr, int | float) or not self.finetune_lr > 0:
            raise ConfigError(f"finetune_lr must be > 0, but got {self.finetune_lr!r}")
        unknown = sorted(set(self.method_options) - set(ALL_METHODS) - {"ajpq"})
        if unknown:
            raise ConfigError(f"method_options has unknown method(s) {unknown}; use {list(ALL_METHODS[1:])}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CompareConfig:
        """The comparison of flat keys (a YAML ``default:`` block)."""
        rest = {key: value for key, value in values.items() if key not in SPEC_KEYS}
        return cls(workspace=WorkspaceSpec.from_dict(values), **rest)

    def to_dict(self) -> dict[str, Any]:
        """The flat form: the workspace's keys first (what ``compare_config.yaml`` holds)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "workspace"}
        return {**self.workspace.to_dict(), **copy.deepcopy(values)}


CONFIG_KEYS = SPEC_KEYS + tuple(f.name for f in fields(CompareConfig) if f.name != "workspace")


def load_compare_config(path: str | Path, **overrides: Any) -> CompareConfig:
    """Read ``experiments/compare_*.yaml`` (a ``default:`` block), checking every key."""
    values = load_config_file(path, CONFIG_KEYS, "compare")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return CompareConfig.from_dict(values)


def ratio_label(ratio: float) -> str:
    inverse = 1.0 / ratio
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-6 else f"{ratio:g}"


def budget_label(budget: Budget) -> str:
    """ "1/32" for a size budget, "BOPs 1/256" for a BOPs budget (both when both are given)."""
    parts = [] if budget.size is None else [ratio_label(budget.size)]
    if budget.bops is not None:
        parts.append(f"BOPs {ratio_label(budget.bops)}")
    if budget.latency is not None:
        parts.append(f"latency {budget.latency:g}")
    return " + ".join(parts)


def run_folder_name(method: str, label: str) -> str:
    """The run folder of ``method`` at the budget labelled ``label`` inside a compare's ``out_dir``:
    ``ajpq__1_32``, ``opq__BOPs_1_256``."""
    return f"{method}__{label.replace('/', '_').replace(' + ', '__').replace(' ', '_')}"


def compare_budgets(config: CompareConfig) -> list[Budget]:
    """The rows' budgets: each size budget, then each BOPs budget, then each joint one, then each latency one."""
    return (
        [Budget(size=b) for b in config.budgets]
        + [Budget(bops=b) for b in config.bops_budgets]
        + [Budget(size=size, bops=bops) for size, bops in config.joint_budgets]
        + [Budget(latency=b) for b in config.latency_budgets]
    )


def run_result(workspace: Any, run_dir: Path) -> tuple[Policy, nn.Module]:
    """A method's best policy in ``run_dir`` and the weights it applies to (OLMP and ADMM retrain their own)."""
    policy = load_policy(run_dir / "best_policy.json", workspace.analysis)
    model = workspace.model
    if "weights" in policy.meta:
        model = load_method_weights(workspace, Path(policy.meta["weights"]))
    return policy, model


def finetune_result(
    config: CompareConfig, workspace: Any, policy: Policy, model: nn.Module, calibration: Tensor
) -> FinetuneResult:
    """compare's recovery of one result: ``config.finetune_epochs`` of ``ajpq.qat`` (seeded with
    ``config.seed``), distilled from the FP32 reference when ``config.distill``, with learned activation ranges when
    ``config.learn_ranges``, scored on validation and test."""
    return finetune(
        model,
        workspace.analysis,
        policy,
        workspace.splits.train,
        calibration,
        finetune_config(epochs=config.finetune_epochs, lr=config.finetune_lr),
        report={"val": workspace.splits.val, "test": workspace.splits.test},
        device=workspace.device,
        generator=seed_everything(config.seed),
        progress=False,
        distill=config.distill,
        teacher=workspace.model,
        learn_ranges=config.learn_ranges,
    )


def _run_one(config: CompareConfig, workspace: Any, method: str, budget: Budget, out: Path) -> dict[str, Any]:
    """Run one method at one budget, fine-tune its policy, and return its table row."""
    run_path = out / run_folder_name(method, budget_label(budget))
    started = time.perf_counter()
    search_values: dict[str, Any] = {
        **config.workspace.to_dict(),
        "method": method,
        "size_budget": budget.size,
        "bops_budget": budget.bops,
        "episodes": config.episodes,
        "latency_target": config.latency_target,
        "latency_batch": config.latency_batch,
        "seed": config.seed,
        "run_dir": str(run_path),
        "progress": False,
    }
    if budget.latency is not None:
        if method in LATENCY_METHODS:
            search_values["latency_budget"] = budget.latency
        else:  # weight sparsity cannot lower dense latency: the closest budget such a method can meet
            search_values["bops_budget"] = budget.latency
    if method in SEARCH_METHODS:  # the same space, proxy and episodes for all three
        search_values.update(config.search)
    else:  # the method's own defaults for the settings it shares with the search (OLMP's max_sparsity 0.99)
        options_type = method_class(method).Options
        shared = {f.name: f.default for f in fields(options_type) if f.name in MethodOptions.SHARED}
        search_values["method_options"] = {**shared, **config.method_options.get(method, {})}
    result = run_search(SearchConfig.from_dict(search_values), workspace=workspace)
    if result.best is None:
        raise ConfigError(f"{method} found no policy within {budget_label(budget)} in {result.episode_count} episodes")
    policy, model = run_result(workspace, result.run_dir)
    wall = time.perf_counter() - started
    calibration = workspace.calibration_images()
    report = simulate(workspace, None if model is workspace.model else model).cost_model.evaluate(policy)
    tuned = finetune_result(config, workspace, policy, model, calibration)
    before, after = tuned.accuracy_before, tuned.accuracy_after
    if config.finetune_epochs == 0:
        after = dict(before)
    exported = _export_row(
        config,
        workspace,
        tuned.model,
        policy,
        calibration,
        run_path / "model.ajpq",
        tuned.activation_ranges,
        best=result.best if budget.latency is not None else None,
    )
    row = {
        "method": method,
        "budget": budget_label(budget),
        "size_compression": report.compression_rate,
        "bops_compression": report.bops_compression_rate,
        "val_before": before["val"],
        "test_before": before["test"],
        "val_after": after["val"],
        "test_after": after["test"],
        "search_wall_time": wall,
        "evaluations": result.evaluations,
        **exported,
        **({"best_by_phase": result.best_by_phase} if result.best_by_phase else {}),
        "run_dir": str(run_path),
    }
    log(
        f"compare: {method} at {row['budget']}: {row['size_compression']:.1f}x, test accuracy "
        f"{row['test_before']:.4f} -> {row['test_after']:.4f} after {config.finetune_epochs} fine-tuning epochs; "
        f"artifact {row['file_bytes']:,} bytes, test accuracy {row['test_artifact']:.4f}, CPU "
        f"{row['latency_b1_ms']:.3f} ms at batch 1 (FP32 {row['fp32_latency_b1_ms']:.3f} ms)"
    )
    return row


def _export_row(
    config: CompareConfig,
    workspace: Any,
    model: Any,
    policy: Any,
    calibration: Any,
    path: Path,
    activation_ranges: dict[str, tuple[float, bool]],
    best: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export the fine-tuned result and measure the artifact: file bytes, its test accuracy, CPU latency, and with
    ``best`` (the search's best record, in a latency budget's row) :func:`_latency_row`."""

    artifact = build_artifact(
        model,
        workspace.analysis,
        policy,
        calibration,
        model_name=config.workspace.model,
        input_shape=workspace.splits.input_shape,
        num_classes=workspace.splits.num_classes,
        dataset=workspace.splits.name,
        activation_ranges=activation_ranges,
    )
    artifact.write(path)
    slim = load_compressed(path, model=workspace.model)
    latency = latency_report(slim, workspace.model, workspace.splits.input_shape)
    row = {
        "file_bytes": path.stat().st_size,
        "test_artifact": evaluate_accuracy(slim, workspace.splits.test),
        "latency_b1_ms": latency["batch1"],
        "latency_b64_ms": latency["batch64"],
        "fp32_latency_b1_ms": latency["fp32_batch1"],
        "fp32_latency_b64_ms": latency["fp32_batch64"],
    }
    return row if best is None else {**row, **_latency_row(config, workspace, slim, best)}


def _latency_row(config: CompareConfig, workspace: Any, slim: nn.Module, best: dict[str, Any]) -> dict[str, Any]:
    """The exported model's measured latency on the latency target and batch, next to FP32's (timed alternately)
    and to the search's prediction (None for a method that ran without the latency budget)."""
    measured, fp32 = paired_latency(
        slim, workspace.model, workspace.splits.input_shape, config.latency_batch, config.latency_target
    )
    return {
        "latency_ms": measured,
        "fp32_latency_ms": fp32,
        "latency_ratio": measured / fp32,
        "latency_ratio_predicted": best.get("latency_ratio"),
    }


def _open_workspace(config: CompareConfig) -> Any:
    return open_workspace(config.workspace, progress=False)


def _job(config: CompareConfig, workspace: Any, method: str, budget: Budget, out: Path, threads: int) -> dict[str, Any]:
    """One (method, budget) job, seeded on its own so that it gives the same row alone, in any order or process."""
    if threads:
        torch.set_num_threads(threads)
    if workspace is None:  # a worker process on this machine: the driver has already cached the reference
        workspace = _open_workspace(config)
    seed_everything(config.seed)
    try:
        return _run_one(config, workspace, method, budget, out)
    except AJPQError as exc:  # a method that cannot meet this budget (or whose result cannot be exported) is a row
        log(f"compare: {method} at {budget_label(budget)}: no result ({exc})")
        return {"method": method, "budget": budget_label(budget), "note": str(exc)}


def run_jobs(
    config: CompareConfig, workspace: Any, jobs: list[tuple[str, Budget]], out: Path, backend: Any = None
) -> Any:
    """Yield the rows of ``jobs`` in job order, run one after the other (backend local) or concurrently in worker
    processes or Ray tasks (the rows are the same, only the wall times differ)."""

    options = backend or BackendOptions()
    if options.backend == "local":
        for method, budget in jobs:
            yield _job(config, workspace, method, budget, out, 0)
        return
    if options.backend == "processes":
        workers = min(len(jobs), options.workers or os.cpu_count() or 1)
        threads = options.threads or default_threads(workers)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_job, config, None, m, b, out, threads) for m, b in jobs]
            for future in futures:
                yield future.result()
        return
    from ajpq.backends import _ray

    ray = _ray()
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if options.ray_address is None:
            ray.init(num_cpus=options.workers or os.cpu_count() or 1, **kwargs)
        else:
            ray.init(address=options.ray_address, **kwargs)
    try:
        task = ray.remote(num_cpus=1)(_job)
        shipped = ray.put(workspace)
        refs = [task.remote(config, shipped, m, b, out, options.threads or 1) for m, b in jobs]
        for ref in refs:
            yield ray.get(ref)
    finally:
        if started:
            ray.shutdown()


def run_compare(config: CompareConfig, backend: Any = None) -> dict[str, Any]:
    """Run the comparison and write ``compare.csv``, ``compare.md`` and ``compare_pareto.png`` in ``out_dir``.

    ``backend`` (an :class:`ajpq.backends.BackendOptions`) runs the (method, budget) jobs concurrently.
    """

    workspace = _open_workspace(config)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare_config.yaml", yaml.safe_dump({"default": config.to_dict()}, sort_keys=False))
    fp32 = {
        "val": evaluate_accuracy(workspace.model, workspace.splits.val, workspace.device),
        "test": evaluate_accuracy(workspace.model, workspace.splits.test, workspace.device),
    }
    # what the numbers were measured on: the same seed gives another reference on another torch build or device
    reference = {"weights_digest": weights_digest(workspace.model), **software_environment(workspace.device)}
    rows = []
    jobs = [(method, budget) for budget in compare_budgets(config) for method in config.methods]
    for row in run_jobs(config, workspace, jobs, out, backend):
        rows.append(row)
        write_outputs(out, rows, fp32, config, reference)
    paths = write_outputs(out, rows, fp32, config, reference)
    return {"rows": rows, "fp32": fp32, "reference": reference, **{k: str(v) for k, v in paths.items()}}


def markdown_table(
    rows: list[dict[str, Any]], fp32: dict[str, float] | None = None, reference: dict[str, str] | None = None
) -> str:
    header = (
        "| method | budget | size compression | BOPs compression | val before | test before | val after | "
        "test after | search wall time (s) | evaluations | artifact bytes | artifact test | CPU ms batch 1 (FP32) | "
        "CPU ms batch 64 (FP32) |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['method']} | {r['budget']} | no result: {r['note']} |" + " - |" * 11)
            continue
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['size_compression']:.1f}x | {r['bops_compression']:.1f}x | "
            f"{r['val_before']:.4f} | {r['test_before']:.4f} | {r['val_after']:.4f} | {r['test_after']:.4f} | "
            f"{r['search_wall_time']:.1f} | {r['evaluations']} | {r['file_bytes']:,} | {r['test_artifact']:.4f} | "
            f"{r['latency_b1_ms']:.3f} ({r['fp32_latency_b1_ms']:.3f}) | "
            f"{r['latency_b64_ms']:.3f} ({r['fp32_latency_b64_ms']:.3f}) |"
        )
    timed = [r for r in rows if r.get("latency_ms") not in (None, "")]
    if timed:
        lines += [
            "",
            "| method | budget | measured latency ms (FP32) | measured ratio | predicted ratio | test after |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in timed:
            predicted = r.get("latency_ratio_predicted")
            shown_prediction = "not budgeted" if predicted in (None, "") else f"{float(predicted):.3f}"
            lines.append(
                f"| {r['method']} | {r['budget']} | {r['latency_ms']:.3f} ({r['fp32_latency_ms']:.3f}) | "
                f"{r['latency_ratio']:.3f} | {shown_prediction} | {r['test_after']:.4f} |"
            )
    if fp32:
        lines.append(f"\nFP32 reference: val {fp32['val']:.4f}, test {fp32['test']:.4f}.")
    if reference:
        lines.append(
            f"Reference weights digest {reference['weights_digest']}; measured with ajpq {reference['ajpq']}, torch "
            f"{reference['torch']}, numpy {reference['numpy']}, stable-baselines3 {reference['stable_baselines3']} "
            f"on {reference['device']}."
        )
    return "\n".join(lines) + "\n"


def pareto_png(rows: list[dict[str, Any]], fp32: dict[str, float] | None = None, title: str = "") -> bytes:
    """Test accuracy after fine-tuning against size compression (log x), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted(
            (r["size_compression"], r["test_after"]) for r in rows if r["method"] == method and "note" not in r
        )
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    if fp32:
        axes.axhline(fp32["test"], color="gray", linestyle="--", linewidth=1, label="FP32")
    axes.set_xscale("log")
    axes.set_xlabel("size compression rate (FP32 / compressed, log scale)")
    axes.set_ylabel("test accuracy after fine-tuning")
    axes.set_title(title or "accuracy vs compression")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def write_outputs(
    out: Path,
    rows: list[dict[str, Any]],
    fp32: dict[str, float],
    config: CompareConfig,
    reference: dict[str, str] | None = None,
) -> dict[str, Path]:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[*COLUMNS, "note"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in (*COLUMNS, "note")})
    paths = {"csv": out / "compare.csv", "table": out / "compare.md", "plot": out / "compare_pareto.png"}
    atomic_write_text(paths["csv"], text.getvalue())
    title = f"{config.workspace.model} on {config.workspace.dataset}, {config.finetune_epochs} fine-tuning epochs"
    atomic_write_text(paths["table"], f"# {title}\n\n" + markdown_table(rows, fp32, reference))
    atomic_write_bytes(paths["plot"], pareto_png(rows, fp32, title))
    return paths
