"""The search's configuration: :class:`SearchConfig`, the keys of ``--config`` YAML files and of a run's
``config.yaml``.

It lives apart from the run loop (:mod:`ajpq.runner`) and from the methods (:mod:`ajpq.methods`), which both import
it; the methods' names and options are checked through their registry when a configuration is built.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

from ajpq.agents import AGENT_KINDS
from ajpq.backends import BackendOptions
from ajpq.budget import Budget, parse_ratio
from ajpq.config import check_int
from ajpq.errors import ConfigError
from ajpq.latency import check_target_name
from ajpq.quant import ACTIVATION_BITS_ALLOWED
from ajpq.workspace import SPEC_KEYS, WorkspaceSpec

DEFAULT_EPISODES = 300


@dataclass
class SearchConfig:
    """Everything that defines a search (the keys of ``--config`` YAML files and of a run's ``config.yaml``)."""

    workspace: WorkspaceSpec = field(default_factory=WorkspaceSpec)
    """The model and data (flat keys model, dataset, data_dir, weights, ... in YAML and ``config.yaml``)."""
    method: str = "ajpq"
    """Search method (a name registered in :mod:`ajpq.methods`: ajpq, local, random, uniform, opq, olmp, admm)."""
    size_budget: float | None = 0.1
    """Largest size as a ratio of FP32, in (0, 1] (None: no size budget)."""
    bops_budget: float | None = None
    """Largest BOPs as a ratio of FP32, in (0, 1] (None: no BOPs budget)."""
    latency_budget: float | None = None
    """Largest predicted latency as a ratio of the FP32 model's measured one, in (0, 1] (None: no latency budget).
    Latency is predicted from a per-layer table measured once on this machine (:mod:`ajpq.latency`)."""
    latency_target: str = "torch-cpu"
    """Where the latency budget is measured: torch-cpu, onnxruntime-cpu or cuda."""
    latency_batch: int = 1
    """Batch size the latency budget is measured at."""
    latency_table: str | None = None
    """A latency table file to predict with instead of measuring one here (``latency_table.json`` of a run, e.g.
    measured on the machine the model will run on); a warning when this machine differs from its."""
    budget_mode: str = "hard"
    """hard: project each policy onto the budget; soft: subtract a penalty from the reward."""
    soft_penalty: float = 1.0
    """Soft mode: reward -= soft_penalty * sum_k max(0, ratio_k / budget_k - 1)."""
    episodes: int = DEFAULT_EPISODES
    """Evaluated episodes (warm-up included)."""
    warmup_episodes: int = 20
    """First episodes with uniformly random actions (exploration; equal to ``episodes`` = random search)."""
    seed: int = 0
    """Seed of the agents, exploration and everything random in the search."""
    layer_agent: str = "ppo"
    """Layer controller: ppo or ddpg."""
    channel_agent: str = "ppo"
    """Channel controller: ppo or ddpg."""
    max_sparsity: float = 0.8
    """Largest fraction of a layer's channels the layer agent may remove, in [0, 1)."""
    activation_bits: int = 8
    """Activation bits of every layer (when not searched)."""
    search_activation_bits: bool = False
    """Let the layer agent pick each layer's activation bits (2..8) as a second action dimension."""
    search_weight_sparsity: bool = False
    """Let the layer agent also pick each layer's weight sparsity (smallest-magnitude weights of kept channels
    removed, stored sparse), the freedom OPQ, OLMP and ADMM have; pays off under a BOPs budget, which credits every
    removed weight with its MACs. ajpq's warm start then includes OPQ's allocation."""
    max_weight_sparsity: float = 0.95
    """Largest weight sparsity of a layer with ``search_weight_sparsity``, in [0, 1)."""
    channel_group_size: int | None = None
    """Channels per channel step (default: enough to keep each layer at <= 16 steps)."""
    episodes_per_update: int = 4
    """PPO: episodes collected per update."""
    episode_finetune_steps: int = 0
    """Steps of quantization-aware fine-tuning (as ``ajpq finetune``) before each episode's evaluation (0: none)."""
    proxy_bn_batches: int = 0
    """Training batches on which each candidate's BatchNorm statistics are re-estimated before scoring (0: none)."""
    sensitivity: bool = True
    """ajpq: measure each layer step's sensitivity once (cached) and give it to both controllers."""
    warm_start: bool = True
    """ajpq: evaluate the sensitivity allocation and uniform policies first, and teach them to the agents (they
    replace the random warm-up episodes)."""
    refine_episodes: int | None = None
    """ajpq: episodes of local search around the best policy at the end (default: a fifth of ``episodes``)."""
    screen: int = 1
    """ajpq: RL proposals per evaluation. Above 1, the agents roll ``screen`` times as many episodes, a score
    predictor fitted on the recorded episodes (:mod:`ajpq.predictor`) ranks them, and only the most promising (mean
    plus spread of its ensemble) are evaluated; the agents learn from those."""
    skip_known: bool = True
    """ajpq: an RL episode whose projected policy the search already recorded is learnt from at its known reward
    and rolled again (up to 8 times), instead of spending one of the ``episodes`` on a policy already evaluated."""
    checkpoint_every: int = 20
    """Save a resumable checkpoint every this many episodes (a multiple of ``episodes_per_update``)."""
    run_root: str = "runs"
    """Parent folder of new run folders."""
    run_dir: str | None = None
    """Exact run folder to create (default: run_root/<model>__<dataset>__<seed>__<time>)."""
    progress: bool = True
    """Show a progress bar on stderr."""
    backend: str = "local"
    """Where candidates are evaluated: local, processes or ray (the results are the same with every backend)."""
    workers: int | None = None
    """Worker processes or Ray actors (default: processes, the CPU cores; ray, the cluster's CPUs)."""
    ray_address: str | None = None
    """The Ray cluster to join ("auto" or HOST:PORT; default: start a local Ray)."""
    method_options: dict[str, Any] = field(default_factory=dict)
    """Options of the other methods (see each module's ``DEFAULTS`` in :mod:`ajpq.methods`), e.g. {"rounds": 3}."""

    def __post_init__(self) -> None:
        def integer(name: str, low: int, allow_none: bool = False) -> None:
            if not (allow_none and getattr(self, name) is None):
                check_int(name, getattr(self, name), low)

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number, but got {value!r}")
            return float(value)

        if not isinstance(self.workspace, WorkspaceSpec):
            raise ConfigError(f"workspace must be a WorkspaceSpec, but got {self.workspace!r}")
        for name in ("method", "budget_mode", "run_root"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, but got {getattr(self, name)!r}")
        if self.latency_table is not None and not isinstance(self.latency_table, str):
            raise ConfigError(f"latency_table must be a file path, but got {self.latency_table!r}")
        if self.run_dir is not None and not isinstance(self.run_dir, str):
            raise ConfigError(f"run_dir must be a path (a string) or null, but got {self.run_dir!r}")
        integer("episodes", 1)
        integer("warmup_episodes", 0)
        integer("seed", 0)
        integer("channel_group_size", 1, allow_none=True)
        integer("episodes_per_update", 1)
        integer("episode_finetune_steps", 0)
        integer("proxy_bn_batches", 0)
        integer("checkpoint_every", 1)
        integer("refine_episodes", 0, allow_none=True)
        integer("screen", 1)
        integer("latency_batch", 1)
        if self.latency_batch > 65536:
            raise ConfigError(f"latency_batch must be at most 65536, but got {self.latency_batch}")
        check_target_name(self.latency_target)
        self.size_budget = parse_ratio("size_budget", self.size_budget)
        self.bops_budget = parse_ratio("bops_budget", self.bops_budget)
        self.latency_budget = parse_ratio("latency_budget", self.latency_budget)
        self.budget  # noqa: B018 (checks the mode)
        self.backend_options  # noqa: B018 (checks backend, workers and ray_address)
        if number("soft_penalty") < 0:
            raise ConfigError(f"soft_penalty must be >= 0, but got {self.soft_penalty}")
        if not 0.0 <= number("max_sparsity") < 1.0:
            raise ConfigError(f"max_sparsity must be in [0, 1), but got {self.max_sparsity}")
        if not 0.0 <= number("max_weight_sparsity") < 1.0:
            raise ConfigError(f"max_weight_sparsity must be in [0, 1), but got {self.max_weight_sparsity}")

        for name in ("layer_agent", "channel_agent"):
            if getattr(self, name) not in AGENT_KINDS:
                raise ConfigError(f"{name} must be one of {', '.join(AGENT_KINDS)}, but got {getattr(self, name)!r}")
        if self.activation_bits not in ACTIVATION_BITS_ALLOWED:
            raise ConfigError(
                f"activation_bits must be one of {list(ACTIVATION_BITS_ALLOWED)}, but got {self.activation_bits!r}"
            )
        from ajpq.methods import method_class  # the registry, filled by importing the methods

        method_class(self.method)
        if self.checkpoint_every % self.episodes_per_update:
            raise ConfigError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of episodes_per_update "
                f"({self.episodes_per_update}), so that checkpoints fall between PPO updates"
            )
        if not isinstance(self.method_options, dict):
            raise ConfigError(
                f"method_options must be a mapping of option names to values, but got {self.method_options!r}"
            )
        self.options  # noqa: B018 (checks method_options: the method's option names and values)
        for name in (
            "search_activation_bits",
            "search_weight_sparsity",
            "progress",
            "sensitivity",
            "warm_start",
            "skip_known",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, but got {getattr(self, name)!r}")

    @property
    def budget(self) -> Budget:
        return Budget(self.size_budget, self.bops_budget, self.budget_mode, self.latency_budget)

    @property
    def options(self) -> Any:
        """The method's options (a :class:`~ajpq.methods.base.MethodOptions`), checked."""
        from ajpq.methods.base import method_options

        return method_options(self)

    @property
    def backend_options(self) -> BackendOptions:

        return BackendOptions(self.backend, self.workers, self.ray_address)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchConfig:
        """The configuration of flat keys (a YAML ``default:`` block, a run's ``config.yaml``)."""
        rest = {key: value for key, value in values.items() if key not in SPEC_KEYS}
        return cls(workspace=WorkspaceSpec.from_dict(values), **rest)

    def to_dict(self) -> dict[str, Any]:
        """The flat form: the workspace's keys first, then the search's (what ``config.yaml`` holds)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "workspace"}
        return {**self.workspace.to_dict(), **copy.deepcopy(values)}


CONFIG_KEYS: tuple[str, ...] = SPEC_KEYS + tuple(f.name for f in fields(SearchConfig) if f.name != "workspace")
"""The flat keys of a search configuration."""
