"""A log of the steps sent (client) or pushed (server) in an inference session, by position.

Both ends keep one: the client its own steps, to replay them into a replacement for the first server;
each server the outputs it pushed, which are the next server's inputs. A step at `position` replaces
everything from that position on (a re-sent or speculative step), and a replacement is rebuilt from the
steps before a position.
"""

from __future__ import annotations

import torch

from .messages import History, Step

__all__ = ["concat_steps", "trim_steps"]


def concat_steps(steps: list[Step], before: int, batch: int, hidden_size: int) -> History:
    """Steps covering positions [0, before) joined into one History (a straddling step is cut)."""
    hs, ps, ms = [], [], []
    for step in steps:
        if step.position >= before:
            break
        n = min(step.hidden.shape[1], before - step.position)
        hs.append(step.hidden[:, :n])
        ps.append(step.position_ids[:, :n])
        mask = step.attention_mask if step.attention_mask is not None else torch.ones_like(step.position_ids)
        ms.append(mask[:, :n].to(torch.long))
    if not hs:
        return History(torch.zeros(batch, 0, hidden_size), torch.zeros(batch, 0, dtype=torch.long),
                       torch.zeros(batch, 0, dtype=torch.long))
    return History(torch.cat(hs, 1), torch.cat(ps, 1), torch.cat(ms, 1))


def trim_steps(steps: list[Step], position: int) -> None:
    """Drop what a step at `position` replaces: everything at or after it, cutting a straddling step."""
    while steps and steps[-1].position >= position:
        steps.pop()
    if steps and steps[-1].position + steps[-1].hidden.shape[1] > position:
        last = steps[-1]
        n = position - last.position
        mask = last.attention_mask[:, :n] if last.attention_mask is not None else None
        steps[-1] = Step(last.step_id, last.position, last.hidden[:, :n], last.position_ids[:, :n], mask)
