"""Every option list the config accepts, in one place: the config's validation and the modules that
implement each option both read them from here, so neither imports the other to learn them."""

ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_pp")  # "ppo" has a critic; the rest are value-free
VALUE_FREE_ALGORITHMS = ALGORITHMS[1:]

FAMILIES = ("gpt2", "llama", "gemma3")  # model.builtin.family
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("float32", "bfloat16", "float16")
VALUE_MODELS = ("shared", "separate")
REMAT_MODES = ("none", "full", "dots")
ATTENTION_KERNELS = ("xla", "splash", "cudnn")

DECODE_LAYOUTS = ("auto", "batch", "tensor")
ENGINES = ("auto", "static", "continuous")  # sampling.engine

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token", "sequence", "constant")  # "constant" (Dr. GRPO) only without a critic
RATIO_LEVELS = ("token", "sequence")
SAMPLER_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
OLD_LOGPROBS = ("auto", "recompute", "sampler")
PREFERENCE_LOSSES = ("sigmoid", "ipo", "simpo", "orpo")  # dpo.loss: DPO (cDPO), IPO, SimPO, ORPO

REWARD_KINDS = ("function", "model")
REWARD_NORMALIZATIONS = ("none", "reference", "running")
TRUNCATIONS = ("left", "reject")
SCHEDULES = ("constant", "linear", "cosine")
ON_NONFINITE = ("stop", "skip")
