"""``ajpq finetune``: quantization-aware fine-tuning of the model with a fixed policy."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from ajpq.checkpoint import checkpoint_meta, ranges_meta, save_checkpoint
from ajpq.cli.common import add_weights, check_out, open_from_args, print_json
from ajpq.logs import log
from ajpq.policy import load_policy
from ajpq.qat import finetune, finetune_config
from ajpq.train import seed_everything


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
    add_weights(tune, "FP32 checkpoint to start from (default: the cached reference)")
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
    tune.add_argument(
        "--learn-ranges",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train each layer's activation range with the weights (LSQ step sizes; the default) instead of "
        "recalibrating it after every epoch (--no-learn-ranges); the ranges are saved with the weights and "
        "`ajpq export-model` uses them",
    )
    tune.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
    tune.add_argument("--out", required=True, help="checkpoint to write (e.g. finetuned.pt)")
    tune.add_argument("--tb-dir", default=None, help="TensorBoard folder (default: <out without suffix>_tb/)")
    tune.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    tune.set_defaults(handler=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    out = check_out(args.out, "finetuned.pt")
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
    workspace = open_from_args(args)
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
        f"(lr {config.lr}, momentum {config.momentum}, weight decay {config.weight_decay}, {teaching}"
        f"{', learned' if args.learn_ranges else ', calibrated'} activation ranges) on "
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
            workspace.calibration_images(),
            config,
            val=workspace.splits.val,
            report={"val": workspace.splits.val, "test": workspace.splits.test},
            device=workspace.device,
            generator=generator,
            on_epoch=on_epoch,
            distill=not args.no_distill,
            learn_ranges=args.learn_ranges,
        )
    finally:
        writer.close()
    cost = workspace.cost(policy)
    meta = checkpoint_meta(
        args.model,
        workspace.splits,
        seed=args.seed,
        policy=policy.to_dict(),
        finetune={
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
            "learn_ranges": args.learn_ranges,
        },
        compressed_accuracy={"before": result.accuracy_before, "after": result.accuracy_after},
    )
    if result.activation_ranges:
        meta["activation_ranges"] = ranges_meta(result.activation_ranges, policy)
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
