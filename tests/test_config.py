"""One loader for config files and dotted overrides (`rlhf_jax.config.load_config`): the command lines,
the scripts, the tests and configs that extend another all go through it."""

import os

import pytest

from rlhf_jax.config import ConfigError, load_config, set_key
from tests.common import ROOT

TINY = os.path.join(ROOT, "configs", "tiny.py")


def test_overrides_are_read_as_the_type_they_replace():
    config = load_config(TINY, ["rl.kl_coef=0.25", "train.num_iterations=3", "rl.adaptive_kl=true",
                                "lora.targets=('q_proj', 'v_proj')", "reward.function=tests.host_rewards:slow",
                                "model.builtin.family=llama"])
    assert config.rl.kl_coef == 0.25 and config.train.num_iterations == 3 and config.rl.adaptive_kl is True
    assert tuple(config.lora.targets) == ("q_proj", "v_proj")
    assert config.reward.function == "tests.host_rewards:slow" and config.model.builtin.family == "llama"
    assert load_config(TINY, {"rl.kl_coef": 0.5}).rl.kl_coef == 0.5  # values as they are


def test_a_config_that_extends_another_loads_through_it():
    config = load_config(os.path.join(ROOT, "configs", "llama3_8b_lora_ppo.py"))
    assert config.lora.enabled and config.model.builtin.hidden_size == 4096


@pytest.mark.parametrize("overrides,message", [
    (["rl.kl_coeff=0.1"], "no such config key config.rl.kl_coeff"),
    (["rl.kl_coef=lots"], "config.rl.kl_coef = 'lots': expected a float"),
    (["train.num_iterations=2.5"], "config.train.num_iterations = '2.5': expected an int"),
    (["rl.adaptive_kl=maybe"], "config.rl.adaptive_kl = 'maybe': expected a bool"),
    (["rl=1"], "config.rl is a section"),
    (["rl.kl_coef"], "override 'rl.kl_coef': expected key=value"),
    (["ppo.kl_coef=0.1"], "config.ppo.kl_coef: the section is now config.rl (config.rl.kl_coef)"),
])
def test_bad_overrides_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert message in str(e.value)


def test_bad_files_are_one_line_and_a_config_files_own_errors_keep_their_traceback(tmp_path):
    with pytest.raises(ConfigError, match="no_such.py: no such config file"):
        load_config(str(tmp_path / "no_such.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        load_config(str(tmp_path / "empty.py"))
    (tmp_path / "old.py").write_text("from rlhf_jax.config import base_config\n\ndef get_config():\n"
                                     "    c = base_config()\n    c.ppo.kl_coef = 0.1\n    return c\n")
    with pytest.raises(ConfigError, match=r"old.py: config.ppo is now config.rl"):
        load_config(str(tmp_path / "old.py"))
    (tmp_path / "buggy.py").write_text("def get_config():\n    return {}['missing']\n")
    with pytest.raises(KeyError):
        load_config(str(tmp_path / "buggy.py"))


def test_set_key_sets_nested_keys():
    config = load_config(TINY)
    set_key(config, "model.builtin.hidden_size", "64")
    assert config.model.builtin.hidden_size == 64
