"""The layer and channel controllers: stable-baselines3 PPO or DDPG driven one episode at a time.

SB3's ``learn()`` owns the environment loop, but in AJPQ's hierarchy the two agents act inside the *same* episode
(the layer agent at each layer step, the channel agent at each channel step within it). So the search drives the
episode itself and feeds each agent its own transitions when the episode ends; the agents keep SB3's networks,
optimizers, buffers and ``train()`` updates. Checkpoints hold no pickle (SB3's zips embed cloudpickle, and a run
folder may come from someone else): network and optimizer state dicts through ``torch.save`` / ``torch.load(...,
weights_only=True)``, counters as plain tensors, the DDPG replay buffer as arrays in an ``.npz`` read with
``allow_pickle=False``; the SB3 models themselves are rebuilt from the run's config before their state is loaded.

* **PPO** (on-policy): actions are sampled from the current policy; the episode's transitions (reward 0 at every
  step but the last, which gets the episode reward; gamma 1, GAE lambda 0.95) are kept until ``episodes_per_update``
  episodes are collected, then ``PPO.train()`` runs on exactly those transitions. Warm-up episodes (uniform random
  actions) are not used by PPO, whose update needs on-policy log-probabilities.
* **DDPG** (off-policy, as in AMC and HAQ): actions are the actor's plus Gaussian exploration noise (decaying); as in
  HAQ, every transition of an episode is stored with the episode reward minus a moving-average baseline, as a
  one-step problem, warm-up episodes included; after the warm-up each episode runs ``gradient_steps`` updates.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import DDPG, PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.logger import Logger

from ajpq.errors import ArtifactError, ConfigError
from ajpq.io import atomic_write

AGENT_KINDS: tuple[str, ...] = ("ppo", "ddpg")
DEMO_SLOT = -1
"""Episode slot of demonstrations (never one of a batch's slots 0, 1, ...)."""
IMITATION_STEPS = 300
"""Gradient steps of behaviour cloning (Adam, :data:`IMITATION_LR`) on a demonstration."""
IMITATION_LR = 3e-3
MIN_IMITATION_STD = 0.15
"""Smallest standard deviation (in the [-1, 1] action range) behaviour cloning leaves a PPO Gaussian policy."""


class Controller:
    """Common interface of the two agent kinds (see the module docstring)."""

    kind = "base"

    def __init__(self, name: str, env: gym.Env, seed: int, rng: np.random.Generator) -> None:
        if not isinstance(env.action_space, gym.spaces.Box | gym.spaces.Discrete):
            raise ConfigError(
                f"{name}: a controller needs a Box or Discrete action space, but the env has {env.action_space}"
            )
        self.name = name
        self.env = env
        self.seed = seed
        self.rng = rng
        self.transitions: dict[int, list[tuple[Any, ...]]] = {}
        """Per episode slot of a batch: the transitions of the episode in progress."""
        self.logger = Logger(folder=None, output_formats=[])
        self.model: Any = None

    def act(self, obs: np.ndarray, warmup: bool) -> np.ndarray:
        """One observation -> one action (episode slot 0)."""
        return self.act_batch(np.asarray(obs).reshape(1, -1), [warmup], [0])[0]

    def act_batch(self, obs: np.ndarray, warmup: Sequence[bool], slots: Sequence[int]) -> np.ndarray:
        """One vectorized call for a batch: row ``i`` of ``obs`` is the observation of the episode in slot
        ``slots[i]`` (warm-up rows act uniformly at random); returns one action per row."""
        raise NotImplementedError

    def end_episode(self, reward: float, warmup: bool, slot: int = 0) -> dict[str, float]:
        """Hand the reward of the episode in ``slot`` to the agent; returns the statistics of any update it made."""
        raise NotImplementedError

    def remember(self, steps: list[tuple[np.ndarray, np.ndarray]], reward: float) -> None:
        """Learn from a demonstrated episode (its (observation, action) pairs and reward) as experience; PPO, being
        on-policy, keeps nothing (it learns from demonstrations through :meth:`imitate`)."""

    def imitate(self, steps: list[tuple[np.ndarray, np.ndarray]], gradient_steps: int = IMITATION_STEPS) -> float:
        """Behaviour cloning: move the policy towards the demonstrated actions (the warm start). Returns the loss."""
        raise NotImplementedError

    def _random_rows(self, warmup: Sequence[bool], dim: int) -> dict[int, np.ndarray]:
        return {i: self._random_action().reshape(dim) for i, w in enumerate(warmup) if w}

    def _random_action(self) -> np.ndarray:
        space = self.env.action_space
        if isinstance(space, gym.spaces.Discrete):
            return np.array([int(self.rng.integers(space.n))])
        assert isinstance(space, gym.spaces.Box)  # checked in __init__
        return self.rng.uniform(space.low, space.high).astype(np.float32)

    def _drain_logger(self) -> dict[str, float]:
        values = {k: float(v) for k, v in self.logger.name_to_value.items() if isinstance(v, int | float | np.number)}
        self.logger.dump(0)
        return values

    def _optimizers(self) -> dict[str, Any]:
        raise NotImplementedError

    def _extra_tensors(self) -> dict[str, Any]:
        """Controller state beyond the networks (tensors, lists and numbers only: it is loaded with weights_only)."""
        return {}

    def _set_extra_tensors(self, extra: dict[str, Any]) -> None:
        pass

    def save(self, folder: Path) -> None:
        """Write ``<name>.pt`` atomically: the policy's and the optimizers' state dicts and the SB3 counters."""
        state = {
            "policy": self.model.policy.state_dict(),
            "optimizers": {key: opt.state_dict() for key, opt in self._optimizers().items()},
            "num_timesteps": int(self.model.num_timesteps),
            "n_updates": int(getattr(self.model, "_n_updates", 0)),
            "extra": self._extra_tensors(),
        }
        buffer = io.BytesIO()  # serialized first, so that a full disk is an OSError of the plain write below
        torch.save(state, buffer)

        def write(handle: Any) -> None:
            handle.write(buffer.getvalue())

        atomic_write(folder / f"{self.name}.pt", write)

    def load(self, folder: Path) -> None:
        """Load what :meth:`save` wrote into the freshly built model, without unpickling any object."""
        path = folder / f"{self.name}.pt"
        state = load_tensors(path)
        try:
            self.model.policy.load_state_dict(state["policy"])
            for key, opt in self._optimizers().items():
                opt.load_state_dict(state["optimizers"][key])
            self.model.num_timesteps = int(state["num_timesteps"])
            self.model._n_updates = int(state["n_updates"])
            self._set_extra_tensors(state["extra"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ArtifactError(
                f"checkpoint {path} does not fit this run's {self.kind.upper()} agent ({type(exc).__name__}); "
                "start a new run"
            ) from None

    def state(self) -> dict[str, Any]:
        return {}

    def set_state(self, state: dict[str, Any]) -> None:
        pass


class PPOController(Controller):
    kind = "ppo"

    def __init__(
        self,
        name: str,
        env: gym.Env,
        seed: int,
        rng: np.random.Generator,
        *,
        episodes_per_update: int = 4,
        n_epochs: int = 4,
        batch_size: int = 64,
        learning_rate: float = 3e-4,
        net_arch: tuple[int, ...] = (64, 64),
    ) -> None:
        super().__init__(name, env, seed, rng)
        self.episodes_per_update = episodes_per_update
        self.model = PPO(
            "MlpPolicy",
            env,
            n_steps=batch_size,
            batch_size=batch_size,
            n_epochs=n_epochs,
            gamma=1.0,
            gae_lambda=0.95,
            learning_rate=learning_rate,
            ent_coef=0.01,
            policy_kwargs={"net_arch": list(net_arch)},
            seed=seed,
            device="cpu",
        )
        self.model.set_logger(self.logger)
        self.episodes: list[list[tuple[Any, ...]]] = []
        self.pending: dict[int, list[tuple[Any, ...]]] = {}

    def act_batch(self, obs: np.ndarray, warmup: Sequence[bool], slots: Sequence[int]) -> np.ndarray:
        space = self.env.action_space
        discrete = isinstance(space, gym.spaces.Discrete)
        dim = 1 if discrete else int(np.prod(space.shape or (1,)))
        actions = np.zeros((len(slots), dim), dtype=np.int64 if discrete else np.float32)
        for i, action in self._random_rows(warmup, dim).items():
            actions[i] = action
        rows = [i for i, w in enumerate(warmup) if not w]
        if rows:
            with torch.no_grad():
                obs_t = torch.as_tensor(np.asarray(obs)[rows], dtype=torch.float32).reshape(len(rows), -1)
                action_t, value, log_prob = self.model.policy(obs_t)
            action_np = action_t.numpy().reshape(len(rows), -1)
            for j, i in enumerate(rows):
                self.pending.setdefault(slots[i], []).append(
                    (np.asarray(obs[i]), action_np[j], value[j : j + 1], log_prob[j : j + 1])
                )
                if isinstance(space, gym.spaces.Box):
                    actions[i] = np.clip(action_np[j], space.low, space.high)
                else:
                    actions[i] = action_np[j]
        return actions

    def end_episode(self, reward: float, warmup: bool, slot: int = 0) -> dict[str, float]:
        pending = self.pending.pop(slot, [])
        if warmup or not pending:
            return {}
        self.episodes.append([*pending[:-1], (*pending[-1], reward)])
        if len(self.episodes) < self.episodes_per_update:
            return {}
        steps = sum(len(e) for e in self.episodes)
        model = self.model
        buffer = RolloutBuffer(
            steps, model.observation_space, model.action_space, device="cpu", gae_lambda=0.95, gamma=1.0, n_envs=1
        )
        for episode in self.episodes:
            for i, item in enumerate(episode):
                obs, action, value, log_prob = item[:4]
                r = item[4] if len(item) > 4 else 0.0
                buffer.add(
                    obs.reshape(1, -1),
                    action.reshape(1, -1),
                    np.array([r], dtype=np.float32),
                    np.array([i == 0]),
                    value,
                    log_prob,
                )
        buffer.compute_returns_and_advantage(torch.zeros(1, 1), np.array([True]))
        model.rollout_buffer = buffer
        model.train()
        model.num_timesteps += steps
        self.episodes = []
        return self._drain_logger()

    def _optimizers(self) -> dict[str, Any]:
        return {"policy": self.model.policy.optimizer}

    def _extra_tensors(self) -> dict[str, Any]:
        """The episodes collected since the last update (a checkpoint on Ctrl-C may fall between updates)."""
        return {"episodes": [[_as_tensors(item) for item in episode] for episode in self.episodes]}

    def _set_extra_tensors(self, extra: dict[str, Any]) -> None:
        self.episodes = [[_from_tensors(item) for item in episode] for episode in extra.get("episodes", [])]

    def imitate(self, steps: list[tuple[np.ndarray, np.ndarray]], gradient_steps: int = IMITATION_STEPS) -> float:
        """Maximise the log-likelihood of the demonstrated actions; a Gaussian policy's spread is kept at least
        :data:`MIN_IMITATION_STD`, so PPO still explores around the demonstration."""
        policy = self.model.policy
        obs = torch.as_tensor(np.stack([o for o, _ in steps]), dtype=torch.float32)
        actions = torch.as_tensor(np.stack([a for _, a in steps]))
        if isinstance(self.env.action_space, gym.spaces.Discrete):
            actions = actions.reshape(-1).long()
        else:
            actions = actions.float().reshape(len(steps), -1)
        loss = torch.zeros(())
        optimizer = torch.optim.Adam(policy.parameters(), lr=IMITATION_LR)
        policy.set_training_mode(True)
        for _ in range(gradient_steps):
            _, log_prob, _ = policy.evaluate_actions(obs, actions)
            loss = -log_prob.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if hasattr(policy, "log_std"):
                with torch.no_grad():
                    policy.log_std.clamp_(min=float(np.log(MIN_IMITATION_STD)))
        policy.set_training_mode(False)
        return float(loss.detach())


class DDPGController(Controller):
    kind = "ddpg"

    def __init__(
        self,
        name: str,
        env: gym.Env,
        seed: int,
        rng: np.random.Generator,
        *,
        noise: float = 0.5,
        noise_decay: float = 0.99,
        gradient_steps: int = 16,
        batch_size: int = 64,
        buffer_size: int = 100_000,
        learning_rate: float = 1e-3,
        net_arch: tuple[int, ...] = (64, 64),
    ) -> None:
        super().__init__(name, env, seed, rng)
        if not isinstance(env.action_space, gym.spaces.Box):
            raise ConfigError(f"{name}: DDPG needs a Box action space, but the env has {env.action_space}")
        self.noise = noise
        self.noise_decay = noise_decay
        self.gradient_steps = gradient_steps
        self.batch_size = batch_size
        self.baseline: float | None = None
        self.model = DDPG(
            "MlpPolicy",
            env,
            learning_rate=learning_rate,
            buffer_size=buffer_size,
            learning_starts=0,
            batch_size=batch_size,
            gamma=0.0,
            policy_kwargs={"net_arch": list(net_arch)},
            seed=seed,
            device="cpu",
        )
        self.model.set_logger(self.logger)

    def act_batch(self, obs: np.ndarray, warmup: Sequence[bool], slots: Sequence[int]) -> np.ndarray:
        dim = int(np.prod(self.env.action_space.shape or (1,)))
        actions = np.zeros((len(slots), dim), dtype=np.float32)
        for i, action in self._random_rows(warmup, dim).items():
            actions[i] = action
        rows = [i for i, w in enumerate(warmup) if not w]
        if rows:
            with torch.no_grad():
                obs_t = torch.as_tensor(np.asarray(obs)[rows], dtype=torch.float32).reshape(len(rows), -1)
                mean = self.model.actor(obs_t).numpy().reshape(len(rows), dim)
            for j, i in enumerate(rows):
                noisy = mean[j] + self.rng.normal(0.0, self.noise, dim)
                actions[i] = np.clip(noisy, -1.0, 1.0).astype(np.float32)
        for i, slot in enumerate(slots):
            self.transitions.setdefault(slot, []).append((np.asarray(obs[i]), actions[i].copy()))
        return actions

    def end_episode(self, reward: float, warmup: bool, slot: int = 0) -> dict[str, float]:
        self.baseline = reward if self.baseline is None else 0.95 * self.baseline + 0.05 * reward
        advantage = reward - self.baseline
        buffer = self.model.replay_buffer
        transitions = self.transitions.pop(slot, [])
        for obs, action in transitions:
            buffer.add(
                obs.reshape(1, -1),
                obs.reshape(1, -1),
                action.reshape(1, -1),
                np.array([advantage], dtype=np.float32),
                np.array([True]),
                [{}],
            )
        steps = len(transitions)
        self.model.num_timesteps += steps
        if warmup:
            return {}
        self.noise *= self.noise_decay
        self.model.train(gradient_steps=self.gradient_steps, batch_size=self.batch_size)
        return self._drain_logger()

    def remember(self, steps: list[tuple[np.ndarray, np.ndarray]], reward: float) -> None:
        self.transitions[DEMO_SLOT] = [(obs, action.astype(np.float32)) for obs, action in steps]
        self.end_episode(reward, warmup=True, slot=DEMO_SLOT)

    def imitate(self, steps: list[tuple[np.ndarray, np.ndarray]], gradient_steps: int = IMITATION_STEPS) -> float:
        """Regress the actor (and its target) onto the demonstrated actions."""
        actor = self.model.actor
        obs = torch.as_tensor(np.stack([o for o, _ in steps]), dtype=torch.float32)
        actions = torch.as_tensor(np.stack([a for _, a in steps]), dtype=torch.float32).reshape(len(steps), -1)
        loss = torch.zeros(())
        optimizer = torch.optim.Adam(actor.parameters(), lr=IMITATION_LR)
        actor.set_training_mode(True)
        for _ in range(gradient_steps):
            loss = torch.nn.functional.mse_loss(actor(obs), actions)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        actor.set_training_mode(False)
        self.model.actor_target.load_state_dict(actor.state_dict())
        return float(loss.detach())

    def _optimizers(self) -> dict[str, Any]:
        return {"actor": self.model.actor.optimizer, "critic": self.model.critic.optimizer}

    def save(self, folder: Path) -> None:
        """Networks as in :meth:`Controller.save`; the filled part of the replay buffer as ``<name>_replay.npz``."""
        super().save(folder)
        buffer = self.model.replay_buffer
        end = buffer.buffer_size if buffer.full else buffer.pos
        arrays = {key: getattr(buffer, key)[:end] for key in _REPLAY_ARRAYS}
        arrays["position"] = np.array([buffer.pos, int(buffer.full)], dtype=np.int64)

        def write(handle: Any) -> None:
            np.savez(handle, **arrays)

        atomic_write(folder / f"{self.name}_replay.npz", write)

    def load(self, folder: Path) -> None:
        super().load(folder)
        path = folder / f"{self.name}_replay.npz"
        buffer = self.model.replay_buffer
        try:
            with np.load(path, allow_pickle=False) as data:
                pos, full = (int(v) for v in data["position"])
                for key in _REPLAY_ARRAYS:
                    array = data[key]
                    target = getattr(buffer, key)
                    if array.shape[1:] != target.shape[1:] or len(array) > len(target):
                        raise ValueError(f"{key} has shape {array.shape}")
                    target[: len(array)] = array
        except FileNotFoundError:
            raise ArtifactError(f"checkpoint file {path} is missing; start a new run") from None
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ArtifactError(
                f"checkpoint file {path} is not a replay buffer of this run ({exc}); start a new run"
            ) from None
        buffer.pos, buffer.full = pos, bool(full)

    def state(self) -> dict[str, Any]:
        return {"noise": self.noise, "baseline": self.baseline}

    def set_state(self, state: dict[str, Any]) -> None:
        self.noise = float(state.get("noise", self.noise))
        self.baseline = state.get("baseline")


_REPLAY_ARRAYS: tuple[str, ...] = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


def load_tensors(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors, containers and numbers only, never a pickled object's code."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"checkpoint file {path} is missing; start a new run") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read checkpoint file {path}: {exc.strerror}") from None
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickler refusal, a truncated zip, ...: all mean "not a checkpoint we wrote"
        refused = "Weights only load failed" in str(exc)
        reason = "it holds pickled Python objects, which are never loaded" if refused else type(exc).__name__
        raise ArtifactError(
            f"checkpoint file {path} is not a plain-tensor checkpoint ({reason}); nothing in it was run; "
            "start a new run"
        ) from None
    if not isinstance(state, dict):
        raise ArtifactError(f"checkpoint file {path} does not hold a state dictionary; start a new run")
    return state


def _as_tensors(item: tuple[Any, ...]) -> list[torch.Tensor]:
    return [torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in item]


def _from_tensors(item: list[torch.Tensor]) -> tuple[Any, ...]:
    """Inverse of :func:`_as_tensors` for PPO's (obs, action, value, log_prob[, reward]) transitions."""
    obs, action, value, log_prob, *rest = item
    return (obs.numpy(), action.numpy(), value, log_prob, *(float(r) for r in rest))


def make_controller(
    kind: str, name: str, env: gym.Env, seed: int, rng: np.random.Generator, **kwargs: Any
) -> Controller:
    """A PPO or DDPG controller acting in ``env``'s spaces."""
    if kind == "ppo":
        return PPOController(name, env, seed, rng, **kwargs)
    if kind == "ddpg":
        return DDPGController(name, env, seed, rng, **kwargs)
    raise ConfigError(f"agent must be one of {', '.join(AGENT_KINDS)}, but got {kind!r}")
