#!/bin/bash
# py-spy on every engine worker during one long steady stream: which Python a decode step runs.
# usage: probe3.sh LABEL MODE POLICY
set -u
LABEL=$1; MODE=$2; POLICY=$3; shift 3
cd /work/main && source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
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
import sys, time, threading, subprocess, glob, openai
d = sys.argv[1]
client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x")
prompt = " ".join(f"word{i}" for i in range(450))
def stream(max_tokens, out, p=prompt):
    t0 = time.perf_counter()
    for chunk in client.completions.create(model="SmolLM2-135M-Instruct", prompt=p, max_tokens=max_tokens,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True}):
        out.append(time.perf_counter() - t0)
warm = []; stream(8, warm, "hello " * 300)  # warm both engines, not this prompt's blocks
times = []
t = threading.Thread(target=stream, args=(400, times)); t.start()
time.sleep(8)
workers = [p.split("/")[2] for p in glob.glob("/proc/[0-9]*/comm") if open(p).read().strip() == "VLLM::Worker"]
procs = [subprocess.Popen(["py-spy", "record", "--nonblocking", "-p", pid, "-d", "12", "-r", "200", "-f", "raw",
                           "-o", f"{d}/pyspy_{pid}.txt"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
         for pid in workers]
for p in procs:
    p.wait()
t.join()
gaps = sorted(b - a for a, b in zip(times, times[1:]))
print(f"ttft {times[0]*1000:.1f} ms, {len(times)} chunks, gap p50 {gaps[len(gaps)//2]*1000:.1f} ms p90 {gaps[int(len(gaps)*.9)]*1000:.1f}")
PY
kill -INT -- -$SERVE 2>/dev/null; sleep 8; kill -- -$SERVE 2>/dev/null; ray stop --force >/dev/null 2>&1
sleep 3; pkill -f 'VLLM::' ; sleep 2; pkill -9 -f 'VLLM::'; rm -f /dev/shm/psm_* /dev/shm/sem.mp-*
echo "done $LABEL"
