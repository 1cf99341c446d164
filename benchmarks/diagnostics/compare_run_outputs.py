"""Compare two runs' outputs (e.g. before and after a refactor): every JSON / JSONL file, ignoring wall
times, paths, hashes of path-bearing configs and provenance, plus the weights of every checkpoint.

    python -m benchmarks.diagnostics.compare_run_outputs BEFORE_DIR AFTER_DIR
"""
import json, math, sys, pathlib, re

import torch
VOLATILE = re.compile(r"(seconds|_s$|_ms$|time|wall|created|git_sha|episodes_per_minute|provenance|^path$|_path$|checkpoint$|^cache$|^data$|metrics_jsonl|summary_(json|md)|models_dir|results_dir|data_dir|^out$|expert_results|tokenizer_path|head_path|^source$|latency|policy_ms|speedup|draft_cost|verify_overhead|costs|rfsq_checkpoint|last_state|best_checkpoint|^file$|^video$|^error$|content_hash|head_hash|^checkpoints$)")
def walk(a, b, path, diffs):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if VOLATILE.search(k):
                continue
            if k not in a or k not in b:
                diffs.append(f"{path}/{k}: only in {'after' if k not in a else 'before'}"); continue
            walk(a[k], b[k], f"{path}/{k}", diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b): diffs.append(f"{path}: len {len(a)} vs {len(b)}"); return
        for i, (x, y) in enumerate(zip(a, b)): walk(x, y, f"{path}[{i}]", diffs)
    elif isinstance(a, str) and isinstance(b, str) and ("/tmp/before" in a or "/tmp/after" in b):
        pass
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        pass
    elif a != b:
        diffs.append(f"{path}: {a!r} vs {b!r}")
before, after = map(pathlib.Path, sys.argv[1:3])
files = sorted(p.relative_to(before) for p in before.rglob("*.json*") if "stamps" not in p.parts)
total = 0
for rel in files:
    pa, pb = before / rel, after / rel
    if not pb.exists(): print("MISSING after:", rel); continue
    if rel.suffix == ".jsonl":
        A = [json.loads(l) for l in pa.read_text().splitlines() if l.strip()]
        B = [json.loads(l) for l in pb.read_text().splitlines() if l.strip()]
        A = sorted(A, key=lambda r: json.dumps({k: r.get(k) for k in ("task", "trial", "epoch", "stage")}, sort_keys=True))
        B = sorted(B, key=lambda r: json.dumps({k: r.get(k) for k in ("task", "trial", "epoch", "stage")}, sort_keys=True))
    else:
        A, B = json.loads(pa.read_text()), json.loads(pb.read_text())
    diffs = []
    walk(A, B, "", diffs)
    total += len(diffs)
    print(f"{'identical' if not diffs else f'{len(diffs)} DIFFERENCES'}: {rel}")
    for d in diffs[:8]: print("   ", d)
for pa in sorted(before.rglob("*.pt")):
    pb = after / pa.relative_to(before)
    if pb.name.endswith("_last.pt") or not pb.exists():
        continue
    a, b = torch.load(pa, weights_only=True), torch.load(pb, weights_only=True)
    same = a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    total += not same
    print(f"{'identical weights' if same else 'DIFFERENT WEIGHTS'}: {pa.relative_to(before)}")
print(f"{len(files)} JSON files and the checkpoints compared, {total} differences")
