"""The Python API on a model and data the project does not know: defined here, trained here, compressed in a few
calls, with the run folder saying truthfully what ran, resumable from Python, and equal to the CLI on the same
objects."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import ajpq
from ajpq.analysis import weights_digest
from ajpq.checkpoint import load_checkpoint
from ajpq.compress import SimulatedModel
from ajpq.data import load_dataset
from ajpq.errors import AJPQError, ConfigError, DataError
from ajpq.policy import Policy
from ajpq.train import evaluate_accuracy

USER_CODE = '''
import torch
from torch import nn

from ajpq.data import load_dataset


class ResidualNet(nn.Module):
    """A user's CNN: BatchNorm and a residual block, on 1x8x8 images."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 12, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(12)
        self.body = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.head = nn.Linear(12 * 16, 10)

    def forward(self, x):
        y = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.body(y)) + y)
        return self.head(nn.functional.max_pool2d(y, 2).flatten(1))


class Pairs(torch.utils.data.Dataset):
    """(image, label) pairs, as a user's Dataset gives them."""

    def __init__(self, split):
        self.x, self.y = split.x, split.y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def make():
    digits = load_dataset("digits")
    return Pairs(digits.train), Pairs(digits.val), Pairs(digits.test)
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory):
    """The user's module (a file in a folder of theirs), a trained model and its plain state_dict file."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "usercode.py").write_text(USER_CODE)
    sys.path.insert(0, str(folder))
    import usercode

    train, val, test = usercode.make()
    torch.manual_seed(0)
    model = usercode.ResidualNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(8):
        for x, y in torch.utils.data.DataLoader(train, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    torch.save(model.state_dict(), folder / "weights.pt")
    yield folder, usercode, model, train, val, test
    sys.path.remove(str(folder))


SMALL = {"episodes": 8, "episodes_per_update": 2, "checkpoint_every": 4, "progress": False}


def _episodes(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "episodes.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("wall_time", "eval_time")} for row in rows]


def test_search_finetune_export_on_a_model_and_dataset_of_the_users(user, tmp_path: Path) -> None:
    _, usercode, model, train, val, _ = user
    before = weights_digest(model)
    result = ajpq.search(model, train, val, size_budget=0.15, run_dir=tmp_path / "run", **SMALL)
    assert weights_digest(model) == before  # the caller's model is never changed

    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["default"]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert config["model"] == info["model"] == "python:usercode.ResidualNet"
    assert config["dataset"] == "python:usercode.Pairs" and config["val_size"] == len(val) == 288
    assert config["weights"] == str(tmp_path / "run" / "reference.pt")  # not null: the weights that were searched
    reference = usercode.ResidualNet()
    reference.load_state_dict(load_checkpoint(config["weights"])["state_dict"])
    assert weights_digest(reference) == info["weights_digest"] == before
    assert info["fp32_accuracy_val"] == evaluate_accuracy(model, load_dataset("digits").val)

    assert len(result.episodes) == 8 and {e["episode"] for e in result.episodes} == set(range(1, 9))
    best = result.best_policy
    assert best is not None and result.best is not None
    assert best.metrics["accuracy"] == result.best["accuracy"] == max(e["accuracy"] for e in result.episodes)
    assert result.best["size_ratio"] <= 0.15

    tuned = ajpq.finetune(model, result, train, val, epochs=1, max_steps=10, progress=False)
    assert isinstance(tuned.ajpq, ajpq.Compression)
    assert tuned.ajpq.before == pytest.approx(result.best["accuracy"], abs=1e-8)
    report = ajpq.export(tuned, None, tmp_path / "model.ajpq")
    assert report["payload_bytes"] * 8 - report["size_bits"] < 8 * len(best.layers)  # the cost model's bytes
    slim = ajpq.load_compressed(tmp_path / "model.ajpq", model=usercode.ResidualNet())
    assert evaluate_accuracy(slim, load_dataset("digits").val) == tuned.ajpq.after  # one model, one number
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_metric_of_the_users_is_the_reward(user, tmp_path: Path) -> None:
    """evaluate(model) -> float replaces accuracy: here the negative mean squared distance of the logits from the
    FP32 model's on 64 validation images (0 for FP32 itself), a score no accuracy could produce."""
    _, _, model, train, val, _ = user
    images = torch.stack([val[i][0] for i in range(64)])
    with torch.no_grad():
        target = model(images)

    def closeness(candidate: nn.Module) -> float:
        return -float((candidate(images) - target).square().mean())

    result = ajpq.search(model, train, val, size_budget=0.15, evaluate=closeness, run_dir=tmp_path / "run", **SMALL)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["fp32_accuracy_val"] == 0.0
    assert all(e["reward"] == e["accuracy"] < 0 for e in result.episodes)
    best = result.best_policy
    assert best is not None
    workspace = ajpq.api.workspace_of(model, train, val)
    simulated = SimulatedModel(workspace.model, workspace.analysis, workspace.calibration_images())
    with torch.no_grad():
        score = closeness(simulated.apply(best))
    assert score == pytest.approx(best.metrics["accuracy"], rel=1e-6)

    with pytest.raises(ConfigError, match="evaluate must return a number"):
        ajpq.search(model, train, val, evaluate=lambda m: "good", run_dir=tmp_path / "bad", **SMALL)


