"""The whole journey of the lean loop as a user takes it: splits, train with validation, test,
export (``OUT/model`` loads in plain transformers), ``ppokernels generate`` / ``eval``, resume
and its failure modes (missing, crafted or corrupt checkpoint files, an existing run), Ctrl-C at
any point, and the checks at the boundary (rewards, config values, model paths).

Tiny models, few steps, all on CPU."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from ppokernels.cli import main  # noqa: E402
from ppokernels.rl import ConfigError, RLConfig, Task  # noqa: E402
from ppokernels.rl.tasks import TASKS, RewardError, check_rewards, get_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FAST = [
    "--set",
    "batch_size=8",
    "--set",
    "minibatch_size=8",
    "--set",
    "micro_batch_size=8",
    "--set",
    "ppo_epochs=1",
    "--set",
    "sft_steps=4",
    "--set",
    "eval_every=2",
    "--set",
    "eval_prompts=8",
    "--set",
    "max_new_tokens=5",
    "--set",
    "progress=false",
    "--set",
    "plots=false",
    "--set",
    "tensorboard=false",
]


def train(out, *extra) -> int:
    return main(["train", "--out", str(out), "--steps", "4", *FAST, *extra])


# ------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("name", sorted(TASKS))
def test_builtin_splits_are_disjoint(name):
    task = TASKS[name]
    val, test = set(task.split("validation", 500)), set(task.split("test", 500))
    assert val and test and not val & test
    sampled = set(task.sample_train(__import__("random").Random(0), 3000))
    assert sampled and not sampled & (val | test)
    assert task.split("test", 500) == task.split("test", 500)  # fixed, not re-drawn


def test_task_from_lists_and_overlap_errors():
    reward = lambda p, r: [0.0] * len(r)  # noqa: E731
    prompts = [f"q{i}" for i in range(100)]
    task = Task.from_prompts("lists", prompts, reward, validation=0.2, test=10, seed=1)
    tr, va, te = task.train, task.split("validation"), task.split("test")
    assert (len(tr), len(va), len(te)) == (70, 20, 10)
    assert sorted(tr + va + te) == sorted(prompts)
    assert task.split("validation", 5) == va[:5]
    with pytest.raises(ValueError, match="both in train and in validation/test, e.g. 'a'"):
        Task("bad", reward=reward, train=["a", "b"], test=["a"])
    with pytest.raises(ValueError, match="validation and test share"):
        Task("bad", reward=reward, train=["x"], validation=["a"], test=["a"])
    with pytest.raises(TypeError, match="non-string prompt 3"):
        Task("bad", reward=reward, train=["a", 3])


# ------------------------------------------------------------------------------- journey
def test_train_export_generate_eval(tmp_path, capsys):
    """A 4-step run leaves OUT/model that plain transformers loads and generates from, and the
    generate / eval commands work on it; validation and test rewards are logged."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert train(out) == 0
    summary = capsys.readouterr().out
    assert re.search(r"train reward \S+ \(step 1\) -> \S+ \(step 4\)", summary), summary
    assert "test reward" in summary
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "eval_reward" in rows[1] and "test_reward" in rows[3] and "test_reward" not in rows[1]
    assert "eval_reward_initial" in rows[0] and "test_reward_initial" in rows[0]
    assert (out / "run_config.json").exists() and not (out / "config.json").exists()

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    saved = load_file(out / "checkpoint" / "policy.safetensors")
    for name, p in model.state_dict().items():
        if name in saved:
            torch.testing.assert_close(p, saved[name], rtol=0, atol=0, msg=name)
    ids = tok(["abc:"], return_tensors="pt", add_special_tokens=False)
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(gen[0, :4]) == "abc:"  # the character tokenizer round-trips

    assert main(["generate", "--model", str(out / "model"), "--prompt", "abc:"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    greedy = gen[0, 4:]
    want = tok.decode(
        greedy[: (greedy == tok.eos_token_id).nonzero()[0, 0]]
        if (greedy == tok.eos_token_id).any()
        else greedy,
        skip_special_tokens=True,
    )
    assert line == {"prompt": "abc:", "response": want}

    report = tmp_path / "eval.json"
    args = ["eval", "--model", str(out / "model"), "--task", "copy", "--split", "test"]
    assert main([*args, "--out", str(report), "--n", "16"]) == 0
    res = json.loads(report.read_text())
    task = get_task("copy")
    assert res["split"] == "test" and res["n"] == 16 and len(res["results"]) == 16
    assert {r["prompt"] for r in res["results"]} <= set(task.split("test"))
    prompts = [r["prompt"] for r in res["results"]]
    rewards = task.reward(prompts, [r["response"] for r in res["results"]])
    assert [r["reward"] for r in res["results"]] == rewards
    assert res["reward_mean"] == pytest.approx(sum(rewards) / 16)


def test_resume_refusals_leave_the_run_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out) == 0
    metrics = (out / "metrics.jsonl").read_bytes()
    assert train(out) == 2  # would overwrite an existing run
    assert "--overwrite" in capsys.readouterr().err
    os.remove(out / "checkpoint" / "state_rank0.pt")
    assert train(out, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "lacks state_rank0.pt" in err and len(err.splitlines()) == 1
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert train(tmp_path / "empty", "--resume") == 2
    assert "no checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "metrics.jsonl").exists()
    assert train(out, "--overwrite") == 0  # explicit: allowed


class _Crafted:
    """A pickle payload that would create ``path`` when unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_or_corrupt_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out) == 0
    state = out / "checkpoint" / "state_rank0.pt"
    assert isinstance(torch.load(state, weights_only=True)["rng"]["python"]["words"], torch.Tensor)
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "x": _Crafted(str(marker))}, state)
    assert train(out, "--resume", "--steps", "5") == 2
    err = capsys.readouterr().err.strip()
    assert str(state) in err and len(err.splitlines()) == 1
    assert not marker.exists()  # the payload never ran

    policy = out / "checkpoint" / "policy.safetensors"
    policy.write_bytes(policy.read_bytes()[:100])
    assert train(out, "--resume", "--steps", "5") == 2
    err = capsys.readouterr().err.strip()
    assert str(policy) in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------- Ctrl-C
def _interrupting_task(name, *, in_warmup: bool):
    """The copy task, but a SIGINT arrives in the 2nd warm-up example or the 2nd reward call."""
    base, calls = TASKS["copy"], {"n": 0}

    def hit():
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    def sft(rng):
        if in_warmup:
            hit()
        return base.sft_example(rng)

    def reward(prompts, responses):
        if not in_warmup:
            hit()
        return base.reward(prompts, responses)

    task = Task(name, base.sample_prompts, reward, base.tokenizer, sft)
    TASKS[name] = task
    return task


def test_sigint_in_warmup_writes_nothing(tmp_path, capsys):
    _interrupting_task("sigint_warmup", in_warmup=True)
    out = tmp_path / "run"
    assert train(out, "--task", "sigint_warmup") == 130
    assert "interrupted during the supervised warm-up" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_sigint_in_rl_saves_checkpoint_and_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _interrupting_task("sigint_rl", in_warmup=False)
    out = tmp_path / "run"
    assert train(out, "--task", "sigint_rl", "--set", "eval_every=0") == 130
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # the step in progress finished, then it stopped
    state = torch.load(out / "checkpoint" / "state_rank0.pt", weights_only=True)
    assert state["step"] == 2
    AutoModelForCausalLM.from_pretrained(out / "model")
    assert train(out, "--task", "copy", "--resume", "--set", "eval_every=0") == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


# ------------------------------------------------------------------------------- boundaries
def test_bad_rewards_stop_before_any_update(tmp_path):
    from ppokernels.rl.trainer import Trainer

    def nan_reward(prompts, responses):
        return [math.nan if i == 3 else 0.5 for i in range(len(responses))]

    task = Task("nan", TASKS["copy"].sample_prompts, nan_reward, TASKS["copy"].tokenizer)
    cfg = RLConfig(out=str(tmp_path), steps=2, batch_size=8, minibatch_size=8, sft_steps=0)
    cfg.micro_batch_size = 8
    cfg.progress = cfg.plots = cfg.tensorboard = False
    tr = Trainer(cfg, task=task)
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    with pytest.raises(RewardError, match=r"task 'nan': reward function .*nan_reward: reward 3 "):
        tr.train()
    assert not tr.state.opt.state  # no optimizer step ran
    for k, v in tr.policy.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RewardError, match="returned 2 rewards for 3 responses"):
        check_rewards([1.0, 2.0], 3, "f")
    with pytest.raises(RewardError, match="reward 1 is '1'"):
        check_rewards([1.0, "1"], 2, "f")
    with pytest.raises(RewardError, match="returned NoneType"):
        check_rewards(None, 2, "f")
    assert check_rewards(torch.tensor([1, 2]), 2, "f") == [1.0, 2.0]


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("lr", "inf", "lr must be a finite number"),
        ("critic_lr", "nan", "critic_lr must be a finite number"),
        ("ppo_epochs", "1.5e0", "'ppo_epochs' expects int"),
        ("model", "./no/such/model", "model path ./no/such/model does not exist"),
    ],
)
def test_config_boundaries(key, value, match):
    cfg = RLConfig()
    with pytest.raises(ConfigError, match=match):
        cfg.set(key, value)
        cfg.validate()


def test_config_types_and_device():
    cfg = RLConfig()
    cfg.ppo_epochs = 1.5  # set from Python, bypassing the string conversion
    with pytest.raises(ConfigError, match="ppo_epochs must be int, got 1.5"):
        cfg.validate()
    assert RLConfig(ppo_epochs=int("3")).validate().ppo_epochs == 3
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda, but"):
            RLConfig(device="cuda").validate()


def test_missing_model_is_one_line(tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("does not exist") and len(err.splitlines()) == 1
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1


def test_summary_line_short_and_long_runs():
    from ppokernels.rl.evaluation import summary_line

    rows = [dict(step=i, reward_mean=i / 10, time_s=1.0) for i in range(1, 9)]
    assert "(step 1) -> 0.300 (step 3)" in summary_line(rows[:3], {}, "o")
    assert "0.100 (1 step)" in summary_line(rows[:1], {}, "o")
    assert "0.300 -> 0.600" in summary_line(rows, {}, "o")  # means of steps 1-5 and 4-8


# ------------------------------------------------------------------------------- docs
def test_docs_custom_task_example_runs_as_written(tmp_path):
    """The mytask.py block and the shell commands of docs/rl.md's custom-task section, run
    verbatim with the console script from the folder that holds mytask.py."""
    text = (ROOT / "docs" / "rl.md").read_text()
    section = text[text.index("## Your own task") :]
    code = re.search(r"```python\n(# mytask.py\n.*?)```", section, re.S).group(1)
    shell = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    (tmp_path / "mytask.py").write_text(code)
    exe = Path(sys.executable).with_name("ppokernels")
    cmds = [c for c in shell.replace("\\\n", " ").splitlines() if c.strip()]
    assert len(cmds) >= 3 and all(c.startswith("ppokernels ") for c in cmds)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    for cmd in cmds:
        args = [str(exe)] + cmd.split()[1:]
        res = subprocess.run(
            args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-3000:])
    report = json.loads((tmp_path / "runs" / "swap-test.json").read_text())
    assert report["split"] == "test" and report["results"]


# ------------------------------------------------------------------------------- jsonl tasks
EXAMPLE = ROOT / "examples" / "arithmetic.jsonl"


def test_jsonl_task_trains_evaluates_and_exports(tmp_path, capsys):
    """``--task jsonl:FILE --reward exact``: training prompts from the file, validation and
    test by the hashed rule, the test reward at the end, OUT/model, and ``eval`` on the test
    split with the run's reward."""
    from ppokernels.rl.tasks import get_task

    out = tmp_path / "run"
    task_arg = f"jsonl:{EXAMPLE}"
    assert train(out, "--task", task_arg, "--reward", "exact") == 0
    assert "test reward" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "test_reward" in rows[-1] and (out / "model" / "config.json").exists()
    assert json.loads((out / "run_config.json").read_text())["reward"] == "exact"
    report = tmp_path / "eval.json"
    args = ["eval", "--model", str(out / "model"), "--task", task_arg, "--out", str(report)]
    assert main(args) == 0
    res = json.loads(report.read_text())
    task = get_task(task_arg)
    lines = [json.loads(x) for x in EXAMPLE.read_text().splitlines()]
    answers = {x["prompt"]: x["answer"] for x in lines}
    assert {r["prompt"] for r in res["results"]} == set(task.split("test"))
    for r in res["results"]:
        assert r["reward"] == float(r["response"].strip() == answers[r["prompt"]])


def test_jsonl_rewards_and_splits(tmp_path):
    from ppokernels.rl.tasks import get_task, hash_split

    path = tmp_path / "d.jsonl"
    rows = [{"q": f"{i}*2=", "a": 2 * i} for i in range(40)]
    rows[0]["part"] = "test"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    kw = dict(prompt_field="q", answer_field="a", split_field="part")
    task = get_task(f"jsonl:{path}", reward="numeric", reward_tolerance=0.5, **kw)
    assert "0*2=" in task.split("test")
    for r in rows[1:]:  # lines without a split field: the hashed rule of the built-ins
        assert r["q"] in getattr(task, hash_split(r["q"]))
    got = task.reward(["3*2=", "3*2=", "3*2=", "4*2="], ["6", "it is 6.4", "1,006", "8 or 9"])
    assert got == [1.0, 1.0, 0.0, 0.0]  # the last number counts
    task = get_task(f"jsonl:{path}", reward="regex", reward_regex=r"^{answer}\b", **kw)
    assert task.reward(["3*2=", "3*2="], ["6 !", "16"]) == [1.0, 0.0]
    (tmp_path / "myreward.py").write_text(
        "def score(prompts, responses, answers):\n"
        "    return [float(len(r) == len(a)) for r, a in zip(responses, answers)]\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        task = get_task(f"jsonl:{path}", reward="myreward:score", **kw)
        assert task.reward(["3*2=", "5*2="], ["7", "7"]) == [1.0, 0.0]
    finally:
        sys.path.remove(str(tmp_path))


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"prompt": "1+1=" "answer": "2"}', "not valid JSON"),
        ('["1+1=", "2"]', "expected a JSON object, got list"),
        ('{"prompt": "1+1="}', "missing field 'answer'"),
        ('{"prompt": "", "answer": "2"}', "field 'prompt' must be a non-empty string"),
        ('{"prompt": "1+1=", "answer": "2", "split": "dev"}', "field 'split' must be one of"),
        ('{"prompt": "0+0=", "answer": "1"}', "already appears on line 1"),
    ],
)
def test_jsonl_malformed_line_names_file_and_line(tmp_path, capsys, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "0+0=", "answer": "0"}\n\n' + line + "\n")
    assert train(tmp_path / "run", "--task", f"jsonl:{path}") == 2
    err = capsys.readouterr().err.strip()
    assert f"{path}:3: " in err and re.search(match, err) and len(err.splitlines()) == 1


def test_ppo_minimal_example_runs(tmp_path):
    """examples/ppo_minimal.py, briefly: it trains and reports the test reward."""
    script = ROOT / "examples" / "ppo_minimal.py"
    args = ["--steps", "2", "--sft-steps", "5", "--batch-size", "16", "--minibatch-size", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, str(script), *args, "--eval-prompts", "16"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    before, after = re.findall(r"test reward (?:before|after) PPO: ([0-9.]+)", res.stdout)
    assert 0 <= float(before) <= 1 and 0 <= float(after) <= 1
    assert "step 2: reward" in res.stdout
