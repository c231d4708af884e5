"""``densevision train|test`` and ``tools/train.py`` / ``tools/test.py``: one set of flags, two spellings.

OpenMMLab's tools take the config (and checkpoint) as positionals; densevision's commands as ``-c/--config`` and
``-w/--checkpoint`` like its other commands (``flags=True``). Both parse here, call
:func:`densevision.apis.train.train` / :func:`~densevision.apis.train.test` and print what came out, on rank 0
only (:func:`~densevision.cli.logs.say`: the libraries' output goes to the log file). The tools run through the
command's own :func:`densevision.cli.commands.run_command`: the same log file, and bad input prints one line and
exits 2.

    python tools/train.py CONFIG --data-root data/mine --work-dir work_dirs/mine
    densevision train -c CONFIG --data-root data/mine --max-iters 200
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from densevision.cli.logs import say
from densevision.training.launcher import LAUNCHERS, is_main_process


class CfgOptions(argparse.Action):
    """mmengine's ``DictAction`` (``key=value`` pairs, lists as ``key='[a,b]'``), imported when the flag is used."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        from mmengine.config import DictAction

        DictAction(self.option_strings, self.dest)(parser, namespace, values, option)


def _model_file(parser: argparse.ArgumentParser, name: str, short: str, text: str, flags: bool) -> None:
    if flags:
        parser.add_argument(short, f"--{name}", required=True, help=text)
    else:
        parser.add_argument(name, help=text)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", help="folder for logs, the resolved config and checkpoints")
    parser.add_argument("--data-root", help="dataset root replacing the config's, for every split")
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=CfgOptions,
        metavar="KEY=VALUE",
        help="override config entries, e.g. model.backbone.init_cfg.checkpoint=x.pth (lists: key='[a,b]')",
    )
    parser.add_argument("--launcher", choices=LAUNCHERS, default="none", help="job launcher: pytorch under torchrun")
    parser.add_argument("--num-workers", type=int, help="data-loader worker processes (default: the config's)")
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)


def add_train_arguments(parser: argparse.ArgumentParser, *, flags: bool = False) -> argparse.ArgumentParser:
    """The training flags (OpenMMLab's tools/train.py and some more), shared by tools/train.py and the CLI.

    ``flags``: the config as ``-c/--config`` (densevision's commands) instead of a positional (OpenMMLab's tools).
    """
    _model_file(parser, "config", "-c", "mmdet / mmseg config file", flags)
    _common_arguments(parser)
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CHECKPOINT",
        help="continue training: from the work dir's last checkpoint, or from CHECKPOINT",
    )
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision (needs a GPU)")
    parser.add_argument("--max-iters", type=int, help="train this many iterations (schedule compressed to them)")
    parser.add_argument("--batch-size", type=int, help="images per process and iteration (default: the config's)")
    parser.add_argument("--seed", type=int, help="random seed")
    return parser


def add_test_arguments(parser: argparse.ArgumentParser, *, flags: bool = False) -> argparse.ArgumentParser:
    """The evaluation flags (OpenMMLab's tools/test.py), shared by tools/test.py and the CLI.

    ``flags``: config and checkpoint as ``-c/--config`` and ``-w/--checkpoint`` (densevision's commands) instead
    of positionals (OpenMMLab's tools), and ``-o`` for ``--out``.
    """
    _model_file(parser, "config", "-c", "mmdet / mmseg config file (the one saved in the training work dir)", flags)
    _model_file(parser, "checkpoint", "-w", "checkpoint file (.pth)", flags)
    _common_arguments(parser)
    parser.add_argument(*(["-o"] if flags else []), "--out", help="write the metrics to this JSON file")
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="unpickle arbitrary objects in the checkpoint (runs its code!)"
    )
    return parser


def _set_local_rank(args: argparse.Namespace) -> None:
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)


def run_train(args: argparse.Namespace) -> int:
    """Train from parsed :func:`add_train_arguments` flags; prints where the results are."""
    from densevision.apis.train import train
    from densevision.training.runner import default_work_dir

    _set_local_rank(args)
    resume: bool | str = False if args.resume is None else (True if args.resume == "auto" else args.resume)
    result = train(
        args.config,
        work_dir=args.work_dir or default_work_dir(args.config),
        data_root=args.data_root,
        cfg_options=args.cfg_options,
        resume=resume,
        amp=args.amp,
        launcher=args.launcher,
        max_iters=args.max_iters,
        num_workers=args.num_workers,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    if is_main_process():
        losses = result["losses"]
        say(f"classes: {', '.join(result['classes'])} (from the {result['class_source']})")
        say(f"iterations: {result['iterations']}, last loss: {losses[-1]:.4f}" if losses else "iterations: 0")
        for k, v in result["metrics"].items():
            say(f"val {k}: {v:.4f}")
        say(f"config: {result['config']}")
        say(f"checkpoint: {result['checkpoint']}")
    return 0


def run_test(args: argparse.Namespace) -> int:
    """Evaluate from parsed :func:`add_test_arguments` flags; prints the metrics."""
    from densevision.apis.train import test

    _set_local_rank(args)
    metrics = test(
        args.config,
        args.checkpoint,
        data_root=args.data_root,
        cfg_options=args.cfg_options,
        work_dir=args.work_dir,
        out=args.out,
        launcher=args.launcher,
        num_workers=args.num_workers,
        trust_checkpoint=args.trust_checkpoint,
    )
    if is_main_process():
        for k, v in metrics.items():
            say(f"{k}: {v:.4f}")
        if args.out:
            say(f"metrics: {args.out}")
    return 0


_TOOLS = {
    "train": (add_train_arguments, run_train, "Train a detector or segmentor"),
    "test": (add_test_arguments, run_test, "Evaluate a checkpoint"),
}


def tool_parser(command: str) -> argparse.ArgumentParser:
    """The parser of ``tools/<command>.py`` ("train" or "test"): OpenMMLab's positionals, densevision's flags."""
    add_arguments, run, description = _TOOLS[command]
    parser = add_arguments(argparse.ArgumentParser(prog=f"tools/{command}.py", description=description))
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the libraries' logs and warnings (always in the log file)"
    )
    parser.set_defaults(command=command, func=run)
    return parser


def run_tool(args: argparse.Namespace) -> int:
    """What ``tools/<command>.py`` runs on its parsed :func:`tool_parser` flags: the command, run as
    ``densevision <command>`` runs it."""
    from densevision.cli.commands import run_command

    return int(run_command(args.func, args, f"tools/{args.command}.py"))
