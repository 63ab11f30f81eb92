"""The lean PPO/GRPO loop on Hugging Face causal LMs, built on ppokernels ops.

``ppokernels train`` runs it from the command line; from Python::

    from ppokernels.rl import RLConfig, Trainer
    cfg = RLConfig(algo="grpo", task="reverse", steps=50, out="runs/grpo")
    Trainer(cfg).train()

Read in this order: :mod:`~ppokernels.rl.algorithm` (one step, top to bottom: rollout,
scores, advantages, loss, update), :mod:`~ppokernels.rl.trainer` (the loop around it: setup,
warm-up, evaluation, metrics, checkpoints, Ctrl-C), :mod:`~ppokernels.rl.config` (RLConfig).
Then, as needed: :mod:`~ppokernels.rl.state` (TrainState, what checkpoints hold),
:mod:`~ppokernels.rl.models` (scoring from hidden states, critic, tiny models),
:mod:`~ppokernels.rl.rollout` (generation, EOS handling, the sampler's log-probs),
:mod:`~ppokernels.rl.tasks` (Task API, built-in tasks, ``jsonl:PATH`` tasks and their rewards),
:mod:`~ppokernels.rl.evaluation` (held-out splits), :mod:`~ppokernels.rl.checkpoint`,
:mod:`~ppokernels.rl.parallel` (DDP, FSDP2, bf16), :mod:`~ppokernels.rl.distributed` (process
group, Ctrl-C), :mod:`~ppokernels.rl.apply` (``ppokernels generate`` / ``eval``).
Importing this package does not import transformers; the submodules that need it import it lazily.
"""

from ppokernels.rl.config import ConfigError, RLConfig
from ppokernels.rl.tasks import TASKS, RewardModelScorer, Task, get_task, register_task


def __getattr__(name):
    if name == "Trainer":  # imports the trainer (and with it torch.distributed) on first use
        from ppokernels.rl.trainer import Trainer

        return Trainer
    raise AttributeError(name)


__all__ = [
    "ConfigError",
    "RLConfig",
    "RewardModelScorer",
    "TASKS",
    "Task",
    "Trainer",
    "get_task",
    "register_task",
]
