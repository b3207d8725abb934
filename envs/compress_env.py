"""``ajpq/LayerCompress-v0`` and ``ajpq/ChannelCompress-v0``: the two levels of one compression episode.

Both wrap an :class:`~ajpq.envs.core.Episode`. The layer env takes one step per layer step and asks a *channel
controller* (an :data:`ActionFn`, a callable ``obs -> action``) for the bits of that step's surviving channels; the
channel env takes one step per channel (chunk) and asks a *layer controller* for each layer step's sparsity. Left
unset, the controllers are fixed rules (8 bits for every channel; no pruning), so each env is a complete problem on
its own, and the budget projection keeps every policy within budget. The class docstrings document the spaces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ajpq.envs.core import CompressionProblem, Episode, EpisodeResult, bits_of
from ajpq.policy import Policy

ActionFn = Callable[[np.ndarray], Any]
"""The other level's policy inside one env: an observation in, an action of that level's space out. (Not to be confused
with :class:`ajpq.agents.Controller`, the learning agents; ``lambda obs: agent.act(obs, False)`` makes one of those an
ActionFn.)"""
_DEFAULT_PROBLEM: CompressionProblem | None = None


def default_problem(**kwargs: Any) -> CompressionProblem:
    """The embedded default: digits_cnn on digits (pretrained once and cached), size budget 0.1, validation reward."""
    global _DEFAULT_PROBLEM
    if kwargs:
        return problem_from_workspace(None, **kwargs)
    if _DEFAULT_PROBLEM is None:
        _DEFAULT_PROBLEM = problem_from_workspace(None)
    return _DEFAULT_PROBLEM


def problem_from_workspace(
    workspace: Any = None, evaluate: Callable[[Policy], float] | None = None, **kwargs: Any
) -> CompressionProblem:
    """A :class:`CompressionProblem` of ``workspace`` (default: the embedded digits one): the FP32 model's validation
    accuracy is measured (the reward is the change against it), ``evaluate`` scores a policy (default: the simulated
    model's validation accuracy); ``kwargs`` are the problem's settings (budget, max_sparsity, ...)."""
    from ajpq.proxy import make_evaluator
    from ajpq.workspace import WorkspaceSpec, open_workspace

    if workspace is None:
        workspace = open_workspace(WorkspaceSpec(device="cpu"), progress=False)
    fp32 = workspace.val_score(workspace.model)
    kwargs.setdefault("pricing", workspace.cost_model)  # built with the weights: it can price weight sparsity
    return CompressionProblem(workspace.analysis, evaluate or make_evaluator(workspace), fp32, **kwargs)


def _info(result: EpisodeResult | None) -> dict[str, Any]:
    return {} if result is None else {k: v for k, v in result.metrics().items()}


class LayerCompressEnv(gym.Env):
    """One step per layer step: how many of its channels to prune (and, optionally, its activation bits).

    A *layer step* is a coupled channel group (one layer, or the layers whose outputs are added together, decided
    as one), in execution order; see :mod:`ajpq.envs.core`. Within a step, the bits of the surviving channels come
    from ``channel_controller`` (8 bits when it is None), so one step of this env is one layer step of the episode.

    ## Action Space

    ``Box(-1, 1, (d,), float32)`` with ``d = problem.layer_action_dim`` (1, plus one with ``search_activation_bits``
    and one with ``search_weight_sparsity``); values outside [-1, 1] are clipped.

    | Index | Action | Range |
    |-------|--------|-------|
    | 0 | sparsity ``(a + 1) / 2 * max_sparsity`` of the step | [-1, 1] |
    | 1 | activation bits of the step's layers, 2..8 in 7 equal bins (only with ``search_activation_bits``) | [-1, 1] |
    | 2 | weight sparsity ``(a + 1) / 2 * max_weight_sparsity`` (only with ``search_weight_sparsity``) | [-1, 1] |

    The weight sparsity is always the last entry (index 1 when activation bits are not searched), to 2 decimals.

    The least important ``round(sparsity * channels)`` channels of the step get 0 bits in every member layer (at
    most all but one; none in a step that may not be pruned, such as the classifier's outputs). A weight sparsity
    ``s`` then removes the ``s`` smallest-magnitude (BN-folded) weights of the kept channels that read kept inputs, in
    every member layer.

    ## Observation Space

    ``Box(-1, 1, (30,), float32)`` (:data:`~ajpq.envs.core.LAYER_OBS_DIM`; 31 with ``search_weight_sparsity``): the
    step about to be decided (the last one once the episode is over) and the budget used so far. Every value is
    clipped to [-1, 1]; *squashed* means ``x / (1 + |x|)``.

    | Index | Observation | Range |
    |-------|-------------|-------|
    | 0 | step index / (number of steps - 1) | [0, 1] |
    | 1 | 1 if a member layer is a dense conv | {0, 1} |
    | 2 | 1 if a member layer is a depthwise or grouped conv | {0, 1} |
    | 3 | 1 if a member layer is a linear layer | {0, 1} |
    | 4 | 1 if the step couples more than one layer | {0, 1} |
    | 5 | 1 if the step may be pruned | {0, 1} |
    | 6 | log2(input channels of the first member + 1) / 14 | [0, 1] |
    | 7 | log2(channels of the step + 1) / 14 | [0, 1] |
    | 8 | log2(kernel area + 1) / 6 | [0, 1] |
    | 9 | largest stride / 4 | [0, 1] |
    | 10 | log2(output positions H*W + 1) / 16 | [0, 1] |
    | 11 | log10(weights of the step + 1) / 9 | [0, 1] |
    | 12 | log10(MACs of the step + 1) / 12 | [0, 1] |
    | 13 | the step's share of the model's weights | [0, 1] |
    | 14 | the step's share of the model's MACs | [0, 1] |
    | 15 | importance spread: squashed std/mean of channel importance + share of the top half - 0.5 | [0, 1] |
    | 16 | sensitivity: pruning 25% of the step's channels | [0, 1) |
    | 17 | sensitivity: pruning 50% | [0, 1) |
    | 18 | sensitivity: pruning 75% | [0, 1) |
    | 19 | sensitivity: 1-bit weights | [0, 1) |
    | 20 | sensitivity: 2-bit weights | [0, 1) |
    | 21 | sensitivity: 4-bit weights | [0, 1) |
    | 22 | sensitivity: 2-bit input activations | [0, 1) |
    | 23 | sensitivity: 4-bit input activations | [0, 1) |
    | 24 | squashed size used so far / size budget | [0, 1) |
    | 25 | squashed size still allowed / size budget (budget - used - smallest cost of the undecided steps) | (-1, 1) |
    | 26 | squashed BOPs used so far / BOPs budget | [0, 1) |
    | 27 | squashed BOPs still allowed / BOPs budget | (-1, 1) |
    | 28 | fraction of channels pruned in the previous step (0 before the first) | [0, 1) |
    | 29 | activation bits of the previous step / 8 (1 before the first) | (0, 1] |
    | 30 | weight sparsity of the previous step / max_weight_sparsity (only with ``search_weight_sparsity``) | [0, 1] |

    Sensitivities are ``d / (1 + d)`` of the damage ``d`` measured for the step (:mod:`ajpq.sensitivity`), 0 when
    the problem has no sensitivity table. Indices 0-23 are fixed per step; :class:`ChannelCompressEnv` observes them
    too.

    ## Rewards

    0 for every step but the last. The last step finishes the policy (in ``hard`` budget mode it is first projected
    onto the budget) and rewards ``accuracy - fp32_accuracy`` of what is evaluated; in ``soft`` mode minus
    ``soft_penalty * sum_k max(0, ratio_k / budget_k - 1)``.

    ## Starting State

    Every channel at 8 bits, activations at ``problem.activation_bits``, nothing decided. The episode has no
    randomness: ``seed`` only seeds :attr:`np_random`.

    ## Episode End

    Terminated after the last layer step (one step per layer step of the model); never truncated. The final
    ``info`` holds ``reward``, ``accuracy``, ``size_ratio``, ``bops_ratio``, ``compression_rate`` and ``feasible``.

    ## Arguments

    ``gymnasium.make("ajpq/LayerCompress-v0", problem=None, channel_controller=None, channel_discrete=True)``

    - ``problem``: a :class:`~ajpq.envs.core.CompressionProblem` (model analysis, evaluator, budget); None builds
      the embedded default (digits_cnn on digits, size budget 0.1).
    - ``channel_controller``: the channel level's :data:`ActionFn` (a :class:`ChannelCompressEnv` observation to a
      channel action); None gives every surviving channel 8 bits.
    - ``channel_discrete``: whether ``channel_controller`` answers ``Discrete(8)`` indices (True) or ``Box(-1, 1)``
      values (False).
    """

    metadata = {"render_modes": []}  # noqa: RUF012

    def __init__(
        self,
        problem: CompressionProblem | None = None,
        channel_controller: ActionFn | None = None,
        channel_discrete: bool = True,
    ) -> None:
        super().__init__()
        self.problem = problem if problem is not None else default_problem()
        self.episode = Episode(self.problem)
        self.channel_controller = channel_controller
        self.channel_discrete = channel_discrete
        self.observation_space = spaces.Box(-1.0, 1.0, (self.problem.layer_obs_dim,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (self.problem.layer_action_dim,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.episode.reset()
        return self.episode.layer_obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        episode = self.episode
        episode.begin_unit(np.asarray(action, dtype=np.float64).reshape(-1))
        while not episode.unit_done:
            if self.channel_controller is None:
                bits = 8
            else:
                bits = bits_of(self.channel_controller(episode.channel_obs()), self.channel_discrete)
            episode.assign(bits)
        if episode.all_decided:
            result = episode.finish()
            return episode.layer_obs(), float(result.reward), True, False, _info(result)
        return episode.layer_obs(), 0.0, False, False, {}


class ChannelCompressEnv(gym.Env):
    """One step per surviving channel (or chunk of adjacent channels): its weight bits.

    Each layer step's sparsity (and activation bits) comes from ``layer_controller`` (no pruning when it is None);
    then the step's surviving channels of each member layer are decided in importance order, one chunk per step
    (``problem.channel_group_size`` channels, by default enough for at most 16 steps per layer).

    ## Action Space

    ``Discrete(8)``: index ``i`` gives ``i + 1`` bits; or, with ``discrete=False``, ``Box(-1, 1, (1,), float32)``
    split into 8 equal bins for 1..8 bits (for DDPG, which takes only ``Box``).

    ## Observation Space

    ``Box(-1, 1, (33,), float32)`` (:data:`~ajpq.envs.core.CHANNEL_OBS_DIM`; 34 with ``search_weight_sparsity``): the
    current layer step, the chunk about to be decided, and the budget used so far. Every value is clipped to [-1, 1];
    *squashed* means ``x / (1 + |x|)``.

    | Index | Observation | Range |
    |-------|-------------|-------|
    | 0-23 | the step's fixed features: indices 0-23 of :class:`LayerCompressEnv`'s observation | [0, 1] |
    | 24 | mean importance rank of the chunk's channels in the step (0 = most important) | [0, 1) |
    | 25 | squashed mean importance of the chunk / mean importance of its layer | [0, 1) |
    | 26 | the step's sparsity / max_sparsity | [0, 1] |
    | 27 | fraction of the step's surviving channels decided before this chunk | [0, 1) |
    | 28 | mean bits given so far in this step / 8 (0 before the first chunk) | [0, 1] |
    | 29 | squashed size used so far / size budget | [0, 1) |
    | 30 | squashed size still allowed / size budget (budget - used - smallest cost of the undecided steps) | (-1, 1) |
    | 31 | squashed BOPs used so far / BOPs budget | [0, 1) |
    | 32 | squashed BOPs still allowed / BOPs budget | (-1, 1) |
    | 33 | the step's weight sparsity / max_weight_sparsity (only with ``search_weight_sparsity``) | [0, 1] |

    After the last chunk (the final observation) indices 24-28 are ``1, 0, sparsity / max_sparsity, 1, 0``.

    ## Rewards

    As :class:`LayerCompressEnv`: 0 for every step but the last, which rewards the finished (projected) policy
    with ``accuracy - fp32_accuracy`` (minus the budget excess penalty in ``soft`` mode).

    ## Starting State

    Every channel at 8 bits, activations at ``problem.activation_bits``; ``reset`` asks ``layer_controller`` for
    the first layer step, so the first observation is its first chunk. No randomness: ``seed`` only seeds
    :attr:`np_random`.

    ## Episode End

    Terminated after the last chunk of the last layer step; never truncated. The final ``info`` is
    :class:`LayerCompressEnv`'s.

    ## Arguments

    ``gymnasium.make("ajpq/ChannelCompress-v0", problem=None, layer_controller=None, discrete=True)``

    - ``problem``: a :class:`~ajpq.envs.core.CompressionProblem`; None builds the embedded default.
    - ``layer_controller``: the layer level's :data:`ActionFn` (a :class:`LayerCompressEnv` observation to a layer
      action); None prunes nothing (and picks 8-bit activations with ``search_activation_bits``, no weight sparsity
      with ``search_weight_sparsity``).
    - ``discrete``: ``Discrete(8)`` actions (True) or ``Box(-1, 1)`` (False).
    """

    metadata = {"render_modes": []}  # noqa: RUF012

    def __init__(
        self,
        problem: CompressionProblem | None = None,
        layer_controller: ActionFn | None = None,
        discrete: bool = True,
    ) -> None:
        super().__init__()
        self.problem = problem if problem is not None else default_problem()
        self.episode = Episode(self.problem)
        self.layer_controller = layer_controller
        self.discrete = discrete
        self.observation_space = spaces.Box(-1.0, 1.0, (self.problem.channel_obs_dim,), np.float32)
        self.action_space = spaces.Discrete(8) if discrete else spaces.Box(-1.0, 1.0, (1,), np.float32)

    def _begin_next_unit(self) -> None:
        episode = self.episode
        if self.layer_controller is None:
            action = -np.ones(self.problem.layer_action_dim)
            if self.problem.search_activation_bits:
                action[1] = 1.0
        else:
            action = np.asarray(self.layer_controller(episode.layer_obs()), dtype=np.float64).reshape(-1)
        episode.begin_unit(action)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.episode.reset()
        self._begin_next_unit()
        return self.episode.channel_obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        episode = self.episode
        episode.assign(bits_of(action, self.discrete))
        if episode.all_decided:
            result = episode.finish()
            return episode.channel_obs(), float(result.reward), True, False, _info(result)
        if episode.unit_done:
            self._begin_next_unit()
        return episode.channel_obs(), 0.0, False, False, {}
