"""Tasks: where prompts come from (train / validation / test) and how responses are scored.

* :mod:`~ppokernels.rl.tasks.base`: the :class:`Task` API, the hashed split rule, the reward
  checks, the reward-model scorer;
* :mod:`~ppokernels.rl.tasks.builtin`: ``copy``, ``reverse``, ``repeat``, ``sum``;
* :mod:`~ppokernels.rl.tasks.jsonl` and :mod:`~ppokernels.rl.tasks.rewards`: a task from a
  JSONL file of prompts and answers with a verifiable reward (``jsonl:PATH``).

:func:`get_task` resolves a name: a registered task, ``jsonl:PATH``, or ``module:attribute``
naming a Task (or a function returning one). The modules import only ``base`` (and ``rewards``),
never this package, so there is no import cycle.
"""

from __future__ import annotations

from ppokernels.rl.tasks.base import (
    SPLITS,
    RewardError,
    RewardModelScorer,
    Task,
    check_rewards,
    hash_split,
    reward_name,
)
from ppokernels.rl.tasks.builtin import BUILTIN_TASKS
from ppokernels.rl.tasks.jsonl import JsonlError, jsonl_task
from ppokernels.rl.tasks.rewards import import_object

TASKS: dict = {t.name: t for t in BUILTIN_TASKS}


def register_task(task: Task) -> Task:
    """Make ``task`` available by name (``--task NAME``, ``RLConfig(task=NAME)``)."""
    TASKS[task.name] = task
    return task


def get_task(name: str, **jsonl_options) -> Task:
    """A registered task, ``jsonl:PATH`` (``jsonl_options``: see :func:`jsonl_task`), or
    ``module:attribute`` of a Task object (or a function returning one). The working directory
    is importable, as with ``python -m``."""
    if name in TASKS:
        task = TASKS[name]
    elif name.startswith("jsonl:"):
        return jsonl_task(name[len("jsonl:") :], **jsonl_options)
    elif ":" in name:
        obj = import_object(name, "task")
        task = obj() if callable(obj) and not isinstance(obj, Task) else obj
        if not isinstance(task, Task):
            raise ValueError(f"task {name!r} is not a ppokernels.rl.Task")
    else:
        raise ValueError(
            f"unknown task {name!r}; built-in: {', '.join(sorted(TASKS))} "
            "(or jsonl:PATH, or module:attribute of your own Task)"
        )
    if jsonl_options.get("reward"):
        raise ValueError(
            f"reward={jsonl_options['reward']} applies to jsonl:PATH tasks; task {name!r} "
            "has its own reward function"
        )
    return task


__all__ = [
    "SPLITS",
    "TASKS",
    "JsonlError",
    "RewardError",
    "RewardModelScorer",
    "Task",
    "check_rewards",
    "get_task",
    "hash_split",
    "jsonl_task",
    "register_task",
    "reward_name",
]
