# Combines the three runs of 2026-11-22 (see analysis.md) into one results.json:
#   python3 merge.py run-a.json ../2026-11-22-full-weir2/results.json ../2026-11-22-full-cp/results.json results.json
import json, sys
a = json.load(open(sys.argv[1]))   # full run: baselines (+ weir 1..10k, dropped)
b = json.load(open(sys.argv[2]))   # weir and weir-nosocklb at every scale
c = json.load(open(sys.argv[3]))   # progcost and control plane
out = dict(a)
weir = {"weir", "weir-nosocklb"}
out["datapath"] = [p for p in a["datapath"] if p["dataplane"] not in weir] + b["datapath"]
out["probes"] = [p for p in a["probes"] if p["dataplane"] not in weir] + b["probes"]
for k in ["progcost", "control_weir", "control_policy"]:
    out[k] = c[k]
out["notes"] = ["run A (baselines, kube-proxy rule loads): " + n for n in a["notes"]
    if not n.startswith("weir") and not n.startswith("datapath runs stopped early")] \
    + ["run B (weir labs): " + n for n in b["notes"]] + ["run C (per-packet, control plane): " + n for n in c["notes"]]
out["runs"] = {r: {k: x["meta"].get(k) for k in ["date", "git", "command", "loadavg_start", "loadavg_end"]} for r, x in [("A", a), ("B", b), ("C", c)]}
out["meta"]["command"] = "bench/run.sh --full --loader-timeout-s 300 (run A; B and C: see analysis.md)"
out["complete"] = b.get("complete", False) and c.get("complete", False)
json.dump(out, open(sys.argv[4], "w"), indent=2)
