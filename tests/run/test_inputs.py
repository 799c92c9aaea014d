"""Hostile but fixable input: each class is one ConfigError (or CheckpointError) that names the key,
file and line, raised before anything compiles; errors in a user's own code keep their traceback."""

import json
import os
import subprocess
import sys

import pytest
from flax import nnx

from rlhf_jax.config import ConfigError, base_config, validate
from rlhf_jax.models import CausalLM, load_pretrained, save_pretrained
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.hf import CheckpointError
from rlhf_jax.run.data import read_prompts
from rlhf_jax.run.loading import check_folders, load_callable
from rlhf_jax.run.metrics import MetricWriter
from tests.common import ROOT


@pytest.mark.parametrize("key,value,message", [
    ("seed", -1, "config.seed = -1: must be >= 0"),
    ("rl.kl_coef", float("nan"), "config.rl.kl_coef = nan: must be a finite number"),
    ("sampling.temperature", float("nan"), "config.sampling.temperature = nan"),
    ("optim.learning_rate", float("inf"), "config.optim.learning_rate = inf: must be a finite number"),
    ("checkpoint.max_to_keep", 0, "config.checkpoint.max_to_keep = 0: must be > 0"),
    ("model.builtin.qk_norm", True, "config.model.builtin.qk_norm = True needs config.model.builtin.family = 'llama'"),
    ("model.builtin.family", "qwen3", "config.model.builtin.family = 'qwen3'"),
    ("model.builtin.sliding_window", 512, "config.model.builtin.sliding_window = 512 needs config.model.builtin.family = 'gemma3'"),
    ("model.builtin.head_dim", -8, "config.model.builtin.head_dim = -8: must be >= 0"),
])
def test_config_values(key, value, message):
    config = base_config()
    section, _, leaf = key.rpartition(".")
    (config[section] if section else config)[leaf] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(config)


@pytest.mark.parametrize("content,message", [
    (b"", "no prompts in it"),
    (b'{"prompt": "a"}\n{"prompt": "b"\n', ":2: not valid JSON"),
    (b'{"prompt": "a"}\n\xff\xfe\x00binary\n', ":2: not UTF-8 text"),
    (b'{"prompt": "a"}\n[1, 2]\n', ":2: a JSON list, not an object"),
    (b'{"prompt": "a"}\n{"prompt": null}\n', ":2: 'prompt' is null, not a string"),
    (b'{"text": "a"}\n', ":1: no field 'prompt'"),
    (b'{"prompt": [{"role": "user"}]}\n', ":1: 'prompt' is [{\"role\": \"user\"}], not a string or a list of"),
])
def test_prompt_files(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        read_prompts(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_conversation_prompts_need_the_chat_template(tmp_path):
    from rlhf_jax.run.loading import load_prompts
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "the question"}]
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"prompt": conversation}) + "\n" + json.dumps({"prompt": "plain"}) + "\n")
    assert read_prompts(str(path)) == [conversation, "plain"]
    config = base_config()
    config.data.path = str(path)
    with pytest.raises(ConfigError, match="are conversations .*set config.data.chat_template = True"):
        load_prompts(config, tokenizer=None)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    cfg = ModelConfig(family="llama", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=8, intermediate_size=32, max_position_embeddings=16)
    path = str(tmp_path_factory.mktemp("model") / "good")
    save_pretrained(CausalLM(cfg, rngs=nnx.Rngs(0)), path, hf_config={"pad_token_id": 0, "eos_token_id": 1})
    return path


def _copy(src, dst, change=None):
    import shutil
    shutil.copytree(src, dst)
    if change:
        change(dst)
    return str(dst)


def _set(field, value):
    def change(folder):
        hf = json.load(open(os.path.join(folder, "config.json")))
        hf[field] = value
        json.dump(hf, open(os.path.join(folder, "config.json"), "w"))
    return change


