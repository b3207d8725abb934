"""The holes of the hostile audit (issue 25), each reproduced: received files (run folders, configurations, policies,
checkpoints, artifacts, data folders) that ended in a traceback, a silent loss or an accepted bad value."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from ajpq.cli import main
from ajpq.errors import AJPQError, ArtifactError, ConfigError
from ajpq.runs import RunDir

SEARCH_FLAGS = ["--warmup-episodes", "2", "--episodes-per-update", "2", "--checkpoint-every", "2", "--no-progress"]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if " error: " in line]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-episode search (checkpointed after episode 4); copy it before damaging it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["search", "--episodes", "4", "--run-dir", str(run), *SEARCH_FLAGS]) == 0
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("run.lock"))
    return target


def _snapshot(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != "run.lock"
    }


# --- 1. silent data loss -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage,where",
    [
        (lambda lines: lines.__setitem__(1, "{not json"), "line 2: not valid JSON"),
        (lambda lines: lines.__setitem__(2, '{"episode": "3"}'), "line 3: not an episode record"),
        (lambda lines: lines.insert(1, ""), "line 2: not valid JSON"),
        (lambda lines: lines.__setitem__(0, '{"episode": 1' + "0" * 5000 + "}"), "line 1: holds a number of more"),
        # found by the long run-folder fuzzer: a phase that is a list crashed the phase summary (unhashable)
        (
            lambda lines: lines.__setitem__(1, json.dumps({**json.loads(lines[1]), "phase": ["rl"]})),
            "line 2: episode 2 has no phase of type str",
        ),
    ],
)
def test_a_damaged_episode_line_refuses_the_resume_and_rewrites_nothing(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any, where: str
) -> None:
    run = _copy(finished_run, tmp_path)
    lines = (run / "episodes.jsonl").read_text().splitlines()
    damage(lines)
    (run / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["search", "--resume", str(run), "--episodes", "6", "--no-progress"]) == 2
    message = _one_error_line(capsys)
    assert f"{run / 'episodes.jsonl'}, {where}" in message and "the run folder is damaged" in message, message
    assert _snapshot(run) == before


def test_a_damaged_policy_line_refuses_the_resume(finished_run: Path, tmp_path: Path, capsys) -> None:
    run = _copy(finished_run, tmp_path)
    lines = (run / "policies.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["bits"]["conv1"] = "9x"
    lines[1] = json.dumps(row)
    (run / "policies.jsonl").write_text("\n".join(lines) + "\n")
    before = _snapshot(run)
    assert main(["search", "--resume", str(run), "--episodes", "6", "--no-progress"]) == 2
    assert f"{run / 'policies.jsonl'}, episode 2: not a recorded policy" in _one_error_line(capsys)
    assert _snapshot(run) == before


@pytest.mark.expensive
def test_only_a_torn_last_line_is_dropped_on_resume(finished_run: Path, tmp_path: Path) -> None:
    run = _copy(finished_run, tmp_path)
    with (run / "episodes.jsonl").open("a") as handle:
        handle.write('{"episode": 5, "rew')  # killed mid-write
    assert main(["search", "--resume", str(run), "--episodes", "6", "--no-progress"]) == 0
    episodes = [json.loads(line)["episode"] for line in (run / "episodes.jsonl").read_text().splitlines()]
    policies = [json.loads(line)["episode"] for line in (run / "policies.jsonl").read_text().splitlines()]
    assert episodes == policies == [1, 2, 3, 4, 5, 6]


def test_torn_last_line_read_and_damage_elsewhere_refused(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    lines = [json.dumps({"episode": i, "reward": 0.1, "accuracy": 0.9, "feasible": True}) for i in (1, 2, 3)]
    (tmp_path / "episodes.jsonl").write_text(f"{lines[0]}\n{lines[1]}\n{lines[2][:9]}")
    assert [r["episode"] for r in run.read_episodes()] == [1, 2]
    (tmp_path / "episodes.jsonl").write_bytes(f"{lines[0]}\n".encode() + b"\xff\xfe\n" + f"{lines[2]}\n".encode())
    with pytest.raises(ArtifactError, match=r"episodes.jsonl, line 2: not UTF-8 text"):
        run.read_episodes()
    (tmp_path / "episodes.jsonl").write_text(f"{lines[0]}\n" + '{"episode": 2, "accuracy": 0.9}\n')
    with pytest.raises(ArtifactError, match=r"line 2: episode 2 has no reward of type int or float"):
        run.read_episodes()


@pytest.mark.parametrize(
    "content,message",
    [
        (b'{"fingerprint": ', r"run.json: not valid JSON \(Expecting value"),
        (b"[1, 2]", r"run.json: expected a JSON object, but got list"),
        (b"\xff", r"run.json: not UTF-8 text"),
    ],
)
def test_damaged_run_json_is_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "run.json").write_bytes(content)
    with pytest.raises(ArtifactError, match=message):
        RunDir(tmp_path).read_info()


def test_config_that_is_not_utf8_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.yaml").write_bytes(b"default:\n  model: \xe9\n")
    with pytest.raises(ConfigError, match=r"config.yaml: not UTF-8 text \(byte 0xe9 at offset 18\)"):
        RunDir(tmp_path).read_config()
    assert main(["search", "--config", str(tmp_path / "config.yaml")]) == 2
    assert "--config" in _one_error_line(capsys)


def test_ctrl_c_before_the_first_episode_says_what_it_stops(tmp_path: Path, monkeypatch, caplog) -> None:
    import ajpq.runner
    from ajpq.runner import run_search
    from ajpq.search_config import SearchConfig

    def interrupted_measurement(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the measurement went on after Ctrl-C")

    monkeypatch.setattr(ajpq.runner, "load_or_measure", interrupted_measurement)
    caplog.set_level("INFO", logger="ajpq")
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run_search(SearchConfig(episodes=4, run_dir=str(tmp_path / "run"), progress=False))
    assert "interrupted: stopping the layer sensitivity measurement (no episode has started" in caplog.text
    assert "finishing this episode" not in caplog.text
    assert signal.getsignal(signal.SIGINT) is handler


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path, capsys) -> None:
    import tracemalloc

    levels = ['a0: &a0 ["lol"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = "default:\n  seed: 1\n" + "\n".join(levels) + "\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    tracemalloc.start()
    try:
        assert main(["search", "--config", str(path)]) == 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20
    assert "line 4 uses a YAML alias (*name)" in _one_error_line(capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(bomb)
    with pytest.raises(ConfigError, match="uses a YAML alias"):
        RunDir(run).read_config()


# --- 2-4. artifacts: tracebacks, memory from a file, bad values accepted -----------------------------------------


@pytest.fixture(scope="module")
def artifact_data() -> bytes:
    """digits_cnn at 4 bits with three conv2 channels removed (so the groups record removed channels)."""
    from nets import digits_artifact_bytes

    return digits_artifact_bytes(4, removed_conv2=3)


def crafted(data: bytes, edit: Any) -> bytes:
    """The artifact with its header edited and both checksum fields recomputed (what an attacker can do)."""
    import hashlib

    from ajpq.artifact import _PREAMBLE, ARTIFACT_VERSION, MAGIC, PREAMBLE_BYTES

    (length,) = _PREAMBLE.unpack_from(data)[3:4]
    header = json.loads(data[PREAMBLE_BYTES : PREAMBLE_BYTES + length])
    payload = data[PREAMBLE_BYTES + length :]
    edit(header)
    raw = json.dumps(header).encode("utf-8")
    header_sha = hashlib.sha256(raw).digest()
    return _PREAMBLE.pack(MAGIC, ARTIFACT_VERSION, 0, len(raw), header_sha) + raw + payload


def _set(path: str, value: Any) -> Any:
    """An edit setting ``header[a][b]...`` (keys split on '/', list indices as numbers)."""

    def edit(header: dict[str, Any]) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split("/")]
        node: Any = header
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


def _tensor(spec: dict[str, Any]) -> Any:
    return lambda header: header["tensors"].update({"fc2.extra": spec})


ARTIFACT_CASES = [
    (_set("activations/conv1/max_abs", "x"), r"activations\[\"conv1\"\] must be a layer's quantizer"),
    (_set("activations/conv2/bits", 1000000), r"activations\[\"conv2\"\] must be a layer's quantizer: bits one of"),
    (_set("layers/1/weights", [168, 2088, "x"]), r"layer 'conv2': weights must be a payload segment"),
    (_set("layers/1/scales", [168, 10**30]), r"layer 'conv2': scales lies outside the payload"),
    (_set("layers/3/shape", [64, 513]), r"layer 'fc1': weights has 16384 bytes, but its layer needs 16416"),
    (_set("layers/3/shape", [65, 512]), r"layer 'fc1' stores 65 channels, but its policy keeps 64"),
    (_tensor({"dtype": "O", "shape": [1], "data": [0, 8]}), r"tensor 'fc2.extra' must have a numeric dtype"),
    (
        _tensor({"dtype": "<f4", "shape": [100], "data": [0, 8]}),
        r"tensor 'fc2.extra' has 8 bytes, but its layer needs 400",
    ),
    (_set("layers/0/name", "__class__"), r"layer \"__class__\" is not a module name"),
    (_set("layers/0/bn_name", "conv2"), r"'conv2' is not a BatchNorm of the model"),
    (_set("groups/1/removed", [999]), r"group of 'conv2' removes channels \[999\], but its policy prunes \[0, 1, 2\]"),
    (_set("groups/0/removed", [0]), r"group of 'conv1' removes channels \[0\], but its policy prunes \[\]"),
    (_set("created", "any text"), None),  # a valid edit: loads
    (_set("model/num_classes", 10**12), r"needing 3,814,697 MiB to rebuild, more than a file of"),
    (_set("model/input_shape", [1, 200000, 200000]), r"needing 152,588 MiB to rebuild"),
    (_set("model/input_shape", [1, 4000, 4000]), r"MiB to rebuild, more than a file of"),
]


@pytest.mark.parametrize("edit,message", ARTIFACT_CASES)
def test_crafted_artifacts_are_one_line_and_allocate_little(
    artifact_data: bytes, tmp_path: Path, capsys, edit: Any, message: str | None
) -> None:
    import tracemalloc

    from ajpq import load_compressed

    path = tmp_path / "crafted.ajpq"
    path.write_bytes(crafted(artifact_data, edit))
    tracemalloc.start()
    try:
        if message is None:
            load_compressed(path)
        else:
            with pytest.raises(AJPQError, match=message):
                load_compressed(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak
    if message is not None:
        capsys.readouterr()
        assert main(["evaluate", "--artifact", str(path), "--json"]) == 2
        assert re.search(message, _one_error_line(capsys))


def test_5000_digit_numbers_in_a_policy_are_one_line(tmp_path: Path, capsys) -> None:
    from ajpq.errors import PolicyError
    from ajpq.policy import load_policy, policy_from_dict

    big = "9" * 5000
    for text in (
        '{"format": "ajpq-policy", "version": ' + big + ', "layers": []}',
        '{"format": "ajpq-policy", "version": 2, "layers": [{"name": "conv1", "weight_bits": [' + big + "]}]}",
    ):
        path = tmp_path / "policy.json"
        path.write_text(text)
        with pytest.raises(PolicyError, match="holds a number of more than 4300 digits, so not a policy file"):
            load_policy(path)
        assert main(["evaluate", "--policy", str(path)]) == 2
        assert "4300 digits" in _one_error_line(capsys)
    with pytest.raises(PolicyError, match=r"policy format version an integer of 16610 bits is not readable"):
        policy_from_dict({"format": "ajpq-policy", "version": 10**5000, "layers": []})  # from Python, not JSON


@pytest.mark.parametrize(
    "content,message",
    [
        ({"state_dict": [1, 2]}, "its state_dict must map parameter names to tensors, but is list"),
        ({"state_dict": {}, "val_size": "3"}, 'its recorded val_size must be an integer >= 1, but is "3"'),
        ({"state_dict": {}, "version": True}, "checkpoint version true is not readable by this build"),
        (
            {"state_dict": {}, "activation_ranges": {"conv1": {"bits": 8, "max_abs": float("nan"), "signed": True}}},
            r'activation_ranges\["conv1"\] is not a learned range',
        ),
    ],
)
def test_malformed_checkpoints_are_one_line_for_every_command(tmp_path: Path, capsys, content, message) -> None:
    import torch

    path = tmp_path / "ckpt.pt"
    torch.save({"format": "ajpq-checkpoint", "version": 1, **content}, path)
    for command in (["evaluate"], ["export-model", "--out", str(tmp_path / "m.ajpq")]):
        assert main([*command, "--weights", str(path)]) == 2
        assert re.search(message, _one_error_line(capsys))


def _image_folder(root: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def test_a_corrupt_image_is_named_when_the_folder_is_opened(tmp_path: Path) -> None:
    from ajpq.data import load_dataset
    from ajpq.errors import DataError

    _image_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "3.png"
    bad.write_bytes(b"not an image, whatever its name says")
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}: not a readable image \(UnidentifiedImageError"):
        load_dataset("imagefolder", data_dir=tmp_path, val_size=2)


def test_an_undecodable_image_is_one_line_from_a_loader_worker(tmp_path: Path) -> None:
    from ajpq.data import load_dataset
    from ajpq.errors import DataError

    _image_folder(tmp_path)
    bad = tmp_path / "val" / "cat" / "1.png"
    bad.write_bytes(bad.read_bytes()[:120])  # the header identifies a PNG, the pixels are cut off
    splits = load_dataset("imagefolder", data_dir=tmp_path, val_size=2)
    splits.test.num_workers = 2
    with pytest.raises(DataError) as caught:
        list(splits.test.batches(4))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{bad}: not a readable image (OSError"), message


# --- 4-5. bad values accepted, misleading messages ---------------------------------------------------------------


def test_workers_beyond_the_cores_are_refused_with_the_reason(capsys) -> None:
    from ajpq.backends import BackendOptions, max_local_workers

    limit = max_local_workers()
    assert limit == 4 * (os.cpu_count() or 1)
    BackendOptions("processes", limit)
    BackendOptions("ray", 1000, "auto")  # a cluster's workers are bounded by the cluster, not by this machine
    assert main(["search", "--backend", "processes", "--workers", "1000"]) == 2
    message = _one_error_line(capsys)
    assert f"workers must be at most {limit} on this machine (4 per CPU core" in message and "but got 1000" in message


class _Mixer(__import__("torch").nn.Module):
    """A token-mixing Linear over a residual (MLP-Mixer style): its group of 16 channels must stay whole."""

    def __init__(self) -> None:
        from torch import nn

        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)  # 28x28 -> 7x7 = 49 tokens
        self.token = nn.Linear(49, 49)
        self.channel = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: Any) -> Any:
        x = self.stem(x).flatten(2)
        x = x + self.token(x)
        x = x.transpose(1, 2)
        x = x + self.channel(x)
        return self.head(x.mean(1))


def test_analysis_under_no_grad_and_the_reasons_of_kept_whole_groups() -> None:
    import numpy as np
    import torch

    from ajpq.analysis import analyze_model
    from ajpq.errors import PolicyError
    from ajpq.policy import Policy, validate_policy

    torch.manual_seed(0)
    with torch.no_grad():  # inference code: the dependency graph still gets its autograd
        analysis = analyze_model(_Mixer().eval(), (3, 28, 28))
        assert not torch.is_grad_enabled()
    group = analysis.group_of("stem")
    assert not group.prunable
    assert "reaches 49 of the 49 inputs of 'token', a Linear over the last axis of a 16x49 tensor" in group.status
    assert "mixes along another axis than the channels" in group.status and "shuffle" not in group.status
    policy = Policy.uniform(analysis)
    policy.layers["stem"].weight_bits[np.isin(analysis.out_root["stem"], [3])] = 0
    with pytest.raises(PolicyError) as caught:
        validate_policy(policy, analysis)
    assert f"layer 'stem' cannot be pruned ({group.status}), but channels [3] have 0 bits" in str(caught.value)
    head = Policy.uniform(analysis)
    head.layers["head"].weight_bits[0] = 0
    with pytest.raises(PolicyError, match=r"layer 'head' cannot be pruned \(model outputs, never pruned\)"):
        validate_policy(head, analysis)


def test_ray_backend_puts_back_the_signal_handlers(monkeypatch) -> None:
    """ray.init installs handlers of its own (SIGTERM -> SystemExit); the backend restores the previous ones."""
    import types

    import ajpq.backends as backends

    def ray_handler(signum: int, frame: Any) -> None:
        raise SystemExit(signum)

    state = {"up": False}

    def init(**kwargs: Any) -> None:
        state["up"] = True
        signal.signal(signal.SIGTERM, ray_handler)
        signal.signal(signal.SIGINT, ray_handler)

    fake = types.SimpleNamespace(
        is_initialized=lambda: state["up"],
        init=init,
        cluster_resources=lambda: {"CPU": 1},
        remote=lambda **kw: lambda cls: types.SimpleNamespace(remote=lambda *a: object()),
        put=lambda spec: spec,
        kill=lambda actor: None,
        shutdown=lambda: state.update(up=False),
    )
    monkeypatch.setattr(backends, "_ray", lambda: fake)
    monkeypatch.setattr(backends.RayBackend, "where", lambda self: [])
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    backend = backends.RayBackend(Any, 1)  # type: ignore[arg-type]
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the search's own handlers during the search
    signal.signal(signal.SIGTERM, ray_handler)  # as ray.shutdown may leave them
    backend.close()
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.expensive
def test_a_search_on_a_local_ray_leaves_the_signal_handlers_as_they_were(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from ajpq.runner import run_search
    from ajpq.search_config import SearchConfig

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    config = SearchConfig(
        episodes=2, warm_start=False, backend="ray", workers=1, run_dir=str(tmp_path / "run"), progress=False
    )
    run_search(config)
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.parametrize(
    "state,message",
    [
        ({"episode": 2, "best": "x"}, "best is not an episode record"),
        ({"episode": 2, "slot": "../../etc"}, "slot is not a checkpoint folder name"),
        ({"episode": 2, "rng": {"python": 1}}, "rng is not the random states"),
        ({"episode": True}, "no episode count"),
    ],
)
def test_crafted_checkpoint_states_are_one_line(tmp_path: Path, state: dict[str, Any], message: str) -> None:
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match=message):
        RunDir(tmp_path).load_state()


def test_random_states_the_libraries_refuse_are_one_line() -> None:
    from ajpq.methods.base import rng_state, set_rng_state

    good = rng_state()
    for bad in ({**good, "python": "(1, ("}, {**good, "numpy": ["MT19937", [1, 2]]}, {**good, "torch": [1, 2, 3]}):
        with pytest.raises(ArtifactError, match="random states are not Python's, numpy's and torch's"):
            set_rng_state(bad)
    set_rng_state(good)


def test_found_by_the_fuzzers(artifact_data: bytes, tmp_path: Path) -> None:
    """Cases the long fuzzers found: a layer record without its bias, a state.json that is one huge number."""
    from ajpq import load_compressed

    path = tmp_path / "crafted.ajpq"
    path.write_bytes(crafted(artifact_data, lambda header: header["layers"][3].pop("bias")))
    with pytest.raises(ArtifactError, match="layer 'fc1' has a bias the artifact does not store"):
        load_compressed(path)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text("9" * 5000)
    with pytest.raises(ArtifactError, match=r"state\.json: holds a number of more than 4300 digits"):
        RunDir(tmp_path).load_state()


def test_a_long_received_value_in_a_message_is_cut_to_one_short_line(tmp_path: Path) -> None:
    """Found by the long config fuzzer: a 5,000-character string as a config value was quoted whole."""
    from ajpq.errors import MAX_MESSAGE, ConfigError
    from ajpq.search_config import SearchConfig

    with pytest.raises(ConfigError) as caught:
        SearchConfig(method="a" * 5000)
    message = str(caught.value)
    assert len(message) <= MAX_MESSAGE and message.startswith("method must be one of")
    assert message.endswith("aaaa'") and " ... " in message
