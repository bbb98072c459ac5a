"""Train a policy for OpenSpiel catch with REINFORCE and numpy alone, on envfleet's Gymnasium vector env.

usage: python examples/train_catch.py [--envs 256] [--updates 60] [--target 0.9] [--seed 0]

The policy is linear softmax over the 50-cell board (enough for catch: move toward the
ball's column). Each update plays ``--horizon`` vector steps on every env, and learns from
the episodes that finished in that window (return of the episode, minus the batch mean).
It stops when the mean return of the last update's episodes reaches ``--target``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from rollout.gym import make_vec


class LinearPolicy:
    """Softmax over ``obs @ w + b``, restricted to the legal actions."""

    def __init__(self, obs_size: int, num_actions: int, rng: np.random.Generator) -> None:
        self.w = np.zeros((obs_size, num_actions))
        self.b = np.zeros(num_actions)
        self.rng = rng
        self.t = 0
        self.moments: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def probabilities(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        logits = obs @ self.w + self.b
        logits = np.where(mask, logits, -np.inf)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def act(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One sampled action per row (rows with no legal action, such as finished episodes, get 0)."""
        mask = mask.copy()
        mask[~mask.any(axis=1)] = True  # finished envs: any action, the vector env ignores it
        p = self.probabilities(obs, mask)
        return (p.cumsum(axis=1) > self.rng.random((len(p), 1))).argmax(axis=1)

    def update(self, obs: np.ndarray, mask: np.ndarray, actions: np.ndarray, advantages: np.ndarray, lr: float) -> None:
        """One REINFORCE step with Adam: raise log pi(action) in proportion to its advantage."""
        p = self.probabilities(obs, mask)
        grad = -p
        grad[np.arange(len(actions)), actions] += 1.0
        grad *= advantages[:, None] / len(actions)
        self._adam(0, obs.T @ grad, self.w, lr)
        self._adam(1, grad.sum(axis=0), self.b, lr)

    def _adam(self, slot: int, grad: np.ndarray, param: np.ndarray, lr: float, beta1: float = 0.9, beta2: float = 0.999) -> None:
        if slot == 0:
            self.t += 1
        m, v = self.moments.setdefault(slot, (np.zeros_like(param), np.zeros_like(param)))
        m[...] = beta1 * m + (1 - beta1) * grad
        v[...] = beta2 * v + (1 - beta2) * grad**2
        m_hat, v_hat = m / (1 - beta1**self.t), v / (1 - beta2**self.t)
        param += lr * m_hat / (np.sqrt(v_hat) + 1e-8)  # ascent: the gradient is of the expected return


def train(envs: Any, updates: int, horizon: int, lr: float, target: float, seed: int, log: Any = sys.stdout) -> list[float]:
    """Train on ``envs``; return the mean episode return of each update (stops early at ``target``)."""
    rng = np.random.default_rng(seed)
    obs, info = envs.reset(seed=seed)
    n = obs.shape[0]
    policy = LinearPolicy(int(np.prod(obs.shape[1:])), int(envs.single_action_space.n), rng)
    ended = np.zeros(n, bool)
    history: list[float] = []
    for update in range(updates):
        steps: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # obs, mask, action, reward, valid
        dones, finished = [], []
        for _ in range(horizon):
            flat, mask = obs.reshape(n, -1), info["action_mask"]
            actions = policy.act(flat, mask)
            obs, reward, terminated, truncated, info = envs.step(actions)
            steps.append((flat, mask, actions, reward, ~ended))  # after an episode ends, the next step only resets
            ended = terminated | truncated
            dones.append(ended)
            if "_episode_return" in info:
                finished.extend(info["episode_return"][info["_episode_return"]].tolist())
        # Monte Carlo returns (undiscounted), for the steps whose episode finished inside the window
        returns = np.zeros(n)
        completed = np.zeros(n, bool)
        samples = []
        for (flat, mask, actions, reward, valid), done in zip(reversed(steps), reversed(dones)):
            returns = np.where(done, reward, returns + reward)
            completed |= done
            use = valid & completed
            samples.append((flat[use], mask[use], actions[use], returns[use]))
        flat = np.concatenate([s[0] for s in samples])
        mask = np.concatenate([s[1] for s in samples])
        actions = np.concatenate([s[2] for s in samples])
        ret = np.concatenate([s[3] for s in samples])
        policy.update(flat, mask, actions, (ret - ret.mean()) / (ret.std() + 1e-8), lr)
        mean = float(np.mean(finished)) if finished else float("nan")
        history.append(mean)
        print(f"update {update + 1:3d}: {len(finished):5d} episodes, mean return {mean:+.3f}", file=log, flush=True)
        if mean >= target:
            break
    return history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=256, help="parallel envs (default: 256)")
    parser.add_argument("--updates", type=int, default=60, help="at most this many policy updates (default: 60)")
    parser.add_argument("--horizon", type=int, default=20, help="vector steps per update (default: 20)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam's learning rate (default: 0.1)")
    parser.add_argument("--target", type=float, default=0.9, help="stop at this mean return (default: 0.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--servers", type=int, default=None, help="local envservers (default: one per core)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    envs = make_vec("openspiel", num_envs=args.envs, game="catch", servers=args.servers)
    try:
        history = train(envs, args.updates, args.horizon, args.lr, args.target, args.seed)
    finally:
        envs.close()
    reached = history[-1] >= args.target
    print(f"{'reached' if reached else 'did not reach'} mean return {history[-1]:+.3f} (target {args.target}) in {len(history)} updates, {time.perf_counter() - started:.1f} s")
    sys.exit(0 if reached else 1)


if __name__ == "__main__":
    main()
