"""Property tests for every reader of a received file (issue 25): start from a valid file, mutate it at random
(drop, duplicate and retype keys, huge/negative/NaN numbers, wrong shapes, truncation, bit flips with the
checksums recomputed) and require a valid object or one :class:`AJPQError` with a one-line message; never another
exception, never more than a small allocation, never code run.

The default run is a fixed-seed subset (``derandomize``); the ``expensive`` variants run many more cases.
"""

from __future__ import annotations

import copy
import hashlib
import json
import resource
import sys
import tempfile
import textwrap
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ajpq.errors import AJPQError

FAST = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
LONG = settings(FAST, max_examples=1500, derandomize=False)
CASE_MEMORY = 64 * 2**20
"""The most a single case may allocate (tracemalloc's peak: Python objects and numpy arrays)."""
RUN_MEMORY = 1 << 30
"""The most the process's peak resident memory may grow over a whole fuzzer (torch allocations included)."""
MARKER_MODULE = "ajpq_fuzz_marker"

# ------------------------------------------------------------------------------------------------ mutations
WEIRD: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    7,
    32,
    10**12,
    -(10**30),
    2**63,
    0.5,
    -0.0,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    "x",
    "__class__",
    "os:system",
    f"{MARKER_MODULE}:build",
    "a" * 5000,
    "DIGITS",
    [],
    [1],
    [1, 200000, 200000],
    [0, 10**9],
    [[]],
    {},
    {"bits": 1000000},
]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node[:20]):  # long lists (weight bits): their first entries stand for all
            yield from _paths(value, (*prefix, index))


