"""Model analysis and the cost model, against values computed by hand."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from nets import (
    ConcatNet,
    GroupedConvNet,
    LayerNormMLP,
    ResidualDepthwiseNet,
    ShuffleNet,
    randomize_batchnorm,
)

from ajpq.analysis import NETWORK_INPUT, analyze_model, channel_importance
from ajpq.compress import SimulatedModel
from ajpq.cost import CostModel, LayerCost, channel_extra_bits
from ajpq.errors import ModelError, PolicyError
from ajpq.models import build_model
from ajpq.policy import LayerPolicy, Policy, validate_policy


@pytest.fixture(scope="module")
def residual():
    torch.manual_seed(0)
    model = randomize_batchnorm(ResidualDepthwiseNet())
    return model, analyze_model(model, (1, 4, 4), model_name="resdw")


def test_layers_in_execution_order_with_shapes_and_macs(residual):
    _, analysis = residual
    assert analysis.layer_names == ["conv1", "conv2", "dw", "pw", "fc"]
    dw = analysis.layer("dw")
    assert (dw.type, dw.groups, dw.fan_in, dw.out_hw, dw.macs) == ("depthwise", 4, 9, 16, 576)
    assert analysis.layer("pw").macs == 6 * 4 * 16
    assert analysis.layer("fc").in_channels == 24 and analysis.layer("fc").out_hw == 1
    assert [layer.bn_name for layer in analysis.layers] == ["bn1", "bn2", "bn3", None, None]
    assert analysis.other_params == 0  # every BatchNorm is folded


def test_residual_and_depthwise_channels_are_coupled(residual):
    _, analysis = residual
    shared = analysis.group_of("conv1")
    assert sorted(shared.members) == ["conv1", "conv2", "dw"]
    assert shared.prunable
    assert analysis.group_of("pw").members == ["pw"]
    assert not analysis.group_of("fc").prunable  # classifier outputs
    # flatten: fc's 24 inputs are pw's 6 channels x 2x2 positions
    assert analysis.in_group["fc"].tolist() == [analysis.layer("pw").group] * 24
    assert analysis.in_root["fc"].tolist() == [c for c in range(6) for _ in range(4)]
    assert analysis.in_group["conv1"].tolist() == [NETWORK_INPUT]


def test_concat_consumer_reads_two_groups():
    analysis = analyze_model(ConcatNet(), (1, 5, 5))
    left, right = analysis.layer("left").group, analysis.layer("right").group
    assert analysis.in_group["merge"].tolist() == [left, left, right, right, right, right]
    assert analysis.in_root["merge"].tolist() == [0, 1, 0, 1, 2, 3]
    assert analysis.other_params == 1  # the temperature parameter
    assert not analysis.group_of("head").prunable


def _hand_policy(analysis):
    policy = Policy(
        layers={
            "conv1": LayerPolicy([8, 0, 4, 2], 8),
            "conv2": LayerPolicy([4, 0, 4, 4], 4),
            "dw": LayerPolicy([8, 0, 8, 1], 8),
            "pw": LayerPolicy([8, 8, 0, 4, 4, 2], 6),
            "fc": LayerPolicy([8, 8, 8], 8),
        }
    )
    return validate_policy(policy, analysis)


def test_cost_model_matches_hand_count(residual):
    _, analysis = residual
    report = CostModel(analysis).evaluate(_hand_policy(analysis))
    # conv1: fan_in 9 (network input); kept bits 8+4+2; 3 kept x (16 scale + 32 folded-BN bias)
    # conv2: 3 of 4 inputs kept -> fan_in 27; dw: fan_in 9; pw: 3 inputs -> 3; fc: pw ch 2 gone -> 20 inputs
    sizes = {layer.name: layer.size_bits for layer in report.layers}
    assert sizes == {
        "conv1": 9 * 14 + 3 * 48,
        "conv2": 27 * 12 + 3 * 48,
        "dw": 9 * 17 + 3 * 48,
        "pw": 3 * 26 + 5 * 48,
        "fc": 20 * 24 + 3 * 48,
    }
    assert report.size_bits == 1977
    assert report.bops == 9 * 14 * 16 * 8 + 27 * 12 * 16 * 4 + 9 * 17 * 16 * 8 + 3 * 26 * 16 * 6 + 20 * 24 * 8
    assert report.reference_size_bits == 4 * 320 + 4 * 1184 + 4 * 320 + 6 * 160 + 3 * 800
    assert report.reference_bops == (576 + 2304 + 576 + 384 + 72) * 32 * 32
    assert report.size_ratio == pytest.approx(1977 / 10656)
    assert report.compression_rate == pytest.approx(10656 / 1977)


def test_kept_inputs_follow_the_pruned_channels_into_their_readers(residual):
    _, analysis = residual
    inputs = CostModel(analysis).kept_inputs(_hand_policy(analysis))  # channel 1 of conv1/conv2/dw, 2 of pw pruned
    assert inputs["conv1"].tolist() == [True]  # the network input
    assert inputs["conv2"].tolist() == inputs["dw"].tolist() == inputs["pw"].tolist() == [True, False, True, True]
    assert inputs["fc"].tolist() == [c != 2 for c in range(6) for _ in range(4)]  # flatten: 4 positions per channel


def test_layer_cost_from_counts_by_hand(residual):
    _, analysis = residual
    pw = analysis.layer("pw")  # 6 channels, 16 output positions, a bias
    bits = np.array([8, 8, 0, 4, 4, 2])
    dense = LayerCost.from_counts(pw, bits, 6, weights=15, value_bits=78)
    assert (dense.kept_channels, dense.size_bits, dense.bops, dense.index_bits) == (5, 78 + 5 * 48, 78 * 16 * 6, 0)
    assert dense.mean_bits == pytest.approx(78 / 15) and dense.storage == "dense"
    no_bias = replace(pw, has_bias=False)
    sparse = LayerCost.from_counts(no_bias, bits, 6, 15, 78, storage_bits=90, storage="bitmap")
    assert (sparse.size_bits, sparse.bops, sparse.index_bits) == (90 + 5 * 16, 78 * 16 * 6, 90 - 78)
    assert channel_extra_bits(pw) == 16 + 32 and channel_extra_bits(no_bias) == 16


def test_other_parameters_count_in_both_numerator_and_denominator():
    analysis = analyze_model(ConcatNet(), (1, 5, 5))
    cost = CostModel(analysis)
    report = cost.evaluate(Policy.uniform(analysis, 32 // 4, 8))
    fp32 = 2 * (9 * 32 + 32) + 4 * (9 * 32 + 32) + 5 * (54 * 32 + 32) + 2 * (5 * 32 + 32)
    assert cost.reference_size_bits == fp32 + 32
    assert report.size_bits == 2 * (9 * 8 + 48) + 4 * (9 * 8 + 48) + 5 * (54 * 8 + 48) + 2 * (5 * 8 + 48) + 32


def test_digits_cnn_readme_example():
    model = build_model("digits_cnn", (1, 8, 8), 10)
    analysis = analyze_model(model, (1, 8, 8))
    policy = Policy.uniform(analysis, 4)
    policy.layers["conv1"].weight_bits[:4] = 0
    policy = validate_policy(policy, analysis)
    conv2 = CostModel(analysis).evaluate(policy).layers[1]
    assert conv2.name == "conv2" and conv2.size_bits == 32 * 480
    assert CostModel(analysis).reference_size_bits > 0 and analysis.layer("conv2").fan_in * 32 + 32 == 4640


def test_simulation_removes_channels_and_inputs(residual):
    model, analysis = residual
    policy = _hand_policy(analysis)
    simulated = SimulatedModel(model, analysis, torch.randn(32, 1, 4, 4), "cpu")
    module = simulated.apply(policy)
    captured = {}
    handles = [
        module.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: captured.__setitem__(n, o))
        for name in ("conv1", "conv2", "dw", "pw")
    ]
    module(torch.randn(8, 1, 4, 4))
    for handle in handles:
        handle.remove()
    for name in ("conv1", "conv2", "dw"):
        assert torch.count_nonzero(captured[name][:, 1]) == 0, name  # the removed coupled channel is exactly 0
    assert torch.count_nonzero(captured["pw"][:, 2]) == 0
    assert torch.count_nonzero(module.get_submodule("pw").weight[:, 1]) == 0  # pw lost input channel 1
    fc_weight = module.get_submodule("fc").weight.view(3, 6, 4)
    assert torch.count_nonzero(fc_weight[:, 2]) == 0  # fc lost pw channel 2's four flattened inputs
    # 8 bits everywhere and 32-bit activations is close to the FP32 model
    exact = validate_policy(Policy.uniform(analysis, 8, 32), analysis)
    x = torch.randn(16, 1, 4, 4)
    assert torch.allclose(simulated.apply(exact)(x), model(x), atol=0.05)


def test_folding_and_quantizing_commute_with_policy_application(residual):
    model, analysis = residual
    x = torch.randn(16, 1, 4, 4)
    simulated = SimulatedModel(model, analysis, x, "cpu")
    policy = validate_policy(Policy.uniform(analysis, 8, 32), analysis)
    once = simulated.apply(policy)(x).clone()
    simulated.apply(_hand_policy(analysis))
    again = simulated.apply(policy)(x)
    assert torch.equal(once, again)  # in-place re-application leaves no trace of earlier policies


def test_importance_criteria_and_order(residual):
    _, analysis = residual
    weight = torch.tensor([[1.0, -1.0], [3.0, 0.0], [0.5, 0.5]])
    assert channel_importance(weight, "l1").tolist() == [2.0, 3.0, 1.0]
    assert channel_importance(weight, "l2") == pytest.approx([2**0.5, 3.0, 0.5**0.5])
    order = analysis.channel_order("pw")
    values = analysis.layer_importance["pw"][order]
    assert np.all(np.diff(values) <= 0)
    with pytest.raises(ModelError, match="criterion must be one of l1, l2"):
        analyze_model(ResidualDepthwiseNet(), (1, 4, 4), criterion="l3")


def _permuted(analysis):
    """The residual net's analysis with a hand-made order of its shared group (conv1, conv2, dw) and dw's channel
    ``k`` stored as group channel ``[1, 2, 3, 0][k]`` (what a channel permutation between layers would give)."""
    shared = analysis.layer("conv1").group
    groups = [replace(g, order=np.array([2, 0, 3, 1])) if g.id == shared else g for g in analysis.groups]
    return replace(analysis, groups=groups, out_root={**analysis.out_root, "dw": np.array([1, 2, 3, 0])})


def test_channel_rank_and_order_follow_the_group_order_through_out_root(residual):
    analysis = _permuted(residual[1])
    # group order [2, 0, 3, 1]: group channel 2 ranks 0, channel 0 ranks 1, channel 3 ranks 2, channel 1 ranks 3
    assert analysis.channel_rank("conv1").tolist() == [1, 3, 0, 2]
    assert analysis.channel_order("conv1").tolist() == [2, 0, 3, 1]
    # dw's channels 0..3 are group channels 1, 2, 3, 0
    assert analysis.channel_rank("dw").tolist() == [3, 0, 2, 1]
    assert analysis.channel_order("dw").tolist() == [1, 3, 2, 0]
    assert not analysis.channel_order("dw").flags.writeable  # cached: nobody may change it under the others


def test_group_kept_reads_a_member_through_out_root(residual):
    analysis = _permuted(residual[1])
    shared = analysis.layer("conv1").group
    policy = Policy(layers={name: LayerPolicy([8, 0, 4, 2]) for name in ("conv1", "conv2", "dw")})
    assert policy.group_kept(analysis, shared).tolist() == [True, False, True, True]  # the first member, conv1
    assert policy.group_kept(analysis, shared, "dw").tolist() == [True, True, False, True]
    with pytest.raises(PolicyError, match=r"channel 1 is pruned in 'conv1' but kept in 'dw'.* \(2 channels differ\)"):
        validate_policy(policy, analysis)
    policy.layers["dw"] = LayerPolicy([0, 4, 4, 4])  # dw's channel 0 is group channel 1
    assert validate_policy(policy, analysis).group_kept(analysis, shared, "dw").tolist() == [True, False, True, True]
    policy.prune_group(analysis, shared, [0, 1])  # group channel 0 is dw's channel 3
    bits = {name: policy.layers[name].weight_bits.tolist() for name in ("conv1", "conv2", "dw")}
    assert bits == {"conv1": [0, 0, 4, 2], "conv2": [0, 0, 4, 2], "dw": [0, 4, 4, 0]}


def test_model_that_does_not_run_on_the_shape_is_refused():
    with pytest.raises(ModelError, match="does not run on input shape"):
        analyze_model(ResidualDepthwiseNet(), (3, 4, 4))


# --- coupling the dependency graph gets wrong: verified, and such groups kept whole -----------------------------


def test_channel_shuffle_is_detected_and_its_group_kept_whole():
    analysis = analyze_model(ShuffleNet(), (1, 6, 6))
    group = analysis.group_of("conv1")
    assert not group.prunable
    # a 2x3 shuffle sends channel 3 (the middle one, which is perturbed) to conv2's input 1
    assert "channel 3 reaches inputs [1] of 'conv2'" in group.fixed_reason
    assert analysis.group_of("conv2").prunable  # read by fc one to one
    assert all(g.fixed_reason == "" for g in analyze_model(ShuffleNet(shuffle=False), (1, 6, 6)).groups)
    policy = Policy.uniform(analysis, 4, 8)
    policy.layers["conv1"].weight_bits = np.array([4, 0, 4, 4, 4, 4])
    with pytest.raises(PolicyError, match="conv1"):
        validate_policy(policy, analysis)


def test_layernorm_over_the_features_keeps_its_group_whole():
    analysis = analyze_model(LayerNormMLP(), (1, 8, 8))
    assert not analysis.group_of("fc1").prunable and "'fc2'" in analysis.group_of("fc1").fixed_reason
    assert analysis.group_of("fc2").prunable
    # nothing of fc1 can be removed, so the LayerNorm's 64 parameters stay whole: 32 bits each, in both costs
    assert analysis.other_params == 64


def test_grouped_convolution_groups_are_kept_whole():
    analysis = analyze_model(GroupedConvNet(), (1, 6, 6))
    for name in ("conv1", "conv2"):
        assert not analysis.group_of(name).prunable
        assert "grouped convolution 'conv2'" in analysis.group_of(name).fixed_reason
    assert analysis.group_of("conv3").prunable


def test_verified_coupling_has_no_false_alarms():
    for model, shape in ((ResidualDepthwiseNet(), (1, 4, 4)), (ConcatNet(), (1, 4, 4))):
        analysis = analyze_model(randomize_batchnorm(model), shape)
        assert all(g.prunable == bool(set(g.consumers) - set(g.members)) for g in analysis.groups)
