"""The command line that train.py, sft.py and dpo.py share: --config, --resume, key=value overrides, and what the
run's end says.

`training_command` loads the config, builds the task, trains (or plans, with train.py --plan), and reports: a
UserError is one line and exit status 2, a failed run (TrainingError) exit status 1, Ctrl-C 130; a finished,
stopped or already complete run says how to continue it.
"""

import argparse
import os
import shlex
import sys
from typing import Callable

from smollm2 import planner
from smollm2.config import Config
from smollm2.config_load import load_config
from smollm2.errors import StoppedAtOnce, TrainingError, UserError, say_error
from smollm2.task import Task


def arg_parser(doc: str, example: str) -> argparse.ArgumentParser:
    """The command line of train.py, sft.py and dpo.py: --config, --resume and key=value overrides."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"a nanotron-format YAML file, e.g. {example}")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the newest checkpoint of the run (no value; the bucket's when the run dir "
                             "has none), from this checkpoint file, or from s3://bucket/prefix[/checkpoints/step_N.pt]")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. tokens.micro_batch_size=4")
    return parser


def training_command(args, make_task: Callable[[Config], Task], script: str, train: Callable[..., dict]) -> int:
    """Load the config, build the task, train (train.py's train(), or plan with --plan), and report the outcome."""
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides.append(args.resume)   # `--resume key=value`: argparse took the override for a checkpoint
        args.resume = "latest"
    explicit = any(o.split("=", 1)[0].strip() == "tokens.batch_accumulation_per_replica" for o in args.overrides)
    try:
        cfg = load_config(args.config, args.overrides)
        if getattr(args, "plan", False):   # train.py --plan: memory, fit, time and cost on --gpu; nothing is trained
            print(planner.report(cfg, args, explicit))
            return 0
        result = train(cfg, args.resume, explicit, make_task(cfg))
    except UserError as e:
        return say_error(e)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except StoppedAtOnce as e:
        print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:   # before the first step: nothing to save yet
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":   # under torchrun, rank 0 speaks for the run
        return 0
    again = shlex.join(["python", script, "--config", args.config, *args.overrides, "--resume"])
    if result.get("complete"):
        steps = cfg.tokens.train_steps
        more = shlex.join(["python", script, "--config", args.config, *args.overrides,
                           f"tokens.train_steps={2 * max(steps, result['step'])}", "--resume"])   # the last one wins
        print(f"the run is complete: step {result['step']} of tokens.train_steps={steps}. To train further, resume "
              f"with more steps, e.g. {more} (the LR schedule follows the new length)", flush=True)
        return 0
    if result["stopped_by"]:
        print(f"stopped by {result['stopped_by']} at step {result['step']}; continue with: {again}", file=sys.stderr)
        return 130 if result["stopped_by"] == "Ctrl-C" else 0
    val = f"{result['val_loss']:.3f}" if result["val_loss"] is not None else "n/a"
    print(f"done: step {result['step']} | train loss {result['train_loss']:.3f} | val loss {val}", flush=True)
    return 0
