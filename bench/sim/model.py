"""How long an engine iteration and a KV hand-over take: the simulator's performance model.

One vLLM step computes some prompt tokens (chunks of waiting prompts) and extends some decode sequences by a
token each, reading their KV. Its time is modelled as a line in those three quantities plus a fixed cost, the form
SplitwiseSim's database model fits per batch, and the one the live scheduler's rates learn online (rates.py):

    step_s = step_s0 + decode_step_s0 [if any sequence decodes] + prompt_token_s · prompt tokens
             + prompt_pair_s · prompt token pairs + decode_seq_s · sequences + context_token_s · KV tokens read

`prompt token pairs` is attention's quadratic part: a chunk of c tokens of a prompt whose first k tokens are
computed attends over c·k + c·(c+1)/2 pairs (on this host's CPU a 1,536-token prompt costs 4.6 ms a token against
3.3-3.4 ms at 128-512, so a line in prompt tokens alone misfits both ends).

`decode_step_s0` is what a step with decode sequences costs beyond one without (on a GPU, reading the weights for
a memory-bound step; SplitwiseSim's profiles show it as a token step's floor above a small prompt's).

Served, the engine is not alone: each token it streams goes through its frontend, the Serve replica, the router and
the proxy, whose processes share the host's cores with it. `served_token_s` is what that adds to a step per
sequence it extends (the client's gap over the engine's own step, one request at a time), `served_request_s` the
latency the served path adds to a request's first token (the client's TTFT over the engine's prompt step). A split
request pays `served_split_s` more between prefill and decode (the router's second call, prefill's answer, decode's
wait for the remote KV: a split's TTFT beyond its engine parts and the hand-over). All are measured by streaming
through the app (bench.profile's last phase); 0 for an engine on its own.
`shared_host_slowdown` is how much longer an iteration takes while another engine of the same host computes (each
on cores of its own, but one memory, one cache and the served path's processes between them): the client's gap
with a stream on each of the host's two engines over the gap with one stream on the host, less 1.

A step that only decodes is not a line in its sequences on every engine: on this host's CPU, at ~530 tokens a
sequence, 1 sequence steps 49.0 ms, 2 step 59.9 and 4 step 50.0 (bench/results/profile's decode steps), because
each step reads all the float32 weights from memory and oneDNN's kernels for 1-2 rows read them slower than those
for 3-6 (bench/results/gemm_rows: 38.6 and 44.9 ms against 30.3-32.4). `decode_batch_s[b - 1]` is what a pure
decode step of b sequences takes beyond the line (measured, as SplitwiseSim's profiles are tables per batch size);
past the table, its last entry. A step that also computes prompt tokens keeps the line: its matrices are as tall
as its tokens.

A hand-over is a line in the prompt's tokens (their KV moves). bench.profile measures and fits both on the host it
runs on; `PerfModel.from_profile` reads its CSV.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def decode_batch_table(values: dict[str, float]) -> tuple[float, ...]:
    """bench.profile's `decode_batch_s@<b>` values as the table PerfModel holds ([b - 1]); empty without them."""
    sizes = sorted(int(name.split("@")[1]) for name in values if name.startswith("decode_batch_s@"))
    if sizes != list(range(1, len(sizes) + 1)):
        raise ValueError(f"decode_batch_s needs every batch size from 1 on, has {sizes}")
    return tuple(values[f"decode_batch_s@{size}"] for size in sizes)


def decode_batch_extra_s(table: tuple[float, ...], num_prompt_tokens: int, num_decode_seqs: int) -> float:
    """What a step takes beyond the line by the table: only a step that decodes and computes no prompt token;
    past the table, its last entry."""
    if not table or not num_decode_seqs or num_prompt_tokens:
        return 0.0
    return table[min(num_decode_seqs, len(table)) - 1]


def prompt_pairs(num_tokens: int, num_before: int = 0) -> int:
    """Attention's pairs of a chunk of `num_tokens` prompt tokens after `num_before` of the same prompt: each token
    attends to the ones before it and to itself."""
    return num_tokens * num_before + num_tokens * (num_tokens + 1) // 2


class PerfModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    step_s0: float = Field(ge=0)  # an iteration's fixed cost (scheduling, sampling, the model's weights read)
    decode_step_s0: float = Field(0.0, ge=0)  # more when the iteration extends any sequence
    prompt_token_s: float = Field(ge=0)  # per prompt token computed in the iteration
    prompt_pair_s: float = Field(0.0, ge=0)  # per pair of prompt tokens where one attends to the other
    decode_seq_s: float = Field(ge=0)  # per decode sequence extended by one token
    context_token_s: float = Field(0.0, ge=0)  # per KV token the decode sequences attend to
    handover_s0: float = Field(0.0, ge=0)  # a KV hand-over's fixed cost
    handover_token_s: float = Field(0.0, ge=0)  # per prompt token whose KV moves
    served_token_s: float = Field(0.0, ge=0)  # per sequence a step extends: the served output path's share of it
    served_request_s: float = Field(0.0, ge=0)  # a request's latency through the served path, before its first token
    served_split_s: float = Field(0.0, ge=0)  # a split's latency beyond that, between prefill's end and decode
    shared_host_slowdown: float = Field(0.0, ge=0)  # an iteration's extra share while another engine on its host computes
    decode_batch_s: tuple[float, ...] = ()  # a pure decode step of b sequences: [b - 1] more than the line (may be < 0)

    def step_s(self, num_prompt_tokens: int, num_decode_seqs: int, num_context_tokens: int,
               num_prompt_pairs: int = 0) -> float:
        return (self.step_s0 + (self.decode_step_s0 if num_decode_seqs else 0.0)
                + self.prompt_token_s * num_prompt_tokens + self.prompt_pair_s * num_prompt_pairs
                + (self.decode_seq_s + self.served_token_s) * num_decode_seqs
                + self.context_token_s * num_context_tokens
                + decode_batch_extra_s(self.decode_batch_s, num_prompt_tokens, num_decode_seqs))

    def handover_s(self, num_prompt_tokens: int) -> float:
        return self.handover_s0 + self.handover_token_s * num_prompt_tokens

    def split_handover_s(self, num_prompt_tokens: int) -> float:
        """From a split's prompt step ending on prefill to its KV being on decode: the hand-over and the served
        split path's latency."""
        return self.handover_s(num_prompt_tokens) + self.served_split_s

    @classmethod
    def from_profile(cls, path: Path, *, backend: str = "nixl") -> PerfModel:
        """bench.profile's fitted model: rows `parameter,value` (a hand-over's per backend, `handover_s0@nixl`)."""
        with open(path, newline="") as handle:
            values = {row["parameter"]: float(row["value"]) for row in csv.DictReader(handle)}
        try:
            return cls.from_fitted(values, backend=backend)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    @classmethod
    def from_fitted(cls, values: dict[str, float], *, backend: str = "nixl") -> PerfModel:
        """The model from bench.profile's named values (`handover_s0@<backend>`, `decode_batch_s@<b>`)."""
        terms = ("step_s0", "decode_step_s0", "prompt_token_s", "prompt_pair_s", "decode_seq_s", "context_token_s",
                 "served_token_s", "served_request_s", "served_split_s", "shared_host_slowdown")
        fields: dict[str, Any] = {name: values[name] for name in terms if name in values}
        for name in ("handover_s0", "handover_token_s"):
            if f"{name}@{backend}" in values:
                fields[name] = values[f"{name}@{backend}"]
        return cls(**fields, decode_batch_s=decode_batch_table(values))
