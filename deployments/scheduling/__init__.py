"""The cluster-level scheduler: per request, which path (split, decode-local, prefill-local) and which engines.

1. loads.py: every engine's load, from its own reports and the router's in-flight accounting between them.
2. rates.py: how fast each engine prefills and steps, and what a transfer costs, learned online.
3. policies.py: always_split, token_jsq, mixed_pool, conditional and predictive, chosen by serve_config.yaml's
   `scheduling.policy` (serve_app/config.py validates it).
4. prompt_order.py: within one engine, the order of its waiting prompts (a role's `scheduling_policy:
   shortest_first`), kept by each engine replica.
Pure Python: no Ray, vLLM or other deployment module (an import-linter contract), so that a simulator runs the same
decisions. The router carries the decisions out (deployments/scheduler.py, deployments/handoff.py).
"""
