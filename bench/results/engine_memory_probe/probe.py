"""Decode-step probe: one engine on core 1, a 1,000-token prompt, steady decode step, THP on or off (env)."""
import json, os, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

def main():
    global llm
    llm = LLM(model=".models/SmolLM2-135M-Instruct", dtype="float32", enforce_eager=True, max_model_len=2048,
              seed=0, max_num_seqs=16)
    def run(n, max_tokens, salt):
        prompt = TokensPrompt(prompt_token_ids=[(salt * 7919 + i * 31) % 40000 + 100 for i in range(n)])
        t = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t
    run(1000, 8, 0)
    rows = []
    for salt in range(1, 6):
        p = run(1000, 1, salt * 2)
        d = run(1000, 129, salt * 2 + 1)
        rows.append((p, (d - p) / 128))
    huge = [l for l in open("/proc/meminfo") if l.startswith("AnonHugePages")][0].split()[1]
    steps = sorted(r[1] * 1e3 for r in rows)
    print(json.dumps({"thp": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"), "prefill_s": sorted(r[0] for r in rows),
                      "step_ms": steps, "step_p50_ms": steps[2], "anon_huge_kb": int(huge)}), flush=True)

if __name__ == '__main__':
    main()
