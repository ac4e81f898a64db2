#!/bin/bash
# One app start per mode: a long split (or collocated) stream, perf over the whole host while decode steps steadily.
# usage: probe.sh LABEL MODE POLICY [ENV=VAL ...]
set -u
LABEL=$1; MODE=$2; POLICY=$3; shift 3
cd /work/main && source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
for kv in "$@"; do export "$kv"; done
D=/tmp/sess/perf/$LABEL; mkdir -p $D
python - "$MODE" "$POLICY" > $D/cfg.yaml <<'PY'
import sys, yaml
cfg = yaml.safe_load(open("serve_config.yaml"))
args = cfg["applications"][0]["args"]
args["mode"] = sys.argv[1]
args["scheduling"]["policy"] = None if sys.argv[2] == "none" else sys.argv[2]
print(yaml.safe_dump(cfg))
PY
setsid serve run $D/cfg.yaml > $D/serve.log 2>&1 &
SERVE=$!
for i in $(seq 1 200); do curl -sf 127.0.0.1:8000/v1/models >/dev/null && break; sleep 2; done
python - $D <<'PY'
import sys, time, threading, subprocess, openai
d = sys.argv[1]
client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x")
prompt = " ".join(f"word{i}" for i in range(450))  # ~1000 tokens
def stream(max_tokens, out):
    t0 = time.perf_counter(); times = []
    for chunk in client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True}):
        times.append(time.perf_counter() - t0)
    out.extend(times)
warm = []; stream(8, warm)
times = []
t = threading.Thread(target=stream, args=(400, times)); t.start()
time.sleep(6)  # prompt (~2 s), hand-over, then steady decode
subprocess.run(["perf", "record", "-a", "-g", "-F", "499", "-o", f"{d}/perf.data", "--", "sleep", "10"],
               stderr=subprocess.DEVNULL)
ps = subprocess.run(["ps", "-eLo", "pid,tid,psr,pcpu,comm,args"], capture_output=True, text=True).stdout
open(f"{d}/ps.txt", "w").write(ps)
import os, glob
lines = []
for status in glob.glob("/proc/[0-9]*/task/[0-9]*/status"):
    try:
        fields = dict(line.split(":", 1) for line in open(status).read().splitlines() if ":" in line)
    except OSError:
        continue
    pid = status.split("/")[2]
    try:
        comm = open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        continue
    if comm.startswith(("VLLM", "ray::", "python")) or "Engine" in comm:
        lines.append(f"{pid} {status.split('/')[4]} {comm} thread={fields['Name'].strip()} "
                     f"cpus={fields['Cpus_allowed_list'].strip()} ctxsw={fields.get('voluntary_ctxt_switches','').strip()}/"
                     f"{fields.get('nonvoluntary_ctxt_switches','').strip()}")
open(f"{d}/threads.txt", "w").write("\n".join(sorted(lines)) + "\n")
t.join()
gaps = [b - a for a, b in zip(times, times[1:])]
gaps.sort()
print(f"ttft {times[0]*1000:.1f} ms, {len(times)} chunks, gap p50 {gaps[len(gaps)//2]*1000:.1f} ms p90 {gaps[int(len(gaps)*.9)]*1000:.1f}")
PY
kill -INT -- -$SERVE 2>/dev/null; sleep 8; kill -- -$SERVE 2>/dev/null; ray stop --force >/dev/null 2>&1
sleep 2; rm -f /dev/shm/psm_* /dev/shm/sem.mp-*
perf report -i $D/perf.data --no-children -g none --sort pid,dso --stdio 2>/dev/null | grep -v "^#" | grep -v "^$" | head -60 > $D/by_dso.txt
echo "done $LABEL"
