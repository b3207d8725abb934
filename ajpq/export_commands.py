"""Subcommands ``finetune`` (quantization-aware fine-tuning) and ``export-model`` (the compressed artifact).

Also the ``--artifact`` branch of ``ajpq evaluate`` (accuracy, sizes and CPU latency of an artifact).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ajpq.cli import print_json
from ajpq.errors import ConfigError, DataError, ModelError, PolicyError
from ajpq.policy import Policy, load_policy, policy_from_dict, validate_policy
from ajpq.train import evaluate_accuracy, seed_everything
from ajpq.workspace import (
    CALIBRATION_SIZE,
    Workspace,
    load_checkpoint,
    log,
    reference_cache_path,
    save_checkpoint,
)


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    tune = subparsers.add_parser(
        "finetune",
        parents=[common],
        help="quantization-aware fine-tuning with a fixed policy",
        description="Fine-tune the FP32 model with the policy's quantized weights (straight-through estimator) and "
        "quantized activations in the forward pass; removed channels stay removed. OPQ recipe by default: SGD, "
        "momentum 0.9, weight decay 1e-4, lr 0.005, cosine schedule. Writes an FP32 checkpoint with the policy "
        "embedded, for `ajpq export-model`.",
    )
    tune.add_argument("--policy", required=True, help="policy JSON (bits and removed channels stay fixed)")
    tune.add_argument("--weights", default=None, help="FP32 checkpoint to start from (default: the cached reference)")
    tune.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    tune.add_argument("--lr", type=float, default=None, help="peak SGD learning rate (default 0.005)")
    tune.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    tune.add_argument("--weight-decay", type=float, default=None, help="weight decay (default 1e-4)")
    tune.add_argument("--batch-size", type=int, default=None, help="batch size (default 128)")
    tune.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    tune.add_argument("--no-augment", action="store_true", help="train without the dataset's augmentation")
    tune.add_argument(
        "--no-distill",
        action="store_true",
        help="train on the labels only (default: distil from the FP32 model, soft targets at temperature "
        "--temperature mixed with the labels' cross-entropy)",
    )
    tune.add_argument("--temperature", type=float, default=None, help="distillation temperature (default 4)")
    tune.add_argument(
        "--distill-alpha", type=float, default=None, help="weight of the soft targets, 0..1 (default 0.7)"
    )
    tune.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
    tune.add_argument("--out", required=True, help="checkpoint to write (e.g. finetuned.pt)")
    tune.add_argument("--tb-dir", default=None, help="TensorBoard folder (default: <out without suffix>_tb/)")
    tune.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    tune.set_defaults(handler=run_finetune)

    export = subparsers.add_parser(
        "export-model",
        parents=[common],
        help="write the really compressed model (.ajpq artifact, optionally ONNX)",
        description="Remove the 0-bit channels physically (coupled layers included), fold BatchNorm, pack each "
        "channel's weights at its own bit width and write a checksummed .ajpq artifact that "
        "`ajpq.load_compressed` turns back into a slim nn.Module. The payload is the cost model's size_bits/8.",
    )
    export.add_argument(
        "--policy", default=None, help="policy JSON (default: the policy embedded in a `finetune` checkpoint)"
    )
    export.add_argument("--weights", default=None, help="FP32 or fine-tuned checkpoint (default: cached reference)")
    export.add_argument("--out", required=True, help="artifact to write (e.g. model.ajpq)")
    export.add_argument("--onnx", default=None, metavar="PATH", help="also write the slim model as ONNX (opset 17)")
    export.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    export.set_defaults(handler=run_export)


def _open(args: argparse.Namespace) -> Workspace:
    from ajpq.commands import _workspace

    return _workspace(args)


def _calibration(workspace: Workspace) -> torch.Tensor:
    """The images :attr:`Workspace.simulated` calibrates on (the first training images, unshuffled)."""
    return next(workspace.splits.train.batches(CALIBRATION_SIZE))[0]


def _check_out(path: str, example: str) -> Path:
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path such as {out / example}")
    return out


def run_finetune(args: argparse.Namespace) -> int:
    from torch.utils.tensorboard import SummaryWriter

    from ajpq.finetune import finetune, finetune_config

    out = _check_out(args.out, "finetuned.pt")
    config = finetune_config(
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        augment=not args.no_augment,
        distill_temperature=args.temperature,
        distill_alpha=args.distill_alpha,
    )
    workspace = _open(args)
    policy = load_policy(args.policy, workspace.analysis)
    tb_dir = Path(args.tb_dir) if args.tb_dir else out.with_name(f"{out.stem}_tb")
    generator = seed_everything(args.seed)
    teaching = (
        "labels only"
        if args.no_distill
        else f"distilled from FP32 at temperature {config.distill_temperature}, alpha {config.distill_alpha}"
    )
    log(
        f"fine-tuning {args.model} on {workspace.splits.name} with {args.policy} for {config.epochs} epochs "
        f"(lr {config.lr}, momentum {config.momentum}, weight decay {config.weight_decay}, {teaching}) on "
        f"{workspace.device}; TensorBoard in {tb_dir}"
    )
    writer = SummaryWriter(log_dir=str(tb_dir))

    def on_epoch(epoch: int, loss: float, val_accuracy: float | None) -> None:
        writer.add_scalar("finetune/loss", loss, epoch)
        if val_accuracy is not None:
            writer.add_scalar("finetune/val_accuracy", val_accuracy, epoch)
        writer.flush()

    try:
        result = finetune(
            workspace.model,
            workspace.analysis,
            policy,
            workspace.splits.train,
            _calibration(workspace),
            config,
            val=workspace.splits.val,
            report={"val": workspace.splits.val, "test": workspace.splits.test},
            device=workspace.device,
            generator=generator,
            on_epoch=on_epoch,
            distill=not args.no_distill,
        )
    finally:
        writer.close()
    cost = workspace.cost(policy)
    meta: dict[str, Any] = {
        "model": args.model,
        "dataset": workspace.splits.name,
        "split_seed": workspace.splits.split_seed,
        "input_shape": list(workspace.splits.input_shape),
        "num_classes": workspace.splits.num_classes,
        "seed": args.seed,
        "policy": policy.to_dict(),
        "finetune": {
            "from_weights": str(args.weights) if args.weights else "cached reference",
            "epochs": config.epochs,
            "lr": config.lr,
            "momentum": config.momentum,
            "weight_decay": config.weight_decay,
            "batch_size": config.batch_size,
            "max_steps": config.max_steps,
            "warmup": config.warmup,
            "distill": None
            if args.no_distill
            else {"temperature": config.distill_temperature, "alpha": config.distill_alpha},
            "history": result.history,
        },
        "compressed_accuracy": {"before": result.accuracy_before, "after": result.accuracy_after},
    }
    save_checkpoint(out, result.model.cpu(), meta)
    report = {
        "out": str(out),
        "tb_dir": str(tb_dir),
        "accuracy": {"before": result.accuracy_before, "after": result.accuracy_after},
        "size_bits": cost.size_bits,
        "compression_rate": cost.compression_rate,
        "history": result.history,
    }
    if args.json:
        print_json(report)
        return 0
    before, after = result.accuracy_before, result.accuracy_after
    print(
        f"compressed model ({cost.compression_rate:.2f}x smaller): test accuracy {before['test']:.4f} before, "
        f"{after['test']:.4f} after fine-tuning (val {before['val']:.4f} -> {after['val']:.4f}); wrote {out}"
    )
    return 0


def _export_policy(args: argparse.Namespace, workspace: Workspace) -> Policy:
    embedded = workspace.checkpoint.get("policy")
    if args.policy:
        policy = load_policy(args.policy, workspace.analysis)
        if embedded is not None:
            tuned = validate_policy(policy_from_dict(embedded, f"{args.weights} (embedded policy)"), workspace.analysis)
            same = all(
                (tuned.layers[n].weight_bits == p.weight_bits).all()
                and tuned.layers[n].activation_bits == p.activation_bits
                for n, p in policy.layers.items()
            )
            if not same:
                log(f"note: {args.policy} differs from the policy {args.weights} was fine-tuned with")
        return policy
    if embedded is None:
        raise PolicyError(
            "no --policy given and the weights hold no fine-tuning policy; pass --policy P (or --weights of a "
            "checkpoint written by `ajpq finetune`)"
        )
    log(f"using the policy embedded in {args.weights}")
    return validate_policy(policy_from_dict(embedded, f"{args.weights} (embedded policy)"), workspace.analysis)


def run_export(args: argparse.Namespace) -> int:
    from ajpq.export import build_artifact, export_onnx

    out = _check_out(args.out, "model.ajpq")
    if args.onnx:
        from ajpq.export import _require_onnx

        _require_onnx()
    workspace = _open(args)
    policy = _export_policy(args, workspace)
    artifact = build_artifact(
        workspace.model,
        workspace.analysis,
        policy,
        _calibration(workspace),
        model_name=args.model,
        input_shape=workspace.splits.input_shape,
        num_classes=workspace.splits.num_classes,
        dataset=workspace.splits.name,
    )
    metrics = artifact.header["metrics"]
    metrics["accuracy"] = {
        "val": evaluate_accuracy(artifact.slim, workspace.splits.val),
        "test": evaluate_accuracy(artifact.slim, workspace.splits.test),
    }
    artifact.write(out)
    header_bytes = len(artifact.to_bytes()) - len(artifact.payload)
    report: dict[str, Any] = {
        "out": str(out),
        "file_bytes": header_bytes + len(artifact.payload),
        "payload_bytes": len(artifact.payload),
        "header_bytes": header_bytes,
        "expected_payload_bytes": metrics["expected_payload_bytes"],
        "accuracy": metrics["accuracy"],
        "max_abs_logit_diff": metrics["max_abs_logit_diff"],
        "size_bits": metrics["size_bits"],
        "compression_rate": metrics["compression_rate"],
    }
    if args.onnx:
        report["onnx"] = str(args.onnx)
        report["onnx_max_abs_diff"] = export_onnx(artifact.slim, workspace.splits.input_shape, args.onnx)
    if args.json:
        print_json(report)
        return 0
    print(
        f"wrote {out}: {report['file_bytes']:,} bytes = payload {report['payload_bytes']:,} (cost model "
        f"{report['expected_payload_bytes']:,.0f}) + header {header_bytes:,}; "
        f"{metrics['compression_rate']:.2f}x smaller than FP32"
    )
    print(
        f"test accuracy {metrics['accuracy']['test']:.4f} (val {metrics['accuracy']['val']:.4f}); slim vs simulated "
        f"max |logit diff| {metrics['max_abs_logit_diff']['relative']:.2e} of the logit range"
    )
    if args.onnx:
        print(f"wrote {args.onnx} (opset 17); onnxruntime max |logit diff| {report['onnx_max_abs_diff']:.2e}")
    return 0


def _fp32_reference(model: torch.nn.Module, name: str, splits: Any, weights: str | None) -> torch.nn.Module:
    """The FP32 model to time next to the artifact (weights do not change CPU latency, so none are trained)."""
    from ajpq.workspace import load_weights

    if weights is not None:
        load_weights(model, load_checkpoint(weights), name, str(weights))
        return model
    cached = reference_cache_path(name, splits)
    if cached.is_file():
        load_weights(model, load_checkpoint(cached), name, str(cached))
    else:
        log(f"no --weights and no cached reference for {name}: timing the FP32 architecture with fresh weights")
    return model


def run_evaluate_artifact(args: argparse.Namespace) -> int:
    """``ajpq evaluate --artifact A``: accuracy, file/payload/header bytes, CPU latency next to FP32."""
    from ajpq.data import load_dataset
    from ajpq.export import _load_slim, base_model, latency_report, model_record, read_artifact
    from ajpq.models import build_model

    if getattr(args, "policy", None):
        raise ConfigError("--policy and --artifact exclude each other: the artifact carries its policy")
    artifact = read_artifact(args.artifact)
    info = model_record(artifact.header, args.artifact)
    user_model = None
    if ":" in args.model:  # the user's own factory, named on the command line (never the file's name)
        user_model = build_model(args.model, tuple(info["input_shape"]), info["num_classes"])
    fp32_model = base_model(artifact.header, user_model, args.artifact)  # refuses a file-named factory up front
    splits = load_dataset(args.dataset, data_dir=args.data_dir, split_seed=args.split_seed, val_size=args.val_size)
    if tuple(splits.input_shape) != tuple(info["input_shape"]) or splits.num_classes != info["num_classes"]:
        raise DataError(
            f"{args.artifact} takes inputs {tuple(info['input_shape'])} with {info['num_classes']} classes, but "
            f"{splits.name} has {tuple(splits.input_shape)} and {splits.num_classes}; use the dataset it was "
            f"exported on ({info.get('dataset')})"
        )
    try:
        slim = _load_slim(artifact.header, artifact.payload, fp32_model, args.artifact)
    except ModelError as exc:
        raise ModelError(f"{args.artifact}: cannot rebuild model {info['name']!r}: {exc}") from None
    split = splits.val if args.split == "val" else splits.test
    accuracy = evaluate_accuracy(slim, split)
    name = args.model if user_model is not None else info["name"]
    fp32 = _fp32_reference(fp32_model, name, splits, args.weights)
    latency = latency_report(slim, fp32, splits.input_shape)
    report = {
        "accuracy": accuracy,
        "file_bytes": artifact.file_bytes,
        "payload_bytes": artifact.payload_bytes,
        "header_bytes": artifact.header_bytes,
        "latency_ms": latency,
    }
    if args.json:
        print_json(report)
        return 0
    print(f"artifact {args.artifact} ({info['name']}) on {splits.name}/{args.split}: accuracy {accuracy:.4f}")
    print(f"file {artifact.file_bytes:,} bytes = payload {artifact.payload_bytes:,} + header {artifact.header_bytes:,}")
    print(
        f"CPU latency ({torch.get_num_threads()} threads, median): batch 1 {latency['batch1']:.3f} ms "
        f"(FP32 {latency['fp32_batch1']:.3f} ms), batch 64 {latency['batch64']:.3f} ms "
        f"(FP32 {latency['fp32_batch64']:.3f} ms)"
    )
    return 0