def test_resume_from_python_after_an_interruption(user, tmp_path: Path) -> None:
    """A search stopped by SIGINT (during its warm start) resumes from Python and
    ends with the episodes of an uninterrupted run; a resume with other settings, weights or data is refused."""
    _, usercode, model, train, val, _ = user
    whole = ajpq.search(model, train, val, size_budget=0.15, run_dir=tmp_path / "whole", **SMALL)

    calls = []

    def interrupting(candidate: nn.Module) -> float:
        calls.append(1)
        if len(calls) == 3:  # the FP32 score, then the warm start
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate_accuracy(candidate, load_dataset("digits").val)

    with pytest.raises(KeyboardInterrupt):
        ajpq.search(model, train, val, size_budget=0.15, evaluate=interrupting, run_dir=tmp_path / "run", **SMALL)
    assert 0 < len(_episodes(tmp_path / "run")) < 8
    resumed = ajpq.search(model, train, val, size_budget=0.15, resume=tmp_path / "run", **SMALL)
    assert _episodes(tmp_path / "run") == _episodes(tmp_path / "whole")
    assert resumed.best == whole.best

    with pytest.raises(ConfigError, match=r"size_budget 0\.15 -> 0\.2"):
        ajpq.search(model, train, val, size_budget=0.2, resume=tmp_path / "run", **{**SMALL, "episodes": 9})
    other = usercode.ResidualNet()
    with pytest.raises(ConfigError, match="FP32 weights with digest"):
        ajpq.search(other, train, val, size_budget=0.15, resume=tmp_path / "run", **{**SMALL, "episodes": 9})
    with pytest.raises(ConfigError, match="val_size 288 -> 200"):
        ajpq.search(model, train, torch.utils.data.Subset(val, range(200)), resume=tmp_path / "run", **SMALL)
    shuffled = torch.utils.data.Subset(val, list(reversed(range(len(val)))))
    with pytest.raises(AJPQError, match="scored on validation data with digest"):
        ajpq.search(model, train, shuffled, size_budget=0.15, resume=tmp_path / "run", **{**SMALL, "episodes": 9})


