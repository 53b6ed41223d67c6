"""Print what a checkpoint holds: step, world size, data position, sizes, teacher identity, recipe.

    python tools/inspect_checkpoint.py CHECKPOINT [--recipe] [--json]

CHECKPOINT is a step folder, a checkpoint root, or an output_dir (its current checkpoint). Reads
meta.json and file sizes only (no torch, no DeepSpeed), so it is instant even for 8B-scale runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def summary(step_dir: Path) -> dict:
    from bld_scale.checkpoint import DS_TAG, folder_bytes, read_meta

    meta = read_meta(step_dir)  # older formats converted: the same keys for every checkpoint
    run, state = meta["run"], meta["train_state"]
    recipe = run.get("recipe") or {}
    ds = step_dir / DS_TAG
    optim = sum(f.stat().st_size for f in ds.glob("*optim_states.pt"))
    model = sum(f.stat().st_size for f in ds.glob("*model_states.pt"))
    ranks = len(list(ds.glob("*optim_states.pt")))
    identity = run.get("identity") or {}
    return {"checkpoint": str(step_dir), "step": meta["step"],
            "max_steps": recipe.get("train", {}).get("max_steps"),
            "time": meta.get("time"), "world_size": meta["world_size"], "shard_files": ranks,
            "data": state.get("data"), "student_parameters": run.get("student_parameters"),
            "bytes": {"total": folder_bytes(step_dir), "optimizer_shards": optim, "model_states": model},
            "teacher": identity.get("teacher"), "student_tokenizer": identity.get("student_tokenizer"),
            "recipe": run.get("recipe")}


def render(s: dict, with_recipe: bool) -> str:
    r = s["recipe"] or {}
    t = s["teacher"] or {}
    lines = [
        f"checkpoint   {s['checkpoint']}",
        f"step         {s['step']} of {s['max_steps']}  (saved {s['time']})",
        f"world size   {s['world_size']} ranks ({s['shard_files']} optimizer shard files)",
        f"data         position {s['data'].get('position')} windows (seed {s['data'].get('seed')}, "
        f"window_bytes {s['data'].get('window_bytes')})",
        f"student      {s['student_parameters'] / 1e6:,.2f}M parameters, head "
        f"{r.get('student', {}).get('head')} K={r.get('student', {}).get('K')}, method "
        f"{r.get('distill', {}).get('method')}",
        f"sizes        total {_mb(s['bytes']['total'])}; optimizer shards {_mb(s['bytes']['optimizer_shards'])}; "
        f"model states {_mb(s['bytes']['model_states'])}",
        f"teacher      {t.get('path')} (fingerprint {t.get('fingerprint')}; not saved)",
        f"tokenizer    {(s['student_tokenizer'] or {}).get('path')} (fingerprint "
        f"{(s['student_tokenizer'] or {}).get('fingerprint')})",
    ]
    if with_recipe:
        import yaml

        lines += ["recipe:", yaml.safe_dump(r, sort_keys=False).rstrip()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--recipe", action="store_true", help="also print the resolved recipe it was saved with")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    from bld_scale.checkpoint import resolve_checkpoint

    s = summary(resolve_checkpoint(args.checkpoint))
    print(json.dumps(s, indent=2) if args.json else render(s, args.recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
