"""local: AJPQ's search without the agents, the control that says what the reinforcement learning adds.

The same sensitivity measurement, the same warm start (the allocations ajpq demonstrates to its agents, evaluated
the same way), then the same hill climb (:mod:`ajpq.refine`) from the best policy for every remaining evaluation,
restarted from the best one whenever it runs out of new neighbours. It shares ajpq's phases, budget, proxy, cache
and checkpoints (:class:`ajpq.methods.rl.Phases`), so at equal ``episodes`` the two differ only in the agents.
"""

from __future__ import annotations

from dataclasses import dataclass

from ajpq.errors import ConfigError
from ajpq.logs import log
from ajpq.methods.base import MethodOptions, SearchContext, register_method, set_rng_state
from ajpq.methods.rl import Phases, demonstrated, warm_start_targets


@dataclass(frozen=True)
class LocalOptions(MethodOptions):
    """None of its own: local takes the search's configuration (episodes, budget, proxy, warm start), as ajpq
    does, so the two compare like for like."""


@register_method
class LocalSearch:
    """The warm start and the refinement of ajpq, with no RL episode in between."""

    name = "local"
    Options = LocalOptions
    resumable = True
    episodic = True
    uses_sensitivity = True

    def run(self, context: SearchContext, options: LocalOptions) -> None:
        run_local(context)


def run_local(context: SearchContext) -> None:
    """:class:`LocalSearch`'s search."""
    config, recorder = context.config, context.recorder
    if not config.warm_start:
        raise ConfigError(
            "method 'local' climbs from the warm start's best policy, so it needs warm_start: true (or use "
            "--method random for a search that starts from nothing)"
        )
    phases = Phases(context)
    if context.resume_state is not None:
        set_rng_state(context.resume_state["rng"])
    if phases.resumed_in in (None, "warm_start"):
        demos = demonstrated(context.problem, warm_start_targets(context), config.channel_agent == "ppo")
        phases.warm_start([policy for _, policy in demos])
    while recorder.episode < config.episodes:
        if phases.refine(config.episodes - recorder.episode) == 0:
            log(f"local: no new neighbour of the best policy is left; stopped after {recorder.episode} episodes")
            break
