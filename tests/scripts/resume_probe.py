"""Resume a run with the real Pipeline, record the student engine's logits on a fixed batch right
after loading, then train on to the end. Used by tests/integration/test_checkpoint.py for two things at once:
a 2-rank checkpoint resumed on 1 rank (DeepSpeed universal checkpoint), and the reference logits
that tools/export_hf.py's output must reproduce.

    python tests/scripts/resume_probe.py OUT.pt key=value ...   (overrides as for launch/distill.py)
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bld_scale.config import load_recipe  # noqa: E402
from bld_scale.data.corpus import load_works  # noqa: E402
from bld_scale.data.batch import split_windows  # noqa: E402
from bld_scale.train.pipeline import Pipeline  # noqa: E402

PROBE_TEXT = load_works("heldout")["hamlet"][:4000]


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    recipe = load_recipe(ROOT / "launch" / "recipes" / "demo.yaml", overrides)
    pipe = Pipeline(recipe)
    assert pipe.state.step > 0, "the probe is meant to resume a run"
    windows = split_windows(PROBE_TEXT, recipe.data.window_bytes)[:2]
    batch = pipe._batch(windows)
    pipe.student.eval()
    with torch.no_grad():
        token_logits, byte_logits = pipe.student(input_ids=batch.student_input_ids,
                                                 attention_mask=batch.student_attention_mask,
                                                 prev_bytes=batch.byte_targets)
    pipe.student.train()
    if pipe.rank == 0:
        torch.save({"step": pipe.state.step, "input_ids": batch.student_input_ids,
                    "attention_mask": batch.student_attention_mask, "prev_bytes": batch.byte_targets,
                    "token_logits": token_logits, "byte_logits": byte_logits}, out)
    pipe.train()


if __name__ == "__main__":
    main()
