"""Configuration of the lean PPO/GRPO loop: one dataclass, loadable from YAML/JSON, overridable
with ``key=value`` strings, validated with messages that name the field."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field

ALGOS = ("ppo", "grpo", "rloo", "drgrpo")
LOGPROBS = ("fused", "naive")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+")
LR_SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("auto", "none", "ddp", "fsdp2")
PRECISIONS = ("auto", "fp32", "bf16")
AGGS = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what is allowed."""


@dataclass
class RLConfig:
    """Every knob of the loop. Defaults train the built-in ``copy`` task with PPO on CPU in a
    few minutes. ``algo`` selects PPO (critic + GAE + KL in the reward) or a critic-free group
    method (GRPO, RLOO, Dr.GRPO: ``group_size`` samples per prompt, KL in the loss)."""

    # what to train
    algo: str = "ppo"
    task: str = "copy"
    model: str = "tiny-llama"  # built-in name (tiny-llama|tiny-qwen2|tiny-gpt2) or HF path/id
    tiny_hidden: int = 64  # size of the built-in tiny-* models
    tiny_layers: int = 2
    reward_model: str | None = None  # HF AutoModelForSequenceClassification path, replaces reward
    out: str = "runs/rl"
    steps: int = 60
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch CPU threads (None: 1 for tiny-* models on CPU, else default)
    logprobs: str = "fused"  # fused: linear_logprobs on hidden states; naive: full logits
    chunk_size: int | None = None  # linear_logprobs vocabulary chunk (None: the op's default)
    strategy: str = "auto"  # auto (ddp under torchrun, else none) | none | ddp | fsdp2
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (decoder compute)
    gradient_checkpointing: bool = False  # recompute decoder activations in the backward

    # rollout
    batch_size: int | None = None  # prompts per step per process (None: 64 samples in all)
    group_size: int = 4  # samples per prompt for grpo/rloo/drgrpo (ppo uses 1)
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0

    # optimisation
    ppo_epochs: int = 2
    minibatch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 32  # sequences per forward/backward (gradient accumulation)
    lr: float = 1e-3
    critic_lr: float = 2e-3
    lr_schedule: str = "linear"
    warmup_steps: int = 0  # optimizer steps of linear warm-up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_eps: float = 1e-8

    # PPO / GRPO
    clip: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.02
    kl_estimator: str | None = None  # None: k1 in the reward (PPO), k3 in the loss (GRPO)
    kl_in_reward: bool | None = None  # None: True for ppo, False (KL in the loss) otherwise
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    whiten_rewards: bool = True  # no mean shift (lm-human-preferences)
    whiten_advantages: bool = True  # ppo only
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of responses without EOS
    adv_eps: float = 1e-6
    loss_agg: str | None = None  # None: token-mean (drgrpo: seq-mean-token-sum-norm)

    # supervised warm-up (built-in tasks) before RL
    sft_steps: int = 100
    sft_lr: float = 3e-3
    sft_batch_size: int = 32

    # evaluation, logging, checkpoints
    eval_every: int = 10
    eval_prompts: int = 128
    eval_greedy: bool = False  # sampled at the training temperature (greedy: True)
    save_every: int = 50
    plots: bool = True
    tensorboard: bool = True
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form options for user tasks

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
    def kl_kind(self) -> str:
        """The KL estimator in use: veRL's defaults, k1 in the reward and k3 in the loss."""
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k1" if self.use_kl_in_reward else "k3"

    @property
    def agg(self) -> str:
        if self.loss_agg is not None:
            return self.loss_agg
        return "seq-mean-token-sum-norm" if self.algo == "drgrpo" else "token-mean"

    @property
    def use_kl_in_reward(self) -> bool:
        return self.is_ppo if self.kl_in_reward is None else self.kl_in_reward

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
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> RLConfig:
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
        """Set one field, converting strings (from ``--set key=value``) to the field's type."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        if key not in fields:
            close = [n for n in fields if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        hints = typing.get_type_hints(type(self))
        setattr(self, key, _convert(key, value, hints[key]))

    def apply_overrides(self, items: list[str]) -> None:
        """Apply ``key=value`` strings (values parsed as YAML/JSON scalars where they can be)."""
        for item in items or []:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got {item!r}")
            key, value = item.split("=", 1)
            self.set(key.strip(), value.strip())

    # ------------------------------------------------------------------ checks
    def validate(self) -> RLConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        _check_types(self)
        choices = dict(
            algo=ALGOS,
            logprobs=LOGPROBS,
            lr_schedule=LR_SCHEDULES,
            device=DEVICES,
            strategy=STRATEGIES,
            precision=PRECISIONS,
        )
        for name, allowed in choices.items():
            value = getattr(self, name)
            need(value in allowed, f"{name} must be one of {allowed}, got {value!r}")
        need(
            self.kl_estimator is None or self.kl_estimator in KL_ESTIMATORS,
            f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}",
        )
        need(
            self.loss_agg is None or self.loss_agg in AGGS,
            f"loss_agg must be one of {AGGS} or null, got {self.loss_agg!r}",
        )
        need(
            self.batch_size is None or self.batch_size >= 1,
            f"batch_size must be >= 1 or null, got {self.batch_size}",
        )
        need(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        for name in (
            "steps",
            "max_new_tokens",
            "tiny_hidden",
            "tiny_layers",
            "ppo_epochs",
            "minibatch_size",
            "micro_batch_size",
            "kl_horizon",
        ):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "sft_steps",
            "warmup_steps",
            "eval_every",
            "save_every",
            "top_k",
            "eval_prompts",
        ):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "critic_lr", "temperature", "clip", "sft_lr", "kl_target", "adam_eps"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("kl_coef", "entropy_coef", "vf_coef", "weight_decay", "max_grad_norm"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}")
        need(0 <= self.lam <= 1, f"lam must be in [0, 1], got {self.lam}")
        need(self.clip < 1, f"clip must be < 1, got {self.clip}")
        need(
            self.clip_high is None or self.clip_high > 0,
            f"clip_high must be > 0, got {self.clip_high}",
        )
        need(
            self.dual_clip is None or self.dual_clip > 1,
            f"dual_clip must be > 1, got {self.dual_clip}",
        )
        need(self.value_clip is None or self.value_clip > 0, "value_clip must be > 0 or null")
        need(self.chunk_size is None or self.chunk_size >= 1, "chunk_size must be >= 1 or null")
        if not self.is_ppo:
            need(
                self.group_size >= 2,
                f"group_size must be >= 2 for {self.algo}, got {self.group_size}",
            )
        _check_device(self.device)
        _check_paths(self)
        rollout = self.prompts_per_step * self.samples_per_prompt
        need(
            self.minibatch_size <= rollout and rollout % self.minibatch_size == 0,
            f"minibatch_size ({self.minibatch_size}) must divide the rollout batch "
            f"(batch_size x samples per prompt = {rollout})",
        )
        need(
            self.micro_batch_size <= self.minibatch_size
            and self.minibatch_size % self.micro_batch_size == 0,
            f"micro_batch_size ({self.micro_batch_size}) must divide minibatch_size "
            f"({self.minibatch_size})",
        )
        return self


def _check_types(cfg: RLConfig) -> None:
    """Every field has its annotated type (an int where an int is due, never 1.5 or True), and
    every float is finite (``lr=inf`` would turn the weights into NaN at the first step)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            continue
        kinds = tuple(a for a in args if a is not type(None)) or (typing.get_origin(hint) or hint,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            want = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
            raise ConfigError(f"{f.name} must be {want}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")


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


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(key: str, value, hint):
    """Convert ``value`` (often a string from the command line) to the annotated type."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if optional and (
        value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
    ):
        return None
    target = (
        args[0]
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None))
        else hint
    )
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError
        if target is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str) and "e" in value.lower():  # "1e3"; "1.5e0" is not an int
                f = float(value)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            return int(value)
        if target is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if target is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if target is dict or typing.get_origin(target) is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (TypeError, ValueError):
        name = getattr(target, "__name__", str(target))
        raise ConfigError(
            f"config key {key!r} expects {name}{' or null' if optional else ''}, got {value!r}"
        ) from None
    return value
