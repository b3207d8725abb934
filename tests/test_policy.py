"""The policy file: round trip, completion, and every refusal with its message."""

from __future__ import annotations

import json

import numpy as np
import pytest
from nets import ResidualDepthwiseNet

from ajpq.analysis import analyze_model
from ajpq.errors import PolicyError
from ajpq.models import build_model
from ajpq.policy import POLICY_VERSION, LayerPolicy, Policy, load_policy, validate_policy


@pytest.fixture(scope="module")
def digits():
    return analyze_model(build_model("digits_cnn", (1, 8, 8), 10), (1, 8, 8), model_name="digits_cnn")


@pytest.fixture(scope="module")
def residual():
    return analyze_model(ResidualDepthwiseNet(), (1, 4, 4), model_name="resdw")


def _write(tmp_path, data, name="p.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _policy_dict(layers, **top):
    return {"format": "ajpq-policy", "version": 1, "model": {"name": "digits_cnn"}, "layers": layers, **top}


def test_round_trip_keeps_bits_metrics_and_meta(tmp_path, digits):
    rng = np.random.default_rng(0)
    policy = Policy.uniform(digits)
    for name, layer in policy.layers.items():
        if name != "fc2":
            layer.weight_bits = rng.integers(0, 9, size=layer.weight_bits.size)
            layer.weight_bits[0] = 3
        layer.activation_bits = int(rng.choice([4, 8, 32]))
    policy.metrics = {"accuracy": 0.91}
    policy = policy.with_meta("hand", seed=7)
    path = policy.save(tmp_path / "policy.json")
    loaded = load_policy(path, digits)
    for name in policy.layers:
        assert loaded.layers[name].weight_bits.tolist() == policy.layers[name].weight_bits.tolist()
        assert loaded.layers[name].activation_bits == policy.layers[name].activation_bits
    assert loaded.metrics == {"accuracy": 0.91} and loaded.meta["seed"] == 7 and loaded.meta["method"] == "hand"
    data = json.loads(path.read_text())
    assert data["format"] == "ajpq-policy" and data["version"] == POLICY_VERSION
    assert data["model"]["fingerprint"] == digits.fingerprint


def test_left_out_layers_get_eight_bits(tmp_path, digits):
    path = _write(tmp_path, _policy_dict([{"name": "conv1", "weight_bits": [4] * 16}]))
    policy = load_policy(path, digits)
    assert policy.layers["conv1"].weight_bits.tolist() == [4] * 16
    assert policy.layers["fc1"].weight_bits.tolist() == [8] * 64 and policy.layers["fc1"].activation_bits == 8


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"format": "haq", "version": 1, "layers": []}, r"not an AJPQ policy \(expected \"format\": \"ajpq-policy\""),
        (_policy_dict([], version=9), r"version 9 is not readable .* reads version\(s\) 1"),
        (
            _policy_dict([{"name": "cov1", "weight_bits": [8] * 16}]),
            r"no compressible layer 'cov1'; did you mean 'conv1'",
        ),
        (
            _policy_dict([{"name": "conv1", "weight_bits": [8] * 15}]),
            r"'conv1' has 16 output channels, but weight_bits has 15",
        ),
        (_policy_dict([{"name": "conv1", "weight_bits": [8] * 15 + [9]}]), r"integers from 0 to 8 .* channel 15 has 9"),
        (_policy_dict([{"name": "conv1", "weight_bits": [8] * 15 + [2.5]}]), r"channel 15 has 2.5"),
        (
            _policy_dict([{"name": "conv1", "weight_bits": [8] * 16, "activation_bits": 1}]),
            r"activation_bits must be one of",
        ),
        (
            _policy_dict([{"name": "fc2", "weight_bits": [8] * 9 + [0]}]),
            r"'fc2' cannot be pruned \(model outputs, never pruned\).*\[9\]",
        ),
        (_policy_dict([{"name": "conv3", "weight_bits": [0] * 32}]), r"every channel of layer 'conv3' has 0 bits"),
        (_policy_dict([{"name": "conv1", "weight_bit": [8] * 16}]), r"unknown key\(s\) \['weight_bit'\]"),
        (
            _policy_dict([], model={"name": "lenet5", "fingerprint": "0123abcd"}),
            r"fingerprint 0123abcd, but 'digits_cnn'",
        ),
        (_policy_dict([{"name": "conv1", "weight_bits": [8] * 16}] * 2), r"'conv1' appears twice"),
    ],
)
def test_refusals(tmp_path, digits, data, message):
    with pytest.raises(PolicyError, match=message):
        load_policy(_write(tmp_path, data), digits)


def test_coupled_channels_must_agree(residual):
    policy = Policy(layers={"conv1": LayerPolicy([8, 0, 8, 8]), "dw": LayerPolicy([8, 8, 8, 8])})
    with pytest.raises(
        PolicyError, match=r"coupled channels disagree in group 0 \(layers conv1, .*channel 1 is pruned"
    ):
        validate_policy(policy, residual)
    both = Policy(layers={name: LayerPolicy([8, 0, 4, 2]) for name in ("conv1", "conv2", "dw")})
    assert validate_policy(both, residual).layers["dw"].weight_bits.tolist() == [8, 0, 4, 2]


def test_file_level_errors(tmp_path, digits):
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "missing.json", digits)
    with pytest.raises(PolicyError, match=r"not valid JSON .* truncated"):
        load_policy(_write(tmp_path, '{"format": "ajpq-policy", "version": 1, "lay'), digits)
    with pytest.raises(PolicyError, match="expected a JSON object"):
        load_policy(_write(tmp_path, [1, 2]), digits)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, digits):
    path = tmp_path / "best.json"
    Policy.uniform(digits, 4).save(path)
    Policy.uniform(digits, 2).save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]
    assert load_policy(path, digits).layers["conv1"].weight_bits[0] == 2


def test_written_files_get_the_usual_permissions(tmp_path, digits):
    import os

    path = Policy.uniform(digits).save(tmp_path / "shared.json")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