@pytest.mark.parametrize("name,change,error,message", [
    ("missing", None, ConfigError, "no such folder (a local folder; nothing is downloaded from a hub)"),
    ("no_config", lambda d: os.remove(os.path.join(d, "config.json")), FileNotFoundError, "no config.json in"),
    ("bad_json", lambda d: open(os.path.join(d, "config.json"), "w").write("{oops"), CheckpointError,
     "config.json: not valid JSON"),
    ("mamba", _set("model_type", "mamba"), CheckpointError, "unsupported architecture: model_type='mamba'"),
    ("no_weights", lambda d: os.remove(os.path.join(d, "model.safetensors")), ConfigError, "no model.safetensors"),
])
def test_model_folders_are_checked_before_loading(tmp_path, model_folder, name, change, error, message):
    path = str(tmp_path / name) if name == "missing" else _copy(model_folder, tmp_path / name, change)
    config = base_config()
    config.model.path = path
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_folders(config)


def test_damaged_weights_name_the_file(tmp_path, model_folder):
    def truncate(folder):
        weights = os.path.join(folder, "model.safetensors")
        data = open(weights, "rb").read()
        open(weights, "wb").write(data[: len(data) // 2])
    path = _copy(model_folder, tmp_path / "torn", truncate)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_pretrained(path)
    path = _copy(model_folder, tmp_path / "wide", _set("hidden_size", 32))
    with pytest.raises(CheckpointError, match="misshapen tensor"):
        load_pretrained(path)


def test_reward_callables(tmp_path, monkeypatch):
    (tmp_path / "not_callable.py").write_text("reward = 3\n")
    (tmp_path / "broken_import.py").write_text("import no_such_dependency_xyz\n\ndef reward(p, r):\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="no module named 'no_such_module_xyz'"):
        load_callable("no_such_module_xyz:reward")
    with pytest.raises(ConfigError, match="has no 'nope'"):
        load_callable("rlhf_jax.tasks.reviews:nope")
    with pytest.raises(ConfigError, match="'reward' is a int, not a function"):
        load_callable("not_callable:reward")
    # The user's module exists but its own import fails: theirs to see, with the traceback.
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        load_callable("broken_import:reward")


def test_resumed_logs_hold_each_step_once(tmp_path):
    rows = [{"step": s, "objective/kl": 0.1 * s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "obj')
    (tmp_path / "samples.jsonl").write_text(json.dumps({"step": 3, "prompt": "p"}) + "\n")
    writer = MetricWriter(str(tmp_path), tensorboard=False, resumed_at=2)
    writer.write(3, {"objective/kl": 0.5})
    writer.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (tmp_path / "samples.jsonl").read_text() == ""


def _cli(args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    return subprocess.run([sys.executable, "-m", "rlhf_jax.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_command_line_one_line_errors_and_user_tracebacks(tmp_path):
    result = _cli(["--config=configs/no_such_config.py", f"--workdir={tmp_path / 'a'}"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no_such_config.py" in result.stderr.strip().splitlines()[-1]
    result = _cli(["--config=configs/tiny.py", "--workdir=/proc/no/such/dir"], tmp_path)
    assert result.returncode == 2 and "--workdir=/proc/no/such/dir: cannot create it" in result.stderr
    # An AttributeError in the user's reward is theirs: exit 1 with its traceback, not "bad config override".
    (tmp_path / "user_reward.py").write_text("def reward(prompts, responses):\n    return [p.nope for p in prompts]\n")
    result = _cli(["--config=configs/tiny.py", f"--workdir={tmp_path / 'b'}", "--config.train.num_iterations=1",
                   "--config.logging.progress=False", "--config.reward.function=user_reward:reward"], tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" in result.stderr and "user_reward.py" in result.stderr and "override" not in result.stderr


def test_peer_benchmark_without_its_environments_says_how_to_build_them(tmp_path):
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "peers", "run_peers.sh"), "small", "grpo"],
                            env=dict(os.environ, BENCH_VENVS=str(tmp_path)), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"no trl venv in {tmp_path}: run 'bash {ROOT}/benchmarks/peers/setup_peers.sh' first"]