def test_the_cli_on_the_users_factories_gives_the_same_episodes(user, tmp_path: Path) -> None:
    """`ajpq search --model usercode:ResidualNet --weights weights.pt --dataset usercode:make`, run from the user's
    folder (importable without installing), writes the episodes `ajpq.search` writes on the same objects."""
    folder, _, model, train, val, _ = user
    ajpq.search(model, train, val, size_budget=0.15, run_dir=tmp_path / "api", **SMALL)
    argv = ["--model", "usercode:ResidualNet", "--weights", "weights.pt", "--dataset", "usercode:make"]
    small = ["--episodes", "8", "--episodes-per-update", "2", "--checkpoint-every", "4", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ajpq.cli",
            "search",
            *argv,
            "--size-budget",
            "0.15",
            *small,
            "--run-dir",
            str(tmp_path / "cli"),
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert _episodes(tmp_path / "cli") == _episodes(tmp_path / "api")


def test_user_code_that_cannot_be_imported_says_how_to_make_it_importable(tmp_path: Path, capsys) -> None:
    from ajpq.cli import main

    assert main(["inspect", "--model", "nosuchmodule:make"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot import module 'nosuchmodule'" in message and "PYTHONPATH" in message
    assert main(["inspect", "--dataset", "nosuchdata:make"]) == 2
    assert "PYTHONPATH" in capsys.readouterr().err


def test_data_that_is_not_image_pairs_is_refused_in_one_line(user) -> None:
    _, _, model, train, _, _ = user

    class Words(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> tuple[str, int]:
            return "word", 0

    with pytest.raises(DataError, match="inputs must be tensors"):
        ajpq.search(model, train, Words(), **SMALL)
    with pytest.raises(DataError, match=r"must be an image tensor \(C, H, W\), but has shape \(64,\)"):
        ajpq.search(model, train, (torch.zeros(5, 64), torch.zeros(5, dtype=torch.long)), **SMALL)
    with pytest.raises(ConfigError, match="unknown option 'episode_finetune_step'; did you mean"):
        ajpq.search(model, train, train, episode_finetune_step=3)


def test_an_evaluate_the_workers_cannot_import_is_refused_for_processes(user, tmp_path: Path) -> None:
    _, _, model, train, val, _ = user
    with pytest.raises(ConfigError, match="cannot be sent to worker processes"):
        ajpq.search(
            model, train, val, evaluate=lambda m: 0.0, backend="processes", workers=1, run_dir=tmp_path / "r", **SMALL
        )


def test_an_image_folder_takes_its_size_and_grey_from_the_users_model(tmp_path: Path) -> None:
    """A 28x28 grey folder for a model whose first conv reads one channel: 1x28x28 inputs, not 3x224x224."""
    from PIL import Image

    from ajpq.workspace import WorkspaceSpec, open_workspace

    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / "folder" / split / label).mkdir(parents=True)
            for i in range(12):
                pixels = (torch.rand(28, 28) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels, mode="L").save(tmp_path / "folder" / split / label / f"{i}.png")
    (tmp_path / "greynet.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def make(num_classes):
                return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, num_classes))
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        spec = WorkspaceSpec(
            model="greynet:make", dataset="imagefolder", data_dir=str(tmp_path / "folder"), image_size=28
        )
        workspace = open_workspace(spec, need_weights=False, progress=False)
    finally:
        sys.path.remove(str(tmp_path))
    assert workspace.splits.input_shape == (1, 28, 28)
    x, y = next(workspace.splits.test.batches(24))
    assert tuple(x.shape) == (24, 1, 28, 28) and set(y.tolist()) == {0, 1}


def test_the_own_model_example_runs_end_to_end(tmp_path: Path) -> None:
    """experiments/own_model.py: a plain training script's state_dict and a Dataset of the user's, searched,
    fine-tuned, exported and loaded back, in under 40 lines."""
    script = Path(__file__).parent.parent / "experiments" / "own_model.py"
    assert sum(1 for line in script.read_text().splitlines() if line.strip()) <= 40
    done = subprocess.run([sys.executable, str(script), "8"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert "x smaller" in last and "val accuracy" in last
    (artifact,) = tmp_path.glob("runs/*/model.ajpq")
    assert artifact.stat().st_size == int(last.split(", ")[1].split(" bytes")[0].replace(",", ""))


def test_finetune_learns_the_ranges_of_a_plain_sequential_model() -> None:
    """Fine-tuning kept its learned ranges in a child module of the model, which an ``nn.Sequential`` then called in
    its forward pass (NotImplementedError); they now stay outside the user's model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    digits = load_dataset("digits")
    from ajpq.api import workspace_of

    workspace = workspace_of(model, digits.train, digits.val)
    policy = Policy.uniform(workspace.analysis, 4)
    tuned = ajpq.finetune(model, policy, digits.train, digits.val, epochs=1, progress=False)
    assert isinstance(tuned, nn.Sequential) and len(tuned) == 4  # the user's model, nothing added to it
    assert set(tuned.ajpq.activation_ranges) == {"0", "3"}
