"""Peak host memory of the final save (`Pipeline.save_final`'s two steps) against the model's size.

    python tests/scripts/final_save_memory.py OUT_DIR [key=value ...]   (recipe overrides)

Builds the recipe's student as a ZeRO engine exactly as the pipeline does (no teacher, no
training: the save reads the optimizer's fp32 masters, which exist from the start), then samples
this process's resident set size every millisecond while `full_fp32_state` gathers the weights and
`save_hf_folder(student_holding(...))` writes OUT_DIR/final. Prints one JSON line: parameters,
their fp32 bytes, and the RSS peak above the level just before the save.
"""
import ctypes
import gc
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from bld_scale.config import load_recipe  # noqa: E402
from bld_scale.model.export import save_hf_folder, student_holding  # noqa: E402
from bld_scale.parallel.consolidate import full_fp32_state  # noqa: E402
from bld_scale.parallel.engines import build_ds_config, build_student_engine, init_distributed  # noqa: E402
from bld_scale.train.setup import setup_student  # noqa: E402


class PeakRss(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.process, self.peak, self.running = psutil.Process(), 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, self.process.memory_info().rss)


def _return_free_memory() -> None:
    """glibc keeps freed memory for reuse; give it back so the save's peak is not hidden in it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the measure may then read low, never high
        pass


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    recipe = load_recipe(ROOT / "launch" / "recipes" / "demo.yaml", [f"output_dir={out}", *overrides])
    _, world = init_distributed()
    tokenizer = AutoTokenizer.from_pretrained(recipe.student.tokenizer)
    engine = build_student_engine(setup_student(recipe, len(tokenizer)), recipe, build_ds_config(recipe, world))
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    gc.collect()
    _return_free_memory()
    before = psutil.Process().memory_info().rss
    sampler = PeakRss()
    sampler.start()
    t0 = time.perf_counter()
    state = full_fp32_state(engine)
    save_hf_folder(student_holding(engine.module, state), tokenizer, out / "final")
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    state_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in state.values()}.values())
    print(json.dumps({"parameters": n_params, "fp32_bytes": 4 * n_params, "state_bytes": state_bytes,
                      "rss_before": before, "rss_peak_above_before": peak - before, "seconds": seconds}))


if __name__ == "__main__":
    main()
