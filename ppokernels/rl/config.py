"""Configuration of the lean PPO/GRPO loop: one typed dataclass, :class:`RLConfig`.

Every field carries its help text and its check (``opt(default, help, check=..., choices=...)``);
the command line (``--kl-coef 0.05``, ``--set kl_coef=0.05``), YAML/JSON files and
``--show-config`` are all derived from the fields. The policy-loss fields carry the names of the
ops' arguments (``ppokernels.ppo_policy_loss``: ``loss_mode``, ``clip_low``, ``clip_high``,
``agg``, ``kl_coef``, ``kl_estimator``, ``entropy_coef``, ...) and their vocabularies are the
ops' own (``ppokernels.losses``: ``LOSS_MODES``, ``AGG_MODES``, ``KL_ESTIMATORS``). The loss is
``loss_spec(loss_mode, **fields)`` of the fields the mode has (:attr:`RLConfig.loss`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field

from ppokernels.losses import AGG_MODES, KL_ESTIMATORS, LOSS_MODES, loss_spec

ALGOS = ("ppo", "grpo", "rloo", "drgrpo")
HEADS = ("fused", "split", "naive")
LR_SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("auto", "none", "ddp", "fsdp2")
PRECISIONS = ("auto", "fp32", "bf16")
# the spec fields a loss mode may take (ppokernels.losses), each an RLConfig field below
LOSS_FIELDS = (
    "clip_low",
    "clip_high",
    "dual_clip",
    "seq_logratio_max",
    "tau_pos",
    "tau_neg",
    "ratio_cap",
    "beta",
    "k_pos",
    "lambda_pos",
    "k_neg",
    "lambda_neg",
)


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what is allowed."""


