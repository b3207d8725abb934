"""AJPQ's hierarchical controllers (installed as ``ajpq.agents``): a layer agent and a channel agent, PPO or DDPG."""

from ajpq.agents.controllers import AGENT_KINDS, Controller, DDPGController, PPOController, make_controller

__all__ = ["AGENT_KINDS", "Controller", "DDPGController", "PPOController", "make_controller"]
