"""The step: the train state, the training forward, and the update of every algorithm as one
configurable skeleton (`make_update`)."""
