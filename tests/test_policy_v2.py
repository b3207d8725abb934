"""Policy file version 2: per-layer weight sparsity, its exact sparse-storage cost, and reading version 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ajpq.analysis import analyze_model
from ajpq.compress import SimulatedModel
from ajpq.cost import CostModel, magnitude_mask, sparse_storage_bits
from ajpq.errors import PolicyError
from ajpq.policy import LayerPolicy, Policy, load_policy, policy_from_dict, validate_policy


class TinyNet(nn.Module):
    """fc1: 40 inputs -> 2 channels (the layer whose storage we count by hand), fc2: 2 -> 2 classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(40, 2)
        self.fc2 = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def tiny(big: dict[int, list[int]]):
    """TinyNet whose fc1 weights are 1.0 at the ``big`` positions of each channel and tiny distinct values elsewhere."""
    model = TinyNet()
    with torch.no_grad():
        weight = torch.arange(1, 81, dtype=torch.float32).reshape(2, 40) * 1e-4
        for channel, positions in big.items():
            weight[channel, positions] = 1.0
        model.fc1.weight.copy_(weight)
    analysis = analyze_model(model, (1, 5, 8), model_name="tiny")
    return model, analysis


def sparse_policy(analysis, sparsity: float) -> Policy:
    policy = Policy.uniform(analysis)
    policy.layers["fc1"] = LayerPolicy(np.array([4, 2]), 8, sparsity)
    return validate_policy(policy, analysis)


def test_relative_index_storage_matches_hand_count():
    # Kept stream positions (channel 0 = 0..39, channel 1 = 40..79): 0, 3, 20 | 45, 79.
    model, analysis = tiny({0: [0, 3, 20], 1: [5, 39]})
    cost = CostModel.from_model(analysis, model).evaluate(sparse_policy(analysis, 75 / 80))
    fc1 = cost.layers[0]
    # entries: 0 (gap 0), 3 (gap 2), 20 (gap 16: 1 filler at 19, ch0), 45 (gap 24: 1 filler at 36, ch0),
    # 79 (gap 33: fillers at 61 and 77, ch1). Each entry/filler costs bits + 4: ch0 8 bits, ch1 6 bits.
    relative = (8 + 8 + 8 + 6 + 6) + (8 + 8 + 6 + 6)
    bitmap = 80 + 3 * 4 + 2 * 2
    assert relative == 64 < bitmap == 96
    assert fc1.storage == "relative-index"
    assert fc1.weights == 5
    assert fc1.index_bits == relative - (3 * 4 + 2 * 2)
    assert fc1.size_bits == relative + 2 * (16 + 32)
    assert fc1.bops == (3 * 4 + 2 * 2) * 1 * 8
    # the classifier stays dense and keeps the version-1 formula
    assert cost.layers[1].storage == "dense"
    assert cost.layers[1].size_bits == 2 * (2 * 8 + 16 + 32)


def test_bitmap_storage_matches_hand_count():
    # channel 0 keeps its first 20 weights, channel 1 keeps all 40: 20 removed of 80.
    model, analysis = tiny({0: list(range(20)), 1: list(range(40))})
    fc1 = CostModel.from_model(analysis, model).evaluate(sparse_policy(analysis, 0.25)).layers[0]
    values = 20 * 4 + 40 * 2
    relative = 20 * 8 + 40 * 6 + 8  # one filler (ch0) for the 20-zero gap
    assert fc1.storage == "bitmap"
    assert fc1.size_bits == min(relative, 80 + values) + 2 * (16 + 32) == 80 + values + 96
    assert fc1.weights == 60


def test_storage_helper_counts_long_gaps_and_empty_streams():
    stream = np.zeros(100, dtype=bool)
    stream[[50, 99]] = True
    bits = np.full(100, 3)
    # 50 zeros -> 3 fillers, 48 zeros -> 3 fillers; 8 entries of 3 + 4 bits
    assert sparse_storage_bits(stream, bits) == (8 * 7, 0)
    assert sparse_storage_bits(np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64)) == (0, 0)


def test_simulation_zeroes_exactly_the_masked_weights():
    model, analysis = tiny({0: [0, 3, 20], 1: [5, 39]})
    simulated = SimulatedModel(model, analysis, torch.randn(8, 1, 5, 8))
    module = simulated.apply(sparse_policy(analysis, 75 / 80))
    nonzero = (module.fc1.weight != 0).nonzero().tolist()
    assert nonzero == [[0, 0], [0, 3], [0, 20], [1, 5], [1, 39]]
    keep = magnitude_mask(model.fc1.weight, torch.ones(2, 40, dtype=torch.bool), 75 / 80)
    assert keep.sum() == 5 and bool((keep == (module.fc1.weight != 0)).all())
    assert simulated.cost_model.evaluate(sparse_policy(analysis, 75 / 80)).layers[0].weights == 5


def test_zero_sparsity_keeps_the_dense_cost_and_needs_no_weights():
    model, analysis = tiny({0: [0]})
    dense = Policy.uniform(analysis, 4)
    assert CostModel(analysis).evaluate(dense) == CostModel.from_model(analysis, model).evaluate(dense)
    with pytest.raises(PolicyError, match="built without weights"):
        CostModel(analysis).evaluate(sparse_policy(analysis, 0.5))


def test_version_1_files_still_load(tmp_path):
    _, analysis = tiny({0: [0]})
    v1 = {
        "format": "ajpq-policy",
        "version": 1,
        "model": {"name": "tiny"},
        "layers": [{"name": "fc1", "weight_bits": [3, 0], "activation_bits": 6}],
    }
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(v1))
    policy = load_policy(path, analysis)
    assert policy.layers["fc1"].weight_bits.tolist() == [3, 0]
    assert policy.layers["fc1"].weight_sparsity == 0.0
    v1["layers"][0]["weight_sparsity"] = 0.5
    with pytest.raises(PolicyError, match='needs "version": 2'):
        policy_from_dict(v1, "v1.json")


def test_version_2_round_trip_writes_sparsity_only_where_used(tmp_path):
    _, analysis = tiny({0: [0]})
    policy = sparse_policy(analysis, 0.3125)
    path = policy.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["version"] == 2
    assert data["layers"][0]["weight_sparsity"] == 0.3125
    assert "weight_sparsity" not in data["layers"][1]
    again = load_policy(path, analysis)
    assert again.layers["fc1"].weight_sparsity == 0.3125
    assert again.to_dict() == policy.to_dict()
    assert again.copy().layers["fc1"].weight_sparsity == 0.3125


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, "0.5", True, None, float("nan")])
def test_bad_weight_sparsity_is_refused_with_a_clear_message(value):
    data = {
        "format": "ajpq-policy",
        "version": 2,
        "layers": [{"name": "fc1", "weight_bits": [3, 3], "weight_sparsity": value}],
    }
    with pytest.raises(PolicyError, match=r"weight_sparsity.*must be .*\[0, 1\)"):
        policy_from_dict(data, "p.json")


def test_unknown_version_names_the_readable_ones():
    with pytest.raises(PolicyError, match=r"reads version\(s\) 1, 2"):
        policy_from_dict({"format": "ajpq-policy", "version": 3, "layers": []}, "p.json")