def opt(default, help: str, *, check: str | None = None, choices: tuple | None = None):
    """A config field: its default, one line of help, and its check (``"> 0"``, ``">= 1"``,
    ``"[0, 1]"``, ``"(0, 1]"``) or allowed values (``choices``)."""
    meta = {"help": help, "check": check, "choices": choices}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RLConfig:
    """Every knob of the loop. Defaults train the built-in ``copy`` task with PPO on CPU in a
    few minutes. ``algo`` selects PPO (critic + GAE + KL in the reward) or a critic-free group
    method (GRPO, RLOO, Dr.GRPO: ``group_size`` samples per prompt, KL in the loss)."""

    # what to train
    algo: str = opt("ppo", "ppo | grpo | rloo | drgrpo", choices=ALGOS)
    task: str = opt("copy", "built-in task, module:attribute, or jsonl:PATH")
    model: str = opt("tiny-llama", "tiny-llama | tiny-qwen2 | tiny-gpt2 | HF path or id")
    tiny_hidden: int = opt(64, "hidden size of the built-in tiny-* models", check=">= 1")
    tiny_layers: int = opt(2, "layers of the built-in tiny-* models", check=">= 1")
    reward_model: str | None = opt(None, "AutoModelForSequenceClassification replacing the reward")
    out: str = opt("runs/rl", "output directory")
    steps: int = opt(60, "RL steps", check=">= 1")
    seed: int = opt(0, "seed (each process adds rank * 100003)")
    device: str = opt("auto", "auto | cpu | cuda", choices=DEVICES)
    threads: int | None = opt(None, "torch CPU threads (null: 1 for tiny-* on CPU)", check=">= 1")
    head: str = opt(
        "fused",
        "fused: linear_ppo_policy_loss (3 GEMMs); split: linear_logprobs + ppo_policy_loss; "
        "naive: full logits",
        choices=HEADS,
    )
    chunk_size: int | None = opt(None, "rows per vocabulary chunk of the fused heads", check=">= 1")
    strategy: str = opt("auto", "auto | none | ddp | fsdp2", choices=STRATEGIES)
    precision: str = opt("auto", "auto (bf16 on CUDA) | fp32 | bf16", choices=PRECISIONS)
    gradient_checkpointing: bool = opt(False, "recompute decoder activations in the backward")

    # the task's data and reward (jsonl:PATH tasks)
    reward: str | None = opt(None, "exact | numeric | regex | module:function (jsonl tasks)")
    prompt_field: str = opt("prompt", "jsonl: the field holding the prompt")
    answer_field: str = opt("answer", "jsonl: the field holding the reference answer")
    split_field: str = opt("split", "jsonl: optional field naming the split of a line")
    reward_tolerance: float = opt(1e-6, "numeric reward: |number - answer| <= this", check=">= 0")
    reward_regex: str | None = opt(None, "regex reward: pattern ({answer} is the escaped answer)")

    # rollout
    batch_size: int | None = opt(
        None, "prompts per step per process (null: 64 samples)", check=">= 1"
    )
    group_size: int = opt(4, "samples per prompt for grpo / rloo / drgrpo", check=">= 1")
    max_new_tokens: int = opt(8, "response length limit", check=">= 1")
    temperature: float = opt(
        1.0, "sampling temperature (divides the logits everywhere)", check="> 0"
    )
    top_k: int = opt(0, "0: off", check=">= 0")
    top_p: float = opt(1.0, "nucleus sampling", check="(0, 1]")

    # optimisation
    ppo_epochs: int = opt(2, "passes over the rollout batch", check=">= 1")
    minibatch_size: int = opt(32, "sequences per optimizer step", check=">= 1")
    micro_batch_size: int = opt(32, "sequences per forward/backward", check=">= 1")
    lr: float = opt(1e-3, "policy learning rate", check="> 0")
    critic_lr: float = opt(2e-3, "critic learning rate", check="> 0")
    lr_schedule: str = opt("linear", "constant | linear | cosine", choices=LR_SCHEDULES)
    warmup_steps: int = opt(0, "optimizer steps of linear warm-up", check=">= 0")
    weight_decay: float = opt(0.0, "AdamW weight decay", check=">= 0")
    max_grad_norm: float = opt(1.0, "gradient clipping (0: off)", check=">= 0")
    adam_eps: float = opt(1e-8, "AdamW eps", check="> 0")

    # the policy loss: ppo_policy_loss's arguments (null: the loss spec's default)
    loss_mode: str = opt("vanilla", "the policy loss (ppokernels.losses)", choices=LOSS_MODES)
    clip_low: float | None = opt(None, "clip range [1 - clip_low, 1 + clip_high] (0.2)")
    clip_high: float | None = opt(None, "null: clip_low")
    dual_clip: float | None = opt(None, "dual clip c > 1 (vanilla, gspo)")
    seq_logratio_max: float | None = opt(None, "gspo: clamp of the sequence log-ratio")
    tau_pos: float | None = opt(None, "sapo: gate temperature for A > 0")
    tau_neg: float | None = opt(None, "sapo: gate temperature for A < 0")
    ratio_cap: float | None = opt(None, "cispo / dppo_*: cap of the ratio")
    beta: float | None = opt(None, "dro: penalty coefficient (required for dro)")
    k_pos: float | None = opt(None, "vespo: k for A >= 0")
    lambda_pos: float | None = opt(None, "vespo: lambda for A >= 0")
    k_neg: float | None = opt(None, "vespo: k for A < 0")
    lambda_neg: float | None = opt(None, "vespo: lambda for A < 0")
    agg: str | None = opt(
        None, "loss aggregation (null: token-mean; drgrpo: seq-mean-token-sum-norm)"
    )
    logratio_clamp: float | None = opt(20.0, "clamp of lp - old before exp", check="> 0")
    entropy_coef: float = opt(0.0, "entropy bonus", check=">= 0")
    kl_coef: float = opt(0.02, "KL coefficient", check=">= 0")
    kl_estimator: str | None = opt(None, "null: k1 in the reward (ppo), k3 in the loss")
    kl_in_reward: bool | None = opt(None, "null: true for ppo, false (KL in the loss) otherwise")
    adaptive_kl: bool = opt(False, "adaptive KL coefficient (Ziegler et al. 2019)")
    kl_target: float = opt(6.0, "adaptive KL target", check="> 0")
    kl_horizon: int = opt(10000, "adaptive KL horizon", check=">= 1")
    rollout_is_cap: float | None = opt(
        None,
        "truncated IS weights min(exp(old - rollout), cap) on the loss (null: off)",
        check="> 0",
    )

    # the value loss and the advantages
    value_clip: float | None = opt(0.2, "value_loss's clip (null: none)", check="> 0")
    vf_coef: float = opt(0.5, "value loss coefficient", check=">= 0")
    gamma: float = opt(1.0, "discount", check="[0, 1]")
    lam: float = opt(0.95, "GAE lambda", check="[0, 1]")
    whiten_rewards: bool = opt(True, "whiten per-token rewards, no mean shift (ppo)")
    whiten_advantages: bool = opt(True, "whiten advantages (ppo)")
    missing_eos_penalty: float | None = opt(1.0, "subtracted from scores of responses without EOS")
    adv_eps: float = opt(1e-6, "group_advantages' eps", check="> 0")

    # supervised warm-up (tasks with demonstrations) before RL
    sft_steps: int = opt(100, "supervised warm-up steps", check=">= 0")
    sft_lr: float = opt(3e-3, "warm-up learning rate", check="> 0")
    sft_batch_size: int = opt(32, "warm-up batch size", check=">= 1")

    # evaluation, logging, checkpoints
    eval_every: int = opt(10, "validation every N steps (0: never)", check=">= 0")
    eval_prompts: int = opt(128, "prompts per evaluation", check=">= 0")
    eval_greedy: bool = opt(False, "greedy evaluation (else sampled at the temperature)")
    save_every: int = opt(50, "checkpoint every N steps (0: only at the end)", check=">= 0")
    plots: bool = opt(True, "write reward.png and curves.png")
    tensorboard: bool = opt(True, "TensorBoard logs in OUT/tb")
    progress: bool = opt(True, "progress bar")
    extra: dict = opt({}, "free-form options for user tasks")

    # ------------------------------------------------------------------ derived
    @property
    def is_ppo(self) -> bool:
        return self.algo == "ppo"

    @property
    def samples_per_prompt(self) -> int:
        return 1 if self.is_ppo else self.group_size

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size or max(1, 64 // self.samples_per_prompt)

    @property
    def use_kl_in_reward(self) -> bool:
        return self.is_ppo if self.kl_in_reward is None else self.kl_in_reward

    @property
    def kl_kind(self) -> str:
        """The KL estimator in use: veRL's defaults, k1 in the reward and k3 in the loss."""
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k1" if self.use_kl_in_reward else "k3"

    @property
    def loss_agg(self) -> str:
        """``agg`` in use (Dr.GRPO's default is seq-mean-token-sum-norm)."""
        if self.agg is not None:
            return self.agg
        return "seq-mean-token-sum-norm" if self.algo == "drgrpo" else "token-mean"

    @property
    def loss(self):
        """The policy loss spec: ``loss_spec(loss_mode, **the fields set for it)``."""
        fields = {k: getattr(self, k) for k in LOSS_FIELDS if getattr(self, k) is not None}
        return loss_spec(self.loss_mode, **fields)

    # ------------------------------------------------------------------ io
    @classmethod
    def from_file(cls, path: str) -> RLConfig:
        """Load a YAML (``.yaml``/``.yml``) or JSON file whose keys are field names."""
        with open(path) as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping of field names to values")
        cfg = cls()
        for key, value in data.items():
            cfg.set(key, value)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def set(self, key: str, value) -> None:
        """Set one field, converting strings (from the command line) to the field's type."""
        hints = _hints()
        if key not in hints:
            close = [n for n in hints if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        try:
            setattr(self, key, _convert(value, hints[key]))
        except (TypeError, ValueError):
            want = _type_name(hints[key])
            raise ConfigError(f"config key {key!r} expects {want}, got {value!r}") from None

    def apply_overrides(self, items: list[str]) -> None:
        """Apply ``key=value`` strings (``--set``)."""
        for item in items or []:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got {item!r}")
            key, value = item.split("=", 1)
            self.set(key.strip(), value.strip())

    # ------------------------------------------------------------------ checks
    def validate(self) -> RLConfig:
        """Types, per-field checks and choices, then what fields say about each other."""
        hints = _hints()
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name), hints[f.name])
        _choice("agg", self.agg, AGG_MODES)
        if self.kl_estimator is not None:  # a trailing "+": k2's gradient (straight-through)
            _choice("kl_estimator", self.kl_estimator.rstrip("+"), KL_ESTIMATORS, self.kl_estimator)
        self._check_loss()
        if not self.is_ppo and self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 for {self.algo}, got {self.group_size}")
        rollout = self.prompts_per_step * self.samples_per_prompt
        if self.minibatch_size > rollout or rollout % self.minibatch_size:
            raise ConfigError(
                f"minibatch_size ({self.minibatch_size}) must divide the rollout batch "
                f"(batch_size x samples per prompt = {rollout})"
            )
        if (
            self.micro_batch_size > self.minibatch_size
            or self.minibatch_size % self.micro_batch_size
        ):
            raise ConfigError(
                f"micro_batch_size ({self.micro_batch_size}) must divide minibatch_size "
                f"({self.minibatch_size})"
            )
        _check_device(self.device)
        _check_paths(self)
        return self

    def _check_loss(self) -> None:
        """The fields set must belong to ``loss_mode``'s spec, and make a valid spec."""
        try:
            self.loss  # noqa: B018  (builds the spec, which checks its fields)
        except ValueError as e:
            msg = str(e)
            for k in LOSS_FIELDS:  # name the config key, e.g. "has no field 'tau_pos'"
                if f"field {k!r}" in msg or f"{k} must" in msg:
                    raise ConfigError(f"{k}: {msg} (loss_mode={self.loss_mode})") from None
            raise ConfigError(f"loss_mode={self.loss_mode}: {msg}") from None


