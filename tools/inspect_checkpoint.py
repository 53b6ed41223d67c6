"""Print what a checkpoint holds: step, world size, data position, sizes, teacher identity, recipe.

    python tools/inspect_checkpoint.py CHECKPOINT [--recipe] [--json] [--sizes-only]

CHECKPOINT is a step folder, a checkpoint root, or an output_dir (its current checkpoint). First
verifies the checkpoint against its manifest (every file's size and SHA-256, read with a few
threads: seconds per 10 GB; --sizes-only checks sizes alone, instant at any scale); a damaged
checkpoint is reported in one line naming the file and the problem, exit status 2. Reads no
tensors (no torch, no DeepSpeed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def summary(step_dir: Path, sizes_only: bool = False) -> dict:
    """What `step_dir` holds; DamagedCheckpointError (naming the file) when it does not verify."""
    from bld_scale.checkpoint import DS_TAG, folder_bytes, read_meta, require_whole

    verdict = require_whole(step_dir, contents=not sizes_only)
    meta = read_meta(step_dir)  # older formats converted: the same keys for every checkpoint
    run, state = meta["run"], meta["train_state"]
    recipe = _dict(run.get("recipe"))
    ds = step_dir / DS_TAG
    optim = sum(f.stat().st_size for f in ds.glob("*optim_states.pt"))
    model = sum(f.stat().st_size for f in ds.glob("*model_states.pt"))
    ranks = len(list(ds.glob("*optim_states.pt")))
    identity = _dict(run.get("identity"))
    return {"checkpoint": str(step_dir), "step": meta["step"], "verified": verdict.checked,
            "max_steps": _dict(recipe.get("train")).get("max_steps"),
            "time": meta.get("time"), "world_size": meta["world_size"], "shard_files": ranks,
            "data": state.get("data"), "student_parameters": run.get("student_parameters"),
            "bytes": {"total": folder_bytes(step_dir), "optimizer_shards": optim, "model_states": model},
            "teacher": identity.get("teacher"), "student_tokenizer": identity.get("student_tokenizer"),
            "recipe": run.get("recipe")}


def render(s: dict, with_recipe: bool) -> str:
    r = _dict(s["recipe"])
    t = _dict(s["teacher"])
    student, distill = _dict(r.get("student")), _dict(r.get("distill"))
    params = s["student_parameters"]
    lines = [
        f"checkpoint   {s['checkpoint']}",
        f"verified     {s['verified']}",
        f"step         {s['step']} of {s['max_steps']}  (saved {s['time']})",
        f"world size   {s['world_size']} ranks ({s['shard_files']} optimizer shard files)",
        f"data         position {s['data'].get('position')} windows (seed {s['data'].get('seed')}, "
        f"window_bytes {s['data'].get('window_bytes')})",
        f"student      {f'{params / 1e6:,.2f}M' if isinstance(params, (int, float)) else '?'} parameters, head "
        f"{student.get('head')} K={student.get('K')}, method {distill.get('method')}",
        f"sizes        total {_mb(s['bytes']['total'])}; optimizer shards {_mb(s['bytes']['optimizer_shards'])}; "
        f"model states {_mb(s['bytes']['model_states'])}",
        f"teacher      {t.get('path')} (fingerprint {t.get('fingerprint')}; not saved)",
        f"tokenizer    {_dict(s['student_tokenizer']).get('path')} (fingerprint "
        f"{_dict(s['student_tokenizer']).get('fingerprint')})",
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
    ap.add_argument("--sizes-only", action="store_true",
                    help="check the files' sizes against the manifest, not their checksums (instant)")
    args = ap.parse_args(argv)
    from bld_scale.checkpoint import ResumeError, resolve_checkpoint

    try:
        s = summary(resolve_checkpoint(args.checkpoint), sizes_only=args.sizes_only)
    except (ResumeError, OSError) as err:  # damaged, of an unknown format, or not there
        print(f"bld_scale: {err}", file=sys.stderr)
        return 2
    print(json.dumps(s, indent=2) if args.json else render(s, args.recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
