#!/bin/bash
# The split app with path overrides: the same long stream decode-local and split on one decode engine, and the KV
# region's pages in each worker.
set -u
LABEL=$1; MODE=$2; shift 2
cd /work/main && source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
for kv in "$@"; do export "$kv"; done
D=/tmp/sess/perf/$LABEL; mkdir -p $D
python - "$MODE" > $D/cfg.yaml <<'PY'
import sys, yaml
cfg = yaml.safe_load(open("serve_config.yaml"))
args = cfg["applications"][0]["args"]
args["mode"] = sys.argv[1]
if sys.argv[1] == "disaggregated":
    args["scheduling"]["policy"] = "predictive"
    args["scheduling"]["allow_path_override"] = True
print(yaml.safe_dump(cfg))
PY
setsid serve run $D/cfg.yaml > $D/serve.log 2>&1 &
SERVE=$!
for i in $(seq 1 200); do curl -sf 127.0.0.1:8000/v1/models >/dev/null && break; sleep 2; done
python - $D $MODE <<'PY'
import sys, time, glob, openai
d, mode = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x")
def stream(prompt, max_tokens, path=None):
    t0 = time.perf_counter(); times = []
    headers = {"X-Splitserve-Path": path} if path else {}
    for chunk in client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True},
                                           extra_headers=headers):
        times.append(time.perf_counter() - t0)
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return times[0], gaps[len(gaps) // 2]
def smaps():
    out = []
    for pid in glob.glob("/proc/[0-9]*"):
        try:
            if open(f"{pid}/comm").read().strip() != "VLLM::Worker":
                continue
            text = open(f"{pid}/smaps").read()
        except OSError:
            continue
        for block in text.split("\n")[0:0]:
            pass
        # the largest mapping: the KV cache
        entries, cur = [], None
        for line in text.splitlines():
            if "-" in line.split(" ")[0] and ":" not in line.split(" ")[0]:
                cur = {"range": line}; entries.append(cur)
            elif cur is not None and ":" in line:
                k, v = line.split(":", 1); cur[k] = v.strip()
        big = sorted(entries, key=lambda e: -int(e.get("Size", "0 kB").split()[0]))[:2]
        for e in big:
            out.append(f"{pid} {e['range'][:60]} Size={e.get('Size')} Rss={e.get('Rss')} AnonHugePages={e.get('AnonHugePages')} THPeligible={e.get('THPeligible')} VmFlags={e.get('VmFlags')}")
    return out
for n in (1, 2, 3):
    prompt = " ".join(f"item{n}x{i}" for i in range(300))
    paths = ("decode_local", "split") if mode == "disaggregated" else (None,)
    for path in paths:
        ttft, gap = stream(prompt + f" {path}", 120, path)
        print(f"{path}: ttft {ttft*1000:.0f} ms gap p50 {gap*1000:.1f} ms", flush=True)
open(f"{d}/smaps.txt", "w").write("\n".join(smaps()) + "\n")
PY
kill -INT -- -$SERVE 2>/dev/null; sleep 8; kill -- -$SERVE 2>/dev/null; ray stop --force >/dev/null 2>&1
sleep 2; rm -f /dev/shm/psm_* /dev/shm/sem.mp-*
echo "done $LABEL"
