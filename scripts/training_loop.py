"""The training loop both shipped-model scripts use: Adam-style optimiser, 100-step linear warm-up,
then linear decay to 5% of the learning rate, a seeded data generator, and a progress line."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def fit(
    model: Any, optimizer: torch.optim.Optimizer, steps: int, seed: int,
    batch_loss: Callable[[torch.Generator], torch.Tensor], progress: Callable[[], str], every: int,
) -> float:
    """Train ``model`` in place for ``steps`` steps and return the seconds it took.

    ``batch_loss(g)`` draws one batch from the data generator ``g`` (seeded with ``seed + 1``) and returns
    its loss; ``progress()`` (run in eval mode every ``every`` steps and at the last) returns the part of
    the progress line after the loss. The model is left in eval mode.
    """
    model.train()
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / steps)
    )
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.time()
    for step in range(steps):
        loss = batch_loss(g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % every == 0 or step == steps - 1:
            model.eval()
            line = progress()
            model.train()
            print(f"step {step:5d}  loss {loss.item():.4f}  {line}  ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return time.time() - t0
