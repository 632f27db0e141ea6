"""PPO's value head: a linear layer on the policy's last hidden state, trained on the rollout's hidden states.

The head reads the hidden states the rollout's forward produced (detached: the value loss trains the head,
not the policy's trunk), has its own AdamW (`rl.valueLr`) and is stepped once per optimizer step with its
gradient averaged over ranks, so every rank holds the same head. It starts at zero (values 0), identical on
every rank. Its weights and AdamW state travel in the checkpoint's state.json (the stage's `stats`, as plain
lists: the head is hidden-size + 1 numbers), so a resumed stage computes the same values and advantages.
It is not part of final/ (the published model is the policy).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm_trainer.parallel import DistEnv, all_reduce_tensor


class ValueHead:
    def __init__(self, hidden: int, lr: float, device: torch.device):
        self.linear = nn.Linear(hidden, 1).to(device)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.optimizer = torch.optim.AdamW(self.linear.parameters(), lr=lr, weight_decay=0.0)

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        return self.linear(states.float()).squeeze(-1)

    def step(self, env: DistEnv) -> None:
        """Average the accumulated gradient over ranks, take one AdamW step, clear it (collective)."""
        params = list(self.linear.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        flat = all_reduce_tensor(flat, env) / env.world_size
        at = 0
        for p in params:
            n = p.numel()
            p.grad = flat[at:at + n].view_as(p).clone()
            at += n
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state(self) -> dict[str, Any]:
        """Weights and AdamW state as JSON-able lists."""
        return {"model": _plain(self.linear.state_dict()), "optimizer": _plain(self.optimizer.state_dict())}

    def load(self, state: dict[str, Any]) -> None:
        device = self.linear.weight.device
        self.linear.load_state_dict(_tensors(state["model"], device))
        opt = _tensors(state["optimizer"], device)
        opt["state"] = {int(k): v for k, v in opt["state"].items()}
        self.optimizer.load_state_dict(opt)


def _plain(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return {"__tensor__": x.detach().cpu().double().reshape(-1).tolist(), "shape": list(x.shape),
                "dtype": str(x.dtype).removeprefix("torch.")}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _tensors(x: Any, device: torch.device) -> Any:
    if isinstance(x, dict) and "__tensor__" in x:
        return torch.tensor(x["__tensor__"], dtype=getattr(torch, x["dtype"])).reshape(x["shape"]).to(device)
    if isinstance(x, dict):
        return {k: _tensors(v, device) for k, v in x.items()}
    if isinstance(x, list):
        return [_tensors(v, device) for v in x]
    return x
