"""Entry point: `deepspeed [launcher args] launch/distill.py [--config RECIPE.yaml] [key=value ...]`.

Without --config it runs the embedded demo recipe (launch/recipes/demo.yaml: the shipped teacher,
student tokenizer and text; CPU when there is no GPU). Every recipe key can be overridden with a
dotted `key=value`; the recipe is validated before any heavy work.

Rerunning the same command with the same output_dir resumes from the run's current checkpoint
(`checkpoint.dir`, default <output_dir>/checkpoints); a folder that holds a run without a
checkpoint, or a checkpoint made with other models or tokenizers, is refused unless --fresh.
SIGTERM or SIGUSR1 to the ranks makes every rank save at the next step boundary and exit 0.
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

    install_stop_handlers()
    from bld_scale.config import recipe_keys_help, recipe_yaml  # light: no transformers, no models

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
                recipe.validate_paths()
                recipe.validate_attention()
            except RecipeError as err:
                print(f"bld_scale: note: this recipe would not run on this machine: {err}", file=sys.stderr)
        return 0
    from bld_scale.checkpoint import ResumeError
    from bld_scale.train.pipeline import run

    try:
        run(recipe, fresh=args.fresh)
    except ResumeError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"bld_scale: cannot resume: {err}", file=sys.stderr)
        return 2
    finally:
        # Past this point a stop request has nothing left to save; and Python's shutdown would reset
        # our handlers to the default action, so a late SLURM USR1 would kill a finished rank.
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
