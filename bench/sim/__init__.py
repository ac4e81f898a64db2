"""splitsim: a discrete-event simulation of a splitserve cluster that decides with the live router's own policy code.

1. config.py: the cluster (machines per pool and each one's limits), the performance model and the scheduling
   policy, validated once by pydantic; the policy's settings by the app's own `SchedulingConfig`.
2. model.py: how long one engine iteration takes (prompt tokens, decode sequences and the KV they read) and what
   a KV hand-over costs: a linear model, fitted by bench.profile on the host being modelled.
3. machine.py: one engine (SplitwiseSim's machine-level scheduling): FCFS prompts, iteration-level batching with
   chunked prefill within a token budget, KV memory in tokens, preemption by recompute, capped per request.
4. simulator.py: arrivals from a trace; per request the live policy (deployments/scheduling) chooses the path and
   the machines from the same LoadBook and Rates the router keeps, fed the same observations; iterations, KV
   hand-overs and completions are events on one clock; every request's timeline comes out as bench.compare's
   RequestRecord, so its CSVs, SLO arithmetic and reports read simulated and measured runs alike.
"""
