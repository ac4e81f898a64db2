"""The order in which one engine runs the prompts waiting for it, under a role's `scheduling_policy:
shortest_first`.

1. The engine runs vLLM's priority scheduling: waiting requests in order of their `priority`, lower first, ties by
   arrival. Every request the engine's replica sends it carries one (engine_server.py).
2. A prompt's priority is the engine's work clock when it arrives (the prompt tokens it has computed so far, its
   own counter) plus `aging` times the prompt's tokens. Prompts waiting together run shortest first. A later
   prompt passes an earlier one only while the work done between their arrivals plus `aging` times its own tokens
   stays under `aging` times the earlier one's: once the engine has computed `aging` times a prompt's own tokens
   since it arrived, nothing that arrives after that passes it. So no prompt waits for ever, and how long it may
   be passed scales with its own work, on any host (the clock counts tokens, not seconds). `aging` 0 is first
   come, first served.
3. A request with no prompt to compute (a split's decode, whose KV arrives) gets the clock itself: nothing that
   arrives after it goes first.
The clock is the engine's own, so it orders prompts from every router alike. Pure, like the rest of the
scheduling package: a simulator can order its engines' queues with it.
"""

from __future__ import annotations


def shortest_first_priority(num_prompt_tokens: int, num_computed_tokens: int, aging: float) -> int:
    """vLLM's priority (lower runs first) for a prompt of `num_prompt_tokens` that arrives at an engine which has
    computed `num_computed_tokens` prompt tokens so far."""
    if aging < 0:
        raise ValueError(f"aging must be at least 0, got {aging}")
    return max(0, num_computed_tokens) + round(aging * max(0, num_prompt_tokens))
