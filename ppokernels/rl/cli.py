"""``ppokernels train``: the lean PPO/GRPO loop from the command line.

Every :class:`~ppokernels.rl.config.RLConfig` field is a flag (``--kl-coef 0.05``, help text and
choices from the field) and a ``--set kl_coef=0.05`` key. Precedence: defaults < ``--config
FILE`` < the flags < ``--set key=value``. Nothing heavy is imported here; transformers and the
trainer load inside the command.
"""

from __future__ import annotations

import argparse
import dataclasses


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ppokernels.rl.config import RLConfig

    p = subparsers.add_parser(
        "train",
        help="train a Hugging Face causal LM with PPO / GRPO / RLOO / Dr.GRPO",
        description="Train with the lean loop (ppokernels.rl). Without arguments it trains the "
        "built-in 'copy' task on a tiny model in a few CPU minutes, with validation and test "
        "splits, and writes OUT/model. Under torchrun it runs data parallel (DDP).",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run in OUT (else refused)"
    )
    p.add_argument("--config", help="YAML or JSON file of config fields")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field (repeatable), e.g. --set kl_coef=0.05",
    )
    p.add_argument("--show-config", action="store_true", help="print the config and exit")
    fields = p.add_argument_group("config fields (also --set KEY=VALUE)")
    for f in dataclasses.fields(RLConfig):
        choices = f.metadata.get("choices")
        fields.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f"field_{f.name}",
            metavar=(f.name.upper() if not choices else "{" + ",".join(choices) + "}"),
            default=None,
            help=f"{f.metadata.get('help', '')} (default: {_shown(f)})",
        )
    p.set_defaults(fn=run)
    return p


def _shown(f: dataclasses.Field):
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return "null" if default is None else default


def build_config(args: argparse.Namespace):
    from ppokernels.rl.config import RLConfig

    cfg = RLConfig.from_file(args.config) if args.config else RLConfig()
    for f in dataclasses.fields(RLConfig):
        value = getattr(args, f"field_{f.name}", None)
        if value is not None:
            cfg.set(f.name, value)
    cfg.apply_overrides(args.set)
    return cfg.validate()


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from ppokernels.rl.config import ConfigError

    try:
        cfg = build_config(args)
    except (ConfigError, OSError) as e:
        print(f"ppokernels train: {e}", file=sys.stderr)
        return 2
    if args.show_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    return _train(cfg, args)


def _train(cfg, args: argparse.Namespace) -> int:
    """Build, train, close; every expected failure is one line on stderr (exit 2), Ctrl-C
    exits 130 saying what was (not) written. On a failure the process group is not shut down
    cleanly (a barrier could wait forever for a process that did not fail): the exit code says
    what happened and torchrun stops the other processes."""
    import sys

    from ppokernels.rl.checkpoint import CheckpointError
    from ppokernels.rl.evaluation import summary_line
    from ppokernels.rl.models import ModelLoadError
    from ppokernels.rl.tasks import RewardError
    from ppokernels.rl.trainer import Interrupted, Trainer

    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
        rows = trainer.train()
        trainer.close()
    except Interrupted as e:
        print(f"ppokernels train: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(
            f"ppokernels train: stopped at once (second Ctrl-C); {cfg.out}/checkpoint holds the "
            "last complete checkpoint, if any",
            file=sys.stderr,
        )
        return 130
    except (CheckpointError, ModelLoadError, RewardError, ValueError) as e:
        print(f"ppokernels train: {e}", file=sys.stderr)
        return 2
    if trainer.rank == 0 and rows:
        print(summary_line(rows, trainer.initial, cfg.out))
    return 130 if trainer.interrupted else 0
