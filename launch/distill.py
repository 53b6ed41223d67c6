"""Entry point: `deepspeed [launcher args] launch/distill.py [--config RECIPE.yaml] [key=value ...]`.

Without --config it runs the embedded demo recipe (launch/recipes/demo.yaml: the shipped teacher,
student tokenizer and text; CPU when there is no GPU). Every recipe key can be overridden with a
dotted `key=value`; the recipe is validated before any heavy work.

Rerunning the same command with the same output_dir resumes from the run's current checkpoint
(`checkpoint.dir`, default <output_dir>/checkpoints); a folder that holds a run without a
checkpoint, or a checkpoint made with other models or tokenizers, is refused unless --fresh.
SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) to the ranks, the stop file BLD_STOP_FILE, or the death of the
launcher above them makes every rank save at the next step boundary and exit 0; a second Ctrl-C
(2 s or more after the first) aborts without saving (exit 130). Rank 0 holds <output_dir>/run.lock
while the run lives: a second run on the same output_dir is refused.
Exit status: 0 done or stopped cleanly; 2 refused (bad recipe, data, tokenizer, checkpoint, teacher cache, or
output_dir in use; one `bld_scale:` line on rank 0, no traceback); 1 a bug (traceback).
"""
import argparse
import os
import signal
import sys
import warnings
from pathlib import Path

# DeepSpeed calls torch.distributed collectives that torch now marks deprecated: noise, not news.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

DEMO_RECIPE = ROOT / "launch" / "recipes" / "demo.yaml"


def main(argv=None) -> int:
    # First, before the heavy imports: a preemption signal during start-up must not kill the rank.
    from bld_scale.checkpoint.preemption import install_stop_handlers

    stop = install_stop_handlers()
    # light: no transformers, no models
    from bld_scale.config import recipe_keys_help, recipe_yaml, validate_attention, validate_liger, validate_paths

    parser = argparse.ArgumentParser(description=__doc__, epilog=recipe_keys_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="recipe YAML (default: the embedded demo)")
    parser.add_argument("--fresh", action="store_true",
                        help="discard the run in output_dir (checkpoints, metrics, outputs) and start over")
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the resolved recipe (YAML, after --config and overrides) and exit "
                             "without loading models; problems this machine would have (missing "
                             "files, flash-attn) are noted on stderr")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. train.max_steps=4 "
                                                     "(every key is listed below)")
    args = parser.parse_args(argv)

    from bld_scale.config import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.config or DEMO_RECIPE, args.overrides, check_paths=not args.print_recipe)
    except RecipeError as err:
        print(f"bld_scale: bad recipe: {err}", file=sys.stderr)
        return 2
    if args.print_recipe:
        if int(os.environ.get("RANK", "0")) == 0:  # once, also under a launcher
            print(recipe_yaml(recipe), end="", flush=True)
            try:
                validate_paths(recipe)
                validate_attention(recipe)
                validate_liger(recipe)
            except RecipeError as err:
                print(f"bld_scale: note: this recipe would not run on this machine: {err}", file=sys.stderr)
        return 0
    from bld_scale.train.pipeline import run

    refusals = refusal_labels()
    try:
        run(recipe, fresh=args.fresh)
    except tuple(refusals) as err:
        label = next(text for kind, text in refusals.items() if isinstance(err, kind))
        _on_rank0(f"bld_scale: {label}: {err}")
        return 2
    except BaseException as err:
        # A second Ctrl-C (the first only asks for a stop) raises KeyboardInterrupt here, or, on a
        # rank waiting in a collective for a rank that has already gone, a backend error.
        if not (isinstance(err, KeyboardInterrupt) or stop.aborting):
            raise
        _on_rank0("bld_scale: interrupted: stopped without saving the current step; the last "
                  "checkpoint (if any) is intact and the same command resumes from it")
        return 130
    finally:
        # Past this point a stop request has nothing left to save; and Python's shutdown would reset
        # our handlers to the default action, so a late SLURM USR1 would kill a finished rank. A
        # late Ctrl-C ends the process at once, without a traceback.
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _tear_down()
    return 0


def refusal_labels() -> dict:
    """Exception types that are refusals of bad input (one line on rank 0, exit 2, no traceback),
    with the words that introduce their message. Anything else is a bug: traceback, exit 1."""
    from bld_scale.cache.errors import TeacherCacheError
    from bld_scale.checkpoint import ResumeError
    from bld_scale.checkpoint.run_lock import OutputDirLocked
    from bld_scale.config import RecipeError
    from bld_scale.data.errors import DataError
    from bld_scale.train.teacher_tokenizer import TokenizerError

    return {RecipeError: "bad recipe", ResumeError: "cannot resume", OutputDirLocked: "output_dir in use",
            TokenizerError: "tokenizer mismatch", DataError: "bad data", TeacherCacheError: "teacher cache"}


def _on_rank0(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)


def _tear_down() -> None:
    """Destroy the process group if this process made one (see parallel.engines.shutdown_distributed)."""
    if "torch.distributed" in sys.modules:
        from bld_scale.parallel.engines import shutdown_distributed

        shutdown_distributed()


if __name__ == "__main__":
    code = main()
    # Everything the run writes is closed and the process group is destroyed by now. The
    # interpreter's own shutdown can still abort a finished rank ("terminate called without an
    # active exception", SIGABRT, seen on a loaded machine when a native thread of the backend
    # outlives its owner), which would turn a finished run into a failed one: leave directly.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