# ---------------------------------------------------------------------- types and checks
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _hints() -> dict:
    return typing.get_type_hints(RLConfig)


def _kinds(hint) -> tuple[tuple, bool]:
    """(the non-None types of ``hint``, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (typing.get_origin(hint) or hint,), False


def _type_name(hint) -> str:
    kinds, optional = _kinds(hint)
    return " or ".join(k.__name__ for k in kinds) + (" or null" if optional else "")


def _convert(value, hint):
    """A command-line string (or a YAML/JSON value) as the field's type; ValueError if not.
    Ints stay ints: ``"1e3"`` is 1000, ``"1.5e0"`` and ``True`` are not ints."""
    (kind,), optional = _kinds(hint)
    if optional and (value is None or str(value).lower() in ("none", "null")):
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise ValueError
    if isinstance(value, bool):
        raise ValueError
    if kind is int:
        f = float(value) if isinstance(value, str) and "e" in value.lower() else value
        if isinstance(f, float) and not f.is_integer():
            raise ValueError
        return int(f)
    if kind is float:
        return float(value)
    if kind is dict:
        value = json.loads(value) if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise ValueError
        return value
    if not isinstance(value, str):
        raise ValueError
    return value


def _check_field(f: dataclasses.Field, value, hint) -> None:
    """``value`` has the annotated type (an int where an int is due, never 1.5 or True), every
    float is finite (``lr=inf`` would turn the weights into NaN), and the field's own check."""
    kinds, optional = _kinds(hint)
    if value is None and optional:
        return
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ConfigError(f"{f.name} must be {_type_name(hint)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
    if f.metadata.get("choices"):
        _choice(f.name, value, f.metadata["choices"])
    check = f.metadata.get("check")
    if check and not _passes(value, check):
        where = "in " if check[0] in "[(" else ""
        raise ConfigError(f"{f.name} must be {where}{check}, got {value!r}")


def _passes(v, check: str) -> bool:
    if check.startswith((">", "<")):
        op, bound = check.split()
        return {">": v > float(bound), ">=": v >= float(bound)}[op]
    lo, hi = (float(s) for s in check[1:-1].split(","))
    return (lo <= v if check[0] == "[" else lo < v) and (v <= hi if check[-1] == "]" else v < hi)


def _choice(name: str, value, allowed: tuple, shown=None) -> None:
    if value is not None and value not in allowed:
        shown = value if shown is None else shown
        raise ConfigError(f"{name} must be one of {allowed}, got {shown!r}")


def _check_device(device: str) -> None:
    if device != "cuda":
        return
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise ConfigError(
            f"device=cuda, but this torch build ({torch.__version__}) has no CUDA support"
        )
    if not torch.cuda.is_available():
        raise ConfigError("device=cuda, but no CUDA device is visible")


def _check_paths(cfg: RLConfig) -> None:
    from ppokernels.rl.models import BUILTIN_MODELS, looks_local

    if os.path.isfile(cfg.out):
        raise ConfigError(f"out={cfg.out} is a file; it must be a directory (or not exist yet)")
    for key in ("model", "reward_model"):
        name = getattr(cfg, key)
        if name and name not in BUILTIN_MODELS and looks_local(name):
            if not os.path.exists(os.path.expanduser(name)):
                raise ConfigError(f"{key} path {name} does not exist")
