"""The RL math: KL estimators, advantages and baselines, the losses, the minibatch loop. Pure
functions over arrays; nothing here reads a config or knows a model."""