def _at(node: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


OPERATIONS = ("drop", "duplicate", "retype", "shorten", "lengthen", "negate", "scale")
mutation = st.tuples(st.sampled_from(OPERATIONS), st.integers(0, 10**6), st.sampled_from(WEIRD))
mutations = st.lists(mutation, min_size=1, max_size=4)


def mutate(tree: Any, plan: list[tuple[str, int, Any]]) -> Any:
    """``tree`` (JSON-like) with the mutations of ``plan`` applied in order, each at a node picked by its index."""
    tree = copy.deepcopy(tree)
    for operation, pick, value in plan:
        paths = list(_paths(tree))
        path = paths[pick % len(paths)]
        if not path:
            tree = copy.deepcopy(value) if operation == "retype" else tree  # never the shared WEIRD value itself
            continue
        parent, key = _at(tree, path[:-1]), path[-1]
        node = parent[key]
        if operation == "drop":
            del parent[key]
        elif operation == "duplicate":
            if isinstance(parent, list):
                parent.insert(key, copy.deepcopy(node))
            else:
                parent[f"{key}_copy" if pick % 2 else "extra"] = copy.deepcopy(node)
        elif operation == "retype":
            parent[key] = copy.deepcopy(value)
        elif operation == "shorten" and isinstance(node, list | str):
            parent[key] = node[: len(node) // 2]
        elif operation == "lengthen" and isinstance(node, list | str):
            parent[key] = node + node[:1] * (1 + pick % 3)
        elif operation == "negate" and isinstance(node, int | float) and not isinstance(node, bool):
            parent[key] = -node - 1
        elif operation == "scale" and isinstance(node, int | float) and not isinstance(node, bool):
            parent[key] = node * 10**6
    return tree


def damage_bytes(data: bytes, plan: list[tuple[str, int, Any]]) -> bytes:
    """Byte-level damage: truncation and bit flips (the checksums, where a reader has them, catch these)."""
    out = bytearray(data)
    for operation, pick, _ in plan:
        if not out:
            break
        if operation in ("drop", "shorten"):
            del out[pick % len(out) :]
        else:
            out[pick % len(out)] ^= 1 << (pick % 8)
    return bytes(out)


def dumps(tree: Any) -> str:
    """JSON text of a mutated tree; a 5,000-digit number is spliced in as text (json.dumps cannot write one)."""
    return json.dumps(tree).replace('"DIGITS"', "9" * 5000)


# ------------------------------------------------------------------------------------------------ the property
@pytest.fixture(scope="module")
def marker_dir() -> Iterator[Path]:
    """A module that, were any reader to import it, would leave a marker file (code named by a file ran)."""
    folder = Path(tempfile.mkdtemp(prefix="ajpq-fuzz-"))
    (folder / f"{MARKER_MODULE}.py").write_text(
        textwrap.dedent(
            """
            from pathlib import Path
            Path(__file__).with_name("MARKER").write_text("code named by a received file ran")
            def build(*args, **kwargs):
                raise RuntimeError("factory called")
            """
        )
    )
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    assert not (folder / "MARKER").exists(), "a received file made a reader import code"
    assert MARKER_MODULE not in sys.modules


class Fuzzer:
    """Runs one reader on one case and checks the property; counts the outcomes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.valid = 0
        self.refused = 0
        self.start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def check(self, read: Callable[[], Any]) -> None:
        tracemalloc.start()
        try:
            read()
            self.valid += 1
        except AJPQError as exc:
            message = str(exc)
            assert message and "\n" not in message and len(message) < 2000, message[:3000]
            self.refused += 1
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < CASE_MEMORY, f"{self.name}: one case allocated {peak / 2**20:.0f} MiB"

    def finish(self) -> None:
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start_rss
        print(f"fuzz {self.name}: {self.valid + self.refused} cases, {self.valid} valid, {self.refused} refused")
        assert grown < RUN_MEMORY, f"{self.name}: peak memory grew by {grown / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------ valid files
@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    from ajpq.analysis import analyze_model
    from ajpq.artifact import build_artifact
    from ajpq.models import build_model
    from ajpq.policy import Policy, validate_policy

    torch.manual_seed(0)
    model = build_model("digits_cnn", (1, 8, 8), 10).eval()
    analysis = analyze_model(model, (1, 8, 8), model_name="digits_cnn")
    policy = Policy.uniform(analysis, 4)
    policy.layers["conv2"].weight_bits[:3] = 0
    policy.layers["fc1"].weight_sparsity = 0.5
    policy = validate_policy(policy, analysis)
    artifact = build_artifact(
        model,
        analysis,
        policy,
        torch.randn(32, 1, 8, 8),
        model_name="digits_cnn",
        input_shape=(1, 8, 8),
        num_classes=10,
        dataset="digits",
    )
    return {"model": model, "analysis": analysis, "policy": policy, "artifact": artifact.to_bytes()}


def _file(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix="ajpq-fuzz-case-")) / name


# ------------------------------------------------------------------------------------------------ policy loader
def _policy_case(digits: dict[str, Any], fuzzer: Fuzzer, plan: list[Any], raw: bool) -> None:
    from ajpq.policy import load_policy

    valid = digits["policy"].to_dict()
    path = _file("policy.json")
    if raw:
        path.write_bytes(damage_bytes(json.dumps(valid).encode(), plan))
    else:
        path.write_text(dumps(mutate(valid, plan)))
    fuzzer.check(lambda: load_policy(path, digits["analysis"]))


def _policy_fuzz(config: settings) -> Callable[..., None]:
    @config
    @given(plan=mutations, raw=st.booleans())
    def run(digits: dict[str, Any], marker_dir: Path, fuzzer: Fuzzer, plan: list[Any], raw: bool) -> None:
        _policy_case(digits, fuzzer, plan, raw)

    return run


@pytest.fixture
def fuzzer(request: pytest.FixtureRequest) -> Iterator[Fuzzer]:
    runner = Fuzzer(request.node.name)
    yield runner
    runner.finish()


test_fuzz_policy_loader = _policy_fuzz(FAST)
test_fuzz_policy_loader_long = pytest.mark.expensive(_policy_fuzz(LONG))


# ------------------------------------------------------------------------------------------------ config loader
VALID_CONFIG = {
    "model": "digits_cnn",
    "dataset": "digits",
    "seed": 1,
    "episodes": 8,
    "size_budget": 0.1,
    "bops_budget": None,
    "method": "ajpq",
    "method_options": {},
    "workers": 2,
    "activation_bits": 8,
    "max_sparsity": 0.5,
}


def _config_case(fuzzer: Fuzzer, plan: list[Any], raw: bool) -> None:
    import yaml

    from ajpq.config import load_config_file
    from ajpq.search_config import CONFIG_KEYS, SearchConfig

    text = yaml.safe_dump({"default": mutate(VALID_CONFIG, plan)}, allow_unicode=True).replace("DIGITS", "9" * 5000)
    if raw:
        text = damage_bytes(yaml.safe_dump({"default": VALID_CONFIG}).encode(), plan).decode("utf-8", "replace")
    if plan[0][1] % 5 == 0:
        text = text.replace("seed: 1", "seed: &s 1\n  split_seed: *s")  # an alias
    path = _file("config.yaml")
    path.write_text(text)
    fuzzer.check(lambda: SearchConfig.from_dict(load_config_file(path, CONFIG_KEYS)).to_dict())


def _config_fuzz(config: settings) -> Callable[..., None]:
    @config
    @given(plan=mutations, raw=st.booleans())
    def run(marker_dir: Path, fuzzer: Fuzzer, plan: list[Any], raw: bool) -> None:
        _config_case(fuzzer, plan, raw)

    return run


test_fuzz_config_loader = _config_fuzz(FAST)
test_fuzz_config_loader_long = pytest.mark.expensive(_config_fuzz(LONG))


# ------------------------------------------------------------------------------------------------ checkpoint loader
def _checkpoint_case(digits: dict[str, Any], fuzzer: Fuzzer, plan: list[Any], raw: bool) -> None:
    from ajpq.checkpoint import load_checkpoint, load_weights
    from ajpq.models import build_model

    meta = {
        "format": "ajpq-checkpoint",
        "version": 1,
        "model": "digits_cnn",
        "dataset": "digits",
        "split_seed": 0,
        "val_size": 288,
        "input_shape": [1, 8, 8],
        "num_classes": 10,
        "policy": digits["policy"].to_dict(),
        "activation_ranges": {"conv1": {"bits": 4, "max_abs": 1.5, "signed": True}},
    }
    mutated = meta if raw else mutate(meta, plan)
    if not isinstance(mutated, dict):
        mutated = {"state_dict": mutated}
    mutated["state_dict"] = digits["model"].state_dict() if plan[0][1] % 3 else mutated.get("state_dict", [1])
    path = _file("ckpt.pt")
    torch.save(mutated, path)
    if raw:
        path.write_bytes(damage_bytes(path.read_bytes(), plan))

    def read() -> None:
        checkpoint = load_checkpoint(path)
        load_weights(build_model("digits_cnn", (1, 8, 8), 10), checkpoint, "digits_cnn", str(path))

    fuzzer.check(read)


def _checkpoint_fuzz(config: settings) -> Callable[..., None]:
    @config
    @given(plan=mutations, raw=st.booleans())
    def run(digits: dict[str, Any], marker_dir: Path, fuzzer: Fuzzer, plan: list[Any], raw: bool) -> None:
        _checkpoint_case(digits, fuzzer, plan, raw)

    return run


test_fuzz_checkpoint_loader = _checkpoint_fuzz(FAST)
test_fuzz_checkpoint_loader_long = pytest.mark.expensive(_checkpoint_fuzz(LONG))


# ------------------------------------------------------------------------------------------------ artifacts
def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    from ajpq.artifact import _PREAMBLE, PREAMBLE_BYTES

    (length,) = _PREAMBLE.unpack_from(data)[3:4]
    return json.loads(data[PREAMBLE_BYTES : PREAMBLE_BYTES + length]), data[PREAMBLE_BYTES + length :]


def _sealed(header_text: str, payload: bytes) -> bytes:
    """An artifact of this header text and payload with both checksums recomputed (what an attacker can do)."""
    from ajpq.artifact import _PREAMBLE, ARTIFACT_VERSION, MAGIC

    try:
        header = json.loads(header_text)
    except ValueError:
        header = None
    if isinstance(header, dict) and isinstance(header.get("payload"), dict):
        header["payload"]["sha256"] = hashlib.sha256(payload).hexdigest()
        header_text = dumps(header)
    raw = header_text.encode("utf-8")
    return _PREAMBLE.pack(MAGIC, ARTIFACT_VERSION, 0, len(raw), hashlib.sha256(raw).digest()) + raw + payload


def _artifact_case(digits: dict[str, Any], fuzzer: Fuzzer, plan: list[Any], mode: str, load: bool) -> None:
    from ajpq.artifact import load_compressed, parse_artifact

    header, payload = _split(digits["artifact"])
    if mode == "header":
        data = _sealed(dumps(mutate(header, plan)), payload)
    elif mode == "payload":  # payload bits flipped or cut, its checksum (and the header's) recomputed
        damaged = damage_bytes(payload, plan)
        header["payload"]["bytes"] = len(damaged)
        data = _sealed(dumps(header), damaged)
    else:  # raw damage, checksums left as they are
        data = damage_bytes(digits["artifact"], plan)
    path = _file("model.ajpq")
    path.write_bytes(data)
    fuzzer.check(lambda: load_compressed(path) if load else parse_artifact(data, str(path)))


def _artifact_fuzz(config: settings, load: bool) -> Callable[..., None]:
    @config
    @given(plan=mutations, mode=st.sampled_from(["header", "header", "payload", "raw"]))
    def run(digits: dict[str, Any], marker_dir: Path, fuzzer: Fuzzer, plan: list[Any], mode: str) -> None:
        _artifact_case(digits, fuzzer, plan, mode, load)

    return run


test_fuzz_artifact_parser = _artifact_fuzz(FAST, load=False)
test_fuzz_artifact_loader = _artifact_fuzz(settings(FAST, max_examples=80), load=True)
test_fuzz_artifact_parser_long = pytest.mark.expensive(_artifact_fuzz(LONG, load=False))
test_fuzz_artifact_loader_long = pytest.mark.expensive(_artifact_fuzz(settings(LONG, max_examples=600), load=True))


# ------------------------------------------------------------------------------------------------ run folders
def _run_files(digits: dict[str, Any]) -> dict[str, Any]:
    from ajpq.runs import encode_policy

    policy = digits["policy"]
    episodes = [
        {"episode": i, "reward": -0.01 * i, "accuracy": 0.9, "size_ratio": 0.1, "feasible": True, "phase": "rl"}
        for i in (1, 2, 3)
    ]
    return {
        "episodes.jsonl": episodes,
        "policies.jsonl": [{"episode": i, **encode_policy(policy)} for i in (1, 2, 3)],
        "run.json": {
            "model": "digits_cnn",
            "fingerprint": policy.fingerprint,
            "weights_digest": "ab",
            "method": "ajpq",
        },
        "config.yaml": {"model": "digits_cnn", "dataset": "digits", "seed": 1, "episodes": 3, "method": "ajpq"},
        "state.json": {"episode": 3, "slot": "ep000003", "best": episodes[0], "method": "ajpq"},
    }


def _run_case(digits: dict[str, Any], fuzzer: Fuzzer, plan: list[Any], target: str, raw: bool) -> None:
    import yaml

    from ajpq.runs import RunDir, best_by_phase

    folder = Path(tempfile.mkdtemp(prefix="ajpq-fuzz-run-"))
    files = _run_files(digits)
    for name, content in files.items():
        if name == target and not raw:
            content = mutate(content, plan)
        if name.endswith(".jsonl"):
            text = "".join(dumps(row) + "\n" for row in content) if isinstance(content, list) else dumps(content)
        elif name.endswith(".yaml"):
            text = yaml.safe_dump({"default": content}).replace("DIGITS", "9" * 5000)
        else:
            text = dumps(content)
        data = text.encode()
        if name == target and raw:
            data = damage_bytes(data, plan)
        path = folder / ("checkpoint/state.json" if name == "state.json" else name)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)

    def read() -> None:
        run = RunDir.open(folder)
        run.load_state()
        run.check_records()
        best_by_phase(run.read_episodes())
        run.read_info()
        run.read_config()
        run.export_policy(2)

    fuzzer.check(read)


def _run_fuzz(config: settings) -> Callable[..., None]:
    @config
    @given(plan=mutations, target=st.sampled_from(list(_RUN_FILES)), raw=st.booleans())
    def run(digits: dict[str, Any], marker_dir: Path, fuzzer: Fuzzer, plan: list[Any], target: str, raw: bool) -> None:
        _run_case(digits, fuzzer, plan, target, raw)

    return run


_RUN_FILES = ("episodes.jsonl", "policies.jsonl", "run.json", "config.yaml", "state.json")
test_fuzz_run_folder_reader = _run_fuzz(FAST)
test_fuzz_run_folder_reader_long = pytest.mark.expensive(_run_fuzz(LONG))
