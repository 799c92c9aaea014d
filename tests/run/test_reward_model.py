"""Reward-model training on the demo's preference pairs, HF interop, and PPO against it."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import load_pretrained
from rlhf_jax.run.reward_model import base_reward_config, pairwise_loss, train_reward_model
from rlhf_jax.tasks import reviews
from rlhf_jax.tasks.demo import demo_config, valid_fraction


def test_pairwise_loss_by_hand():
    loss, acc = pairwise_loss(jnp.array([2.0, 0.0]), jnp.array([0.0, 1.0]))
    expected = -(np.log(1 / (1 + np.exp(-2.0))) + np.log(1 / (1 + np.exp(1.0)))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(acc) == 0.5
    with_margin, _ = pairwise_loss(jnp.array([2.0]), jnp.array([0.0]), margin=1.0)
    assert float(with_margin) == pytest.approx(-np.log(1 / (1 + np.exp(-1.0))), rel=1e-6)


def test_preference_pairs_prefer_the_more_positive_review():
    for pair in reviews.preference_pairs(200, seed=3):
        chosen = reviews.sentiment(pair["prompt"] + " " + pair["chosen"])
        rejected = reviews.sentiment(pair["prompt"] + " " + pair["rejected"])
        assert chosen > rejected
        assert reviews.is_valid(pair["prompt"] + " " + pair["chosen"])


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory, demo_workdir):
    """The warmed-up demo model and a reward model trained from it (shared by the tests below)."""
    root = str(tmp_path_factory.mktemp("rm"))
    shutil.copytree(demo_workdir / "sft_model", os.path.join(root, "sft_model"))
    sft = os.path.join(root, "sft_model")
    config = base_reward_config()
    config.model.path = sft
    config.train.num_steps = 120
    config.train.eval_every = 60
    config.data.builtin_pairs = 1500
    config.logging.progress = False
    metrics = train_reward_model(config, os.path.join(root, "rm_run"))
    return root, sft, metrics


def test_reward_model_reaches_90_percent_held_out(demo_models):
    _, _, metrics = demo_models
    assert metrics["eval/accuracy"] >= 0.9, metrics


def test_exported_reward_model_matches_transformers(demo_models):
    torch = pytest.importorskip("torch")
    import transformers
    _, _, metrics = demo_models
    path = metrics["export_dir"]
    ours = load_pretrained(path, kind="scalar")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["the movie is great . <eos>", "i hated the film ! <eos>"]
    enc = tok(texts, padding=True, return_tensors="np", add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))).logits[:, 0].numpy()
    got = np.asarray(ours.sequence_scores(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert got[0] > got[1]  # it learned which review is more positive


def test_ppo_against_learned_reward_raises_it_and_the_lexicon(demo_models):
    from rlhf_jax.run.loop import train
    root, _, metrics = demo_models
    config = demo_config(root)
    config.reward.kind = "model"
    config.reward.model_path = metrics["export_dir"]
    config.reward.normalize = "reference"
    config.model.value_model = "separate"
    config.model.value_path = metrics["export_dir"]  # TRL's default: the value model starts as the reward model
    config.train.num_iterations = 20
    config.logging.progress = False
    config.checkpoint.every = 0

    def lexicon(prompts, responses, ended):
        return reviews.sentiment_reward(prompts, responses)

    _, _, history = train(config, os.path.join(root, "ppo_rm"),
                          extra_metrics={"task/lexicon": lexicon, "task/valid_frac": valid_fraction})
    first = lambda k: np.mean([m[k] for m in history[:3]])
    last = lambda k: np.mean([m[k] for m in history[-3:]])
    assert abs(first("objective/scores")) < 0.5  # normalised on the reference policy's samples
    assert last("objective/scores") > first("objective/scores") + 0.5
    assert last("task/lexicon") > first("task/lexicon") + 0.5
