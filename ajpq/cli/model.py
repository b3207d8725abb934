"""The model commands: ``inspect``, ``pretrain`` and ``evaluate`` (``--artifact``: see :mod:`ajpq.cli.export`)."""

from __future__ import annotations

import argparse

from ajpq.checkpoint import save_checkpoint
from ajpq.cli.common import add_weights, check_out, open_from_args, print_json
from ajpq.cli.export import command_policy, run_evaluate_artifact
from ajpq.cost import CostModel
from ajpq.data import load_dataset
from ajpq.evaluation import evaluation_report, inspect_report
from ajpq.logs import log
from ajpq.policy import Policy
from ajpq.reference import default_pretrain_config, pretrain
from ajpq.train import TrainConfig, resolve_device


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    inspect = subparsers.add_parser(
        "inspect",
        parents=[common],
        help="list compressible layers, coupled channel groups and FP32 costs",
        description="Show the compressible layers (execution order), the coupled channel groups, the model "
        "fingerprint and the FP32 reference size and BOPs. Needs no weights.",
    )
    inspect.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    inspect.add_argument(
        "--write-policy",
        metavar="PATH",
        default=None,
        help="also write an 8-bit policy template for this model (edit it by hand)",
    )
    inspect.set_defaults(handler=run_inspect)

    train = subparsers.add_parser(
        "pretrain",
        parents=[common],
        help="train the FP32 reference model",
        description="Train the FP32 reference on the training split; the checkpoint records the model, dataset, "
        "split seed and validation/test accuracy.",
    )
    train.add_argument("--epochs", type=int, default=None, help="training epochs (default: per model)")
    train.add_argument("--lr", type=float, default=None, help="peak SGD learning rate (default: per model)")
    train.add_argument("--batch-size", type=int, default=None, help="batch size (default: per model)")
    train.add_argument("--weight-decay", type=float, default=None, help="weight decay (default 5e-4)")
    train.add_argument("--seed", type=int, default=0, help="seed of initialization and data order")
    train.add_argument("--out", required=True, help="checkpoint path to write (e.g. ckpt.pt)")
    train.add_argument("--json", action="store_true", help="print the accuracies as JSON on stdout")
    train.set_defaults(handler=run_pretrain)

    evaluate = subparsers.add_parser(
        "evaluate",
        parents=[common],
        help="accuracy, size and BOPs of the FP32 model or of a policy",
        description="Evaluate the FP32 model, or with --policy the simulated compressed model (quantized "
        "weights, removed channels, quantized activations), on a split.",
    )
    add_weights(evaluate, "FP32 checkpoint (default: the cached reference)")
    evaluate.add_argument("--policy", default=None, help="policy JSON to apply")
    evaluate.add_argument("--split", default="test", choices=("val", "test"), help="split to report (default test)")
    evaluate.add_argument(
        "--artifact",
        default=None,
        help="evaluate a .ajpq artifact instead (accuracy, file bytes, CPU latency next to FP32); no --model needed "
        "for zoo and torchvision models, a model of your own needs --model package.module:factory (a name in the "
        "file is never imported)",
    )
    evaluate.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    evaluate.set_defaults(handler=run_evaluate)


def _human_bits(bits: float) -> str:
    size = bits / 8
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.1f} {unit}" if unit != "B" else f"{size:,.0f} B"
        size /= 1024
    return f"{size:.1f}"


def run_inspect(args: argparse.Namespace) -> int:
    workspace = open_from_args(args, need_weights=False)
    analysis = workspace.analysis
    cost = CostModel(analysis)
    report = inspect_report(workspace)
    if args.write_policy:
        Policy.uniform(analysis).with_meta("template").save(args.write_policy)
        log(f"wrote an 8-bit policy template to {args.write_policy}")
    if args.json:
        print_json(report)
        return 0
    shape = "x".join(str(s) for s in workspace.splits.input_shape)
    print(f"model {args.model} on {workspace.splits.name} (input {shape}, {workspace.splits.num_classes} classes)")
    print(f"fingerprint {analysis.fingerprint}")
    header = (
        f"{'#':>3}  {'name':<28} {'type':<12} {'in':>6} {'out':>6} {'kernel':>6} {'stride':>6} "
        f"{'groups':>6} {'out_hw':>7} {'params':>10} {'MACs':>13} {'group':>5}"
    )
    print(header)
    for layer in analysis.layers:
        print(
            f"{layer.index:>3}  {layer.name:<28} {layer.type:<12} {layer.in_channels:>6} {layer.out_channels:>6} "
            f"{'x'.join(map(str, layer.kernel_size)):>6} {'x'.join(map(str, layer.stride)):>6} "
            f"{layer.groups:>6} {layer.out_hw:>7} {layer.params:>10,} {layer.macs:>13,} {layer.group:>5}"
        )
    print("coupled channel groups (channels removed together):")
    for g in analysis.groups:
        readers = [c for c in g.consumers if c not in g.members]
        status = f"read by {', '.join(readers)}"
        if not g.prunable:
            status = g.status
        print(f"  g{g.id}: {', '.join(g.members)} ({g.size} channels; {status})")
    if analysis.other_params:
        print(f"other parameters (kept at 32 bits): {analysis.other_params:,}")
    print(
        f"FP32 reference: size {cost.reference_size_bits:,} bits ({_human_bits(cost.reference_size_bits)}), "
        f"BOPs {cost.reference_bops:.4g} ({analysis.total_macs:,} MACs)"
    )
    return 0


def run_pretrain(args: argparse.Namespace) -> int:
    out = check_out(args.out, "ckpt.pt")
    defaults = default_pretrain_config(args.model)
    config = TrainConfig(
        epochs=args.epochs if args.epochs is not None else defaults.epochs,
        lr=args.lr if args.lr is not None else defaults.lr,
        batch_size=args.batch_size if args.batch_size is not None else defaults.batch_size,
        weight_decay=args.weight_decay if args.weight_decay is not None else defaults.weight_decay,
    )
    device = resolve_device(args.device)
    splits = load_dataset(args.dataset, data_dir=args.data_dir, split_seed=args.split_seed, val_size=args.val_size)
    log(f"{splits.describe()}; training {args.model} for {config.epochs} epochs on {device}")
    model, meta = pretrain(args.model, splits, config, seed=args.seed, device=device)
    train_config = {"lr": config.lr, "batch_size": config.batch_size, "weight_decay": config.weight_decay}
    save_checkpoint(out, model.cpu(), {**meta, "train_config": train_config})
    accuracy = meta["accuracy"]
    if args.json:
        print_json({"out": str(out), "accuracy": accuracy})
    else:
        print(f"val accuracy {accuracy['val']:.4f}, test accuracy {accuracy['test']:.4f}; wrote {out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    if getattr(args, "artifact", None):
        return run_evaluate_artifact(args)
    workspace = open_from_args(args)
    policy = command_policy(args, workspace)
    report = evaluation_report(workspace, policy, args.split)
    if args.json:
        print_json(report)
        return 0
    what = "FP32 model"
    if policy is not None:
        what = f"policy {args.policy}" if args.policy else f"the policy embedded in {args.weights}"
    print(f"{what} on {workspace.splits.name}/{args.split}: accuracy {report['accuracy']:.4f}")
    print(
        f"size {report['size_bits']:,} bits ({_human_bits(report['size_bits'])}) = {report['size_ratio']:.4f} of "
        f"FP32 ({report['compression_rate']:.2f}x smaller); BOPs {report['bops']:.4g} = {report['bops_ratio']:.4f} "
        "of FP32"
    )
    return 0
