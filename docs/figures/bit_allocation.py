"""The README's picture: the bit allocation the default search finds (digits_cnn on the embedded digits, size
budget 1/10), one row per layer, channels in decreasing importance.

python docs/figures/bit_allocation.py [--episodes 300] [--run-dir DIR] [--out docs/figures/bit_allocation.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ajpq.runner import run_search
from ajpq.runs import bit_allocation_figure
from ajpq.search_config import SearchConfig
from ajpq.workspace import WorkspaceSpec, open_workspace


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--episodes", type=int, default=300, help="episodes of the search (default 300)")
    parser.add_argument("--run-dir", type=Path, default=None, help="run folder to write (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".png"), help="PNG to write")
    args = parser.parse_args(argv)
    workspace = open_workspace(WorkspaceSpec())
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = args.run_dir or Path(scratch) / "run"
        config = SearchConfig.from_dict({"episodes": args.episodes, "run_dir": str(run_dir), "progress": False})
        result = run_search(config, workspace=workspace)
        policy = result.best_policy
        if policy is None:
            raise SystemExit("the search found no feasible policy")
        figure = bit_allocation_figure(policy, workspace.analysis.layer_importance)
        figure.set_size_inches(8, 1.0 + 0.3 * len(policy.layers))
        best = result.best or {}
        figure.axes[0].set_title(
            f"digits_cnn, size budget 1/10: {1 / best.get('size_ratio', 1):.1f}x smaller, "
            f"val accuracy {best.get('accuracy', 0):.3f} (FP32 {result.fp32_accuracy or 0:.3f}); red: pruned"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(args.out, dpi=80)
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
