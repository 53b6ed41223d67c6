"""Run the real Pipeline to its end and record ZeRO-3's parameter states around `save_final`, then
put the engine back in that state and try the save bld_scale used before (GatheredParameters over
every parameter). Used by tests/integration/test_final_save.py.

    python tests/scripts/final_save_probe.py OUT_DIR key=value ...   (overrides as for launch/distill.py)

Writes OUT_DIR/probe-rank-<r>.json: the parameters' ds_status counts just before and just after
`save_final`, the counts before the old save, and the old save's error (None if it passed).
"""
import json
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bld_scale.config import load_recipe  # noqa: E402
from bld_scale.model.export import save_hf_folder  # noqa: E402
from bld_scale.train.pipeline import Pipeline  # noqa: E402


def statuses(module) -> dict:
    return dict(Counter(p.ds_status.name for p in module.parameters()))


def old_save_final(pipe: Pipeline, folder: Path) -> None:
    """bld_scale's save_final before this fix, verbatim apart from the folder."""
    import deepspeed

    module = pipe.student.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if pipe.rank == 0:
            save_hf_folder(module, pipe.sides.student_tok, folder)


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    recipe = load_recipe(ROOT / "launch" / "recipes" / "demo.yaml", [f"output_dir={out}", *overrides])
    pipe = Pipeline(recipe, fresh=True)
    record = {}
    new_save_final = pipe.save_final

    def probed_save_final():
        record["before_save"] = statuses(pipe.student.module)
        new_save_final()
        record["after_save"] = statuses(pipe.student.module)

    pipe.save_final = probed_save_final
    pipe.train()
    pipe.evaluate_student()  # the held-out forwards that preceded save_final, again
    record["before_old_save"] = statuses(pipe.student.module)
    try:
        old_save_final(pipe, out / "final_old")
        record["old_save_error"] = None
    except AssertionError as err:
        record["old_save_error"] = str(err)
    (out / f"probe-rank-{pipe.rank}.json").write_text(json.dumps(record, indent=2))
    sys.stdout.flush()
    sys.stderr.flush()
    # The old save left parameters in flight with their all-gathers never waited for: no clean
    # shutdown of the engine is possible from here (the point of the probe), so leave at once.
    os._exit(0)


if __name__ == "__main__":
    main()
