"""ajpq: AJPQ's hierarchical reinforcement-learning search, the method this project is about.

A layer agent picks each layer step's sparsity and a channel agent each surviving channel chunk's bits, in one
channel-importance order (:mod:`ajpq.envs`); both are stable-baselines3 PPO or DDPG networks
(:mod:`ajpq.agents`). Episodes are rolled out in batches, one vectorized agent call per step for the whole batch
(:func:`rollout_batch`), evaluated together through the search's backend, and learned from in episode order.
Its settings (agents, warm start, sensitivity, refinement, ...) are fields of
:class:`~ajpq.search_config.SearchConfig` itself, the product's main configuration, so :class:`AJPQOptions` is empty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ajpq.agents import make_controller
from ajpq.allocation import warm_start_policies
from ajpq.envs import ChannelCompressEnv, Episode, EpisodeResult, LayerCompressEnv, bits_of
from ajpq.envs.core import policy_key
from ajpq.errors import BudgetError
from ajpq.methods.base import MethodOptions, SearchContext, register_method, set_rng_state
from ajpq.methods.opq import workspace_opq_policy
from ajpq.policy import Policy
from ajpq.refine import refine
from ajpq.search_config import SearchConfig
from ajpq.train import cpu_threads

AGENT_CPU_THREADS = 1
"""CPU threads of the agents: construction (orthogonal initialisation is a QR decomposition), forward passes and
updates. Their results depend on the thread count, and a search is a chain of them: the same seed on digits at size
0.05 found 0.9861 with one thread and 0.9896 with two. Pinned, a seed gives the same search on any core count; the
networks are tiny, so one thread costs nothing."""


@dataclass(frozen=True)
class AJPQOptions(MethodOptions):
    """None: ajpq's settings are the search configuration's fields (``layer_agent``, ``warm_start``, ...)."""


def refine_count(config: SearchConfig) -> int:
    """Episodes of local search at the end of an ajpq search."""
    count = config.episodes // 5 if config.refine_episodes is None else config.refine_episodes
    return min(count, config.episodes)


def recorded_result(context: SearchContext, episode: int) -> EpisodeResult:
    """Recorded episode ``episode`` as an :class:`~ajpq.envs.EpisodeResult` (rebuilt from the run folder)."""
    record = next(r for r in context.run_dir.read_episodes() if int(r["episode"]) == episode)
    info = context.run_dir.read_info()
    policy = context.run_dir.read_policy(episode, context.config.workspace.model, info.get("fingerprint"))
    report = context.problem.cost_model.evaluate(policy)
    return EpisodeResult(float(record["reward"]), float(record["accuracy"]), report, True, False, policy, 0.0)


def warm_start_targets(context: SearchContext) -> list[Policy]:
    """The warm start's policies: the sensitivity allocation at several strengths and the uniform policies that
    fit (and OPQ's allocation when weight sparsity is searched), at most half the episodes."""
    config, problem = context.config, context.problem
    also = []
    if config.search_weight_sparsity:  # the analytic weight-sparse allocation, as OPQ computes it
        try:
            also.append(
                workspace_opq_policy(
                    context.workspace,
                    problem.budget.hard(),
                    max_pruning=config.max_weight_sparsity,
                    activation_bits=config.activation_bits,
                )[0]
            )
        except BudgetError:
            pass  # it needs channel pruning to fit: the other starts have it
    return warm_start_policies(
        problem.analysis,
        problem.cost_model,
        problem.sensitivity,
        problem.budget,
        max_sparsity=config.max_sparsity,
        activation_bits=config.activation_bits,
        search_activation_bits=config.search_activation_bits,
        also=also,
    )[: max(1, config.episodes // 2)]


class Phases:
    """The phases of a search that share one episode count, each resumable from any checkpoint.

    ``state`` (saved in every checkpoint) names the phase running and, for the refinement, the episode it started
    after and the episode it climbs from. A resume re-runs a deterministic phase (the warm start, a refinement) from
    its start with :attr:`SearchContext.replay` set, so the episodes recorded before the checkpoint are recomputed
    from the cache, not evaluated or recorded again: at most ``checkpoint_every`` episodes are ever redone.
    """

    def __init__(self, context: SearchContext, save_method: Callable[[Path], dict[str, Any]] | None = None):
        self.context = context
        self.save_method = save_method
        resume = context.resume_state
        self.state: dict[str, Any] = {"name": "warm_start"}
        self.resumed_in: str | None = None
        if resume is not None:
            self.state = dict(resume.get("method_state", {}).get("phase", {"name": "rl"}))
            self.resumed_in = str(self.state["name"])
            context.prime(int(resume["episode"]))

    def save(self, folder: Path) -> dict[str, Any]:
        state = self.save_method(folder) if self.save_method is not None else {}
        return {**state, "phase": dict(self.state)}

    def replaying(self, name: str) -> bool:
        """Whether this run resumes inside phase ``name``: then it is re-run from its start, its recorded episodes
        replayed (sets :attr:`SearchContext.replay`)."""
        if self.resumed_in != name:
            return False
        self.resumed_in = None
        resume = self.context.resume_state
        assert resume is not None
        self.context.replay = int(resume["episode"]) - int(self.state.get("start", 0))
        return True

    def warm_start(self, policies: list[Policy]) -> list[EpisodeResult]:
        """Evaluate the warm start's policies (``phase: warm_start``)."""
        self.replaying("warm_start")
        self.state = {"name": "warm_start"}
        extras = [{"warmup": False, "phase": "warm_start"}] * len(policies)
        return self.context.evaluate_checkpointed(policies, extras, self.save)

    def refine(self, evaluations: int) -> int:
        """Hill-climb from the best episode for up to ``evaluations`` episodes (``phase: refine``; none of the
        search's known policies is proposed again). Returns the episodes it recorded (fewer when no new
        neighbour is left)."""
        context = self.context
        recorder = context.recorder
        if not self.replaying("refine"):
            if recorder.best is None:
                return 0
            self.state = {
                "name": "refine",
                "start": recorder.episode,
                "from": int(recorder.best["episode"]),
                "evaluations": evaluations,
            }
        start, begin = recorded_result(context, int(self.state["from"])), int(self.state["start"])
        rng = np.random.default_rng([context.config.seed, begin])

        def evaluate(policies: Any) -> list[EpisodeResult]:
            extras = [{"warmup": False, "phase": "refine"}] * len(policies)
            return context.evaluate_checkpointed(list(policies), extras, self.save)

        known = {key for key, episode in context.seen.items() if episode <= begin}
        refine(context.problem, start, evaluate, int(self.state["evaluations"]), rng, seen=known)
        return recorder.episode - begin


@register_method
class AJPQ:
    """The hierarchical RL search: a layer agent and a channel agent act in every episode and learn from it.

    Three phases share the episode count: the warm start (the sensitivity allocation and uniform policies, and OPQ's
    allocation when weight sparsity is searched, demonstrated to the agents), the RL episodes, and a local search
    around the best policy (:mod:`ajpq.refine`).
    """

    name = "ajpq"
    Options = AJPQOptions
    resumable = True
    episodic = True
    uses_sensitivity = True

    def run(self, context: SearchContext, options: AJPQOptions) -> None:
        run_ajpq(context)


def demonstrated(problem: Any, targets: list[Policy], channel_discrete: bool) -> list[tuple[Any, Policy]]:
    """Each warm-start target walked through an episode: the agents' demonstration and the policy it reaches
    (what the warm start evaluates, in ajpq and local alike)."""
    result = []
    for target in targets:
        episode = Episode(problem)
        steps = episode.demonstrate(target, channel_discrete)
        result.append((steps, episode.policy.copy()))
    return result


def run_ajpq(context: SearchContext) -> None:
    """:class:`AJPQ`'s search (its settings are the search configuration's own fields)."""
    config, recorder, problem = context.config, context.recorder, context.problem
    rng = np.random.default_rng(config.seed)
    channel_discrete = config.channel_agent == "ppo"
    layer_env = LayerCompressEnv(problem, channel_discrete=channel_discrete)
    channel_env = ChannelCompressEnv(problem, discrete=channel_discrete)
    agent_options = {"ppo": {"episodes_per_update": config.episodes_per_update}, "ddpg": {}}
    with cpu_threads(AGENT_CPU_THREADS):  # orthogonal initialisation is a QR decomposition: thread-dependent too
        layer_agent = make_controller(
            config.layer_agent, "layer_agent", layer_env, config.seed, rng, **agent_options[config.layer_agent]
        )
        channel_agent = make_controller(
            config.channel_agent,
            "channel_agent",
            channel_env,
            config.seed + 1,
            rng,
            **agent_options[config.channel_agent],
        )

    def save(folder: Path) -> dict[str, Any]:
        layer_agent.save(folder)
        channel_agent.save(folder)
        return {
            "layer_agent": layer_agent.state(),
            "channel_agent": channel_agent.state(),
            "rng": rng.bit_generator.state,
        }

    phases = Phases(context, save)
    resumed = phases.resumed_in
    state = context.resume_state
    if state is not None:
        if resumed != "warm_start":  # the agents learnt from what was recorded: take them from the checkpoint
            slot = context.run_dir.checkpoint_dir / state["slot"]
            layer_agent.load(slot)
            channel_agent.load(slot)
            method_state = state.get("method_state", {})
            layer_agent.set_state(method_state.get("layer_agent", {}))
            channel_agent.set_state(method_state.get("channel_agent", {}))
            rng.bit_generator.state = method_state["rng"]
        set_rng_state(state["rng"])
    if config.warm_start and resumed in (None, "warm_start"):
        demos = demonstrated(problem, warm_start_targets(context), channel_discrete)
        results = phases.warm_start([policy for _, policy in demos])
        with cpu_threads(AGENT_CPU_THREADS):
            for ((layer_steps, channel_steps), _), result in zip(demos, results, strict=True):
                layer_agent.remember(layer_steps, result.reward)
                channel_agent.remember(channel_steps, result.reward)
            best = int(np.argmax([result.reward for result in results]))
            layer_demo, channel_demo = demos[best][0]
            layer_agent.imitate(layer_demo)
            channel_agent.imitate(channel_demo)
    agents = {"layer_agent": layer_agent, "channel_agent": channel_agent}
    warmup_episodes = 0 if config.warm_start else config.warmup_episodes

    screener = Screener(context)
    chosen_slots: list[int] = []

    def learn(index: int, result: Any, extra: dict[str, Any]) -> None:
        slot = chosen_slots[index]
        for name, agent in agents.items():
            with cpu_threads(AGENT_CPU_THREADS):
                stats = agent.end_episode(float(result.reward), bool(extra["warmup"]), slot)
            context.run_dir.add_scalars({f"{name}/{k}": v for k, v in stats.items()}, recorder.episode + 1)

    def rl_episodes(until: int, phase: str) -> None:
        phases.state = {"name": phase}
        while recorder.episode < until:
            start = recorder.episode
            next_checkpoint = (start // config.checkpoint_every + 1) * config.checkpoint_every
            size = min(config.episodes_per_update, until - start, next_checkpoint - start)
            warmup = [start + i < warmup_episodes for i in range(size)]
            proposals = size * config.screen if not any(warmup) and screener.ready() else size
            warmup += [False] * (proposals - size)
            policies = rollout_batch(problem, layer_agent, channel_agent, warmup, channel_discrete)
            rerolls = [0] * proposals
            if config.skip_known:
                policies, rerolls = new_policies(context, policies, warmup, agents, channel_discrete)
            slots = list(range(proposals))
            if proposals > size:
                slots = screener.choose(policies, size)
                with cpu_threads(AGENT_CPU_THREADS):  # the proposals not chosen are dropped, unlearnt
                    for slot in sorted(set(range(proposals)) - set(slots)):
                        for agent in agents.values():
                            agent.end_episode(0.0, True, slot)
            extras = [{"warmup": warmup[s], "phase": "rl", "rerolls": rerolls[s]} for s in slots]
            chosen_slots[:] = slots
            context.evaluate([policies[s] for s in slots], extras, before_record=learn)
            if context.checkpoint_due():
                context.checkpoint(phases.save)

    if resumed in (None, "warm_start", "rl"):
        rl_episodes(config.episodes - refine_count(config), "rl")
    if resumed != "tail" and (recorder.episode < config.episodes or resumed == "refine"):
        phases.refine(config.episodes - recorder.episode)
    rl_episodes(config.episodes, "tail")  # what the refinement left (it stops early when no new neighbour is left)


SCREEN_MIN_EPISODES = 8
"""Recorded episodes the score predictor needs before it screens proposals (fewer: every proposal is evaluated)."""


class Screener:
    """Ranks the agents' proposals with a :class:`~ajpq.predictor.ScorePredictor` refitted on the search's recorded
    episodes before each batch, and picks the ones worth a real evaluation (highest mean plus spread)."""

    def __init__(self, context: SearchContext) -> None:
        self.context = context
        self.features: dict[bytes, np.ndarray] = {}

    def ready(self) -> bool:
        return self.context.config.screen > 1 and len(self.context.history) >= SCREEN_MIN_EPISODES

    def _features(self, policy: Policy) -> np.ndarray:
        from ajpq.predictor import policy_features

        key = policy_key(policy)
        if key not in self.features:
            self.features[key] = policy_features(self.context.problem, policy)
        return self.features[key]

    def choose(self, policies: list[Policy], count: int) -> list[int]:
        """The slots of the ``count`` most promising policies, in slot order."""
        from ajpq.predictor import ScorePredictor

        problem = self.context.problem
        history = self.context.history
        predictor = ScorePredictor(seed=len(history))
        predictor.fit([self._features(p) for p, _ in history], [r for _, r in history])
        projected = [problem.project(policy)[0] for policy in policies]
        mean, spread = predictor.predict([self._features(p) for p in projected])
        order = np.argsort(-(mean + spread), kind="stable")
        return sorted(int(i) for i in order[:count])


MAX_REROLLS = 8
"""Times an RL episode that reached a known policy is rolled again before it is evaluated anyway."""


def new_policies(
    context: SearchContext,
    policies: list[Policy],
    warmup: list[bool],
    agents: dict[str, Any],
    channel_discrete: bool,
) -> tuple[list[Policy], list[int]]:
    """Roll again every episode of the batch whose projected policy the search already recorded (or another episode
    of the batch reached): the agents learn from it at its recorded reward, an evaluation is not spent on it.

    Near the budget, many different action sequences project onto one policy (66% of the RL episodes of a LeNet-5
    search at 1/64 were such repeats), so without this the agents had a third of the evaluations a local search
    has. Returns the batch (slot order) and how many known policies each slot learnt from first.
    """
    problem = context.problem
    policies, rerolls = list(policies), [0] * len(policies)
    key_of = {slot: policy_key(problem.project(policy)[0]) for slot, policy in enumerate(policies)}
    todo = [slot for slot, w in enumerate(warmup) if not w]
    for attempt in range(MAX_REROLLS + 1):
        taken = {key_of[slot] for slot in range(len(policies)) if slot not in todo}
        known = []
        for slot in todo:
            if key_of[slot] in context.seen or key_of[slot] in taken:
                known.append(slot)
            else:
                taken.add(key_of[slot])
        if not known or attempt == MAX_REROLLS:
            break
        for slot in known:  # a repeat within the batch has no reward yet: the agents drop that episode
            reward = problem.finish_many([policies[slot]])[0].reward if key_of[slot] in context.seen else None
            with cpu_threads(AGENT_CPU_THREADS):
                for agent in agents.values():
                    agent.end_episode(0.0 if reward is None else float(reward), reward is None, slot)
            rerolls[slot] += 1
        again = rollout_batch(
            problem, agents["layer_agent"], agents["channel_agent"], [False] * len(known), channel_discrete, known
        )
        for slot, policy in zip(known, again, strict=True):
            policies[slot] = policy
            key_of[slot] = policy_key(problem.project(policy)[0])
        todo = known
    return policies, rerolls


def rollout_batch(
    problem: Any,
    layer_agent: Any,
    channel_agent: Any,
    warmup: list[bool],
    channel_discrete: bool,
    slots: list[int] | None = None,
) -> list[Any]:
    """Roll out ``len(warmup)`` episodes side by side, with one vectorized call of each agent per step for the whole
    batch (an episode's observations depend on its partial policy and the budget only, never on an evaluation).

    Episode ``i`` is the agents' slot ``slots[i]`` (default ``i``); its warm-up flag makes it act at random. Returns
    the complete, not yet projected policies in episode order; hand each episode's reward to the agents with
    ``end_episode(.., slot=slots[i])``.
    """
    with cpu_threads(AGENT_CPU_THREADS):
        return _rollout(problem, layer_agent, channel_agent, warmup, channel_discrete, slots)


def _rollout(
    problem: Any,
    layer_agent: Any,
    channel_agent: Any,
    warmup: list[bool],
    channel_discrete: bool,
    slots: list[int] | None,
) -> list[Any]:
    episodes = [Episode(problem) for _ in warmup]
    slot_of = list(range(len(episodes))) if slots is None else list(slots)
    rows = list(range(len(episodes)))
    for _ in problem.units:
        actions = layer_agent.act_batch(np.stack([e.layer_obs() for e in episodes]), warmup, slot_of)
        for episode, action in zip(episodes, actions, strict=True):
            episode.begin_unit(np.asarray(action, dtype=np.float64).reshape(-1))
        while active := [i for i in rows if not episodes[i].unit_done]:
            obs = np.stack([episodes[i].channel_obs() for i in active])
            bits = channel_agent.act_batch(obs, [warmup[i] for i in active], [slot_of[i] for i in active])
            for i, action in zip(active, bits, strict=True):
                episodes[i].assign(bits_of(action, channel_discrete))
    return [e.policy for e in episodes]
