"""Prints a Markdown table of every record in runs.jsonl (python benches/recipe_search/summarize.py)."""

import json
from pathlib import Path

rows = [json.loads(l) for l in (Path(__file__).parent / "runs.jsonl").read_text().splitlines() if l.strip()]
print("| run id | label | status | epochs | k-NN init -> best (ep) -> final (ep) | curve | probe | final loss | train s | total s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r.get("kind") == "baseline":
        print(f"| {r['run_id']} | baseline | ok | - | raw pixels {r['raw_pixels']['knn_top1']:.1f}; init dino "
              f"{r['init_dino']['knn_top1']:.1f}; init torch {r['init_torch']['knn_top1']:.1f} | - | raw "
              f"{r['raw_pixels']['linear_probe']:.1f} / dino {r['init_dino']['linear_probe']:.1f} / torch "
              f"{r['init_torch']['linear_probe']:.1f} | - | - | {r['total_seconds']:.0f} |")
        continue
    curve = " ".join(f"{c['knn_top1']:.1f}" for c in r.get("knn_curve", []))
    knn = (f"{r['knn_init']:.1f} -> {r['knn_best']:.1f} ({r['knn_best_epoch']}) -> {r['knn_final']:.1f} ({r['knn_final_epoch']})"
           if "knn_init" in r else "-")
    probe = f"{r['linear_probe']:.1f}" if "linear_probe" in r else "-"
    loss = f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "-"
    print(f"| {r['run_id']} | {r['label']} | {r['status']} | {len(r.get('loss_per_epoch', []))}/{r['config']['epochs']} | {knn} | "
          f"{curve} | {probe} | {loss} | {r['train_seconds']:.0f} | {r['total_seconds']:.0f} |")
