"""Typed configuration: one dataclass per config group, registered in Hydra's ConfigStore.

Every field carries a one-line docstring (the string literal under it); `rltune --help-config`
and the README's config reference are generated from the same place. The YAML files in `conf/`
only pick values: each starts with `defaults: [base_<group>, _self_]`, so a misspelt key
(`algo.betta=0.5`) fails when Hydra composes the config, before anything is loaded.

Batch semantics, stated once (the README repeats it):

    train.batch_size        examples per optimizer step, summed over all processes
    train.micro_batch_size  examples per forward/backward pass on one process
    grad_accum              = batch_size / (micro_batch_size * world_size), derived

`train.grad_accum`, when set, takes precedence: batch_size becomes
micro_batch_size * grad_accum * world_size. The resolved numbers are logged at start.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TrainConfig:
    max_steps: int = -1
    """Optimizer steps to run; -1 derives it from train.epochs and the dataset size."""
    epochs: float = 1.0
    """Passes over the training data when max_steps is -1."""
    lr: float | None = None
    """Peak learning rate; null uses model.lrs for this algorithm, else the algorithm's default."""
    batch_size: int = 16
    """Examples per optimizer step, summed over all processes."""
    micro_batch_size: int = 8
    """Examples per forward/backward pass on one process."""
    grad_accum: int | None = None
    """Micro-batches accumulated per step; null derives it from batch_size (README: batch semantics)."""
    warmup_ratio: float = 0.0
    """Fraction of max_steps spent ramping the learning rate up linearly from 0."""
    scheduler: str = "cosine"
    """Learning-rate schedule after warmup: cosine, linear or constant."""
    min_lr_ratio: float = 0.0
    """Final learning rate of cosine/linear decay, as a fraction of the peak."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    log_every: int = 10
    """Write metrics every N steps (the last step is always logged)."""
    eval_every: int = 0
    """Evaluate every N steps; 0 evaluates only at step 0 and at the end."""
    eval_samples: int = 200
    """Eval examples used for eval/accuracy and eval/loss; 0 runs no eval, and no eval data is read."""
    save_every: int = 0
    """Checkpoint every N steps; 0 saves only on interruption (final/ is always written)."""
    keep_checkpoints: int = 2
    """How many step-N checkpoints to keep; older ones are deleted after a new one is complete."""
    resume: str | None = None
    """null starts fresh; 'auto' continues from the newest complete checkpoint; or a path."""
    seed: int = 0
    """Seed for model init of new heads, data order, dropout and sampling."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 on a GPU that has it, else fp32), fp32 or bf16 (autocast, fp32 master weights)."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, or cuda:N."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (slower)."""
    disable_dropout: bool | None = None
    """Set every dropout of the trained models to 0 (LoRA's and attention's too): with dropout on, two passes over the same tokens disagree, so the ratio to old log-probs, the KL to the reference and DPO's margins are noisy. null: true for every algorithm but sft."""
    compile: bool = False
    """torch.compile each model's decoder stack for training (not with DeepSpeed; decoding runs it eager, see rollout.compile); the first input shape compiles, and a second one compiles again with its lengths left dynamic for every later one (30 steps of the tiny GRPO job: 2 compiles). Each model has dynamo's recompile budget to itself (torch 2.13)."""
    profile_step: int = 0
    """Run optimizer step N under torch.profiler (0: never): profile.txt in the run directory gets the operators (and CUDA kernels) by their own time, profile_trace.json a Chrome trace."""
    fail_at_step: int | None = None
    """Testing aid: end the process abruptly (os._exit) right after this step, saving nothing."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Display name of the preset."""
    path: str = "tiny"
    """Hub id or local folder; 'tiny' and 'tiny_init' are the models shipped in the package."""
    tokenizer_path: str | None = None
    """Tokenizer location when it differs from path."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    dtype: str = "auto"
    """Weights dtype: auto (fp32 for trained weights, the compute dtype for frozen LoRA bases), fp32, bf16, fp16."""
    attn_implementation: str | None = None
    """sdpa, eager or flash_attention_2; null lets transformers choose."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository."""
    lrs: dict[str, float] = field(default_factory=dict)
    """Learning rates tuned for this model by algorithm (sft, sft_lora, dpo, ...), used when train.lr is null."""


@dataclass
class PeftConfig:
    method: str = "none"
    """none (full fine-tuning), lora, or qlora (LoRA on a 4-bit base; CUDA and bitsandbytes)."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA alpha; the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: Any = "all-linear"
    """Modules that get adapters: 'all-linear', a list of module names (or name suffixes: q_proj, mlp.up_proj), or a regular expression over whole module names."""


@dataclass
class DataConfig:
    name: str = "arith"
    """Display name of the preset."""
    path: Any = None
    """A .jsonl/.json/.csv/.parquet/.txt/.md/.pdf/.docx file, a list of them, or a hub dataset id; null uses data.task."""
    subset: str | None = None
    """Subset (configuration) of data.path's hub dataset, as datasets.load_dataset's second argument (e.g. main for openai/gsm8k); a hub eval_path of another dataset has data.eval_subset."""
    split: str = "train"
    """Split of a hub dataset read for training."""
    eval_split: str | None = None
    """Split of a hub dataset read for eval (e.g. test): of data.eval_path, or of data.path when eval_path is null; null holds no split out (a hub eval_path then reads data.split)."""
    eval_subset: str | None = None
    """Subset of the hub dataset read for eval; null uses data.subset when that dataset is data.path's (eval_path null or the same), none for another dataset (its subsets are its own)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Columns renamed as rows are read, before the format is detected: {the data's name: rltune's}, e.g. {question: prompt}."""
    system_prompt: str | None = None
    """Online algorithms (grpo, ppo, rloo, reinforce, rs): a system turn put before each prompt, which is then rendered with the chat template (a string prompt becomes the user's turn; a message list that opens with a system turn keeps its own); reward.model_path's model scores that chat too, reward functions the prompt as in the data."""
    task: str | None = "arith"
    """Built-in task used when path is null (also provides eval/accuracy); null for none."""
    format: str = "auto"
    """auto (from the columns), text, instruction, prompt_completion, chat, sharegpt, preference or prompt_answer."""
    max_length: int = 512
    """Tokens per example; longer prompts/completions are truncated, raw text is chunked."""
    packing: bool = False
    """Pack several examples into one row of max_length tokens (SFT)."""
    eval_path: Any = None
    """Held-out data for eval/loss; null uses the task's eval split or data.eval_ratio."""
    eval_ratio: float = 0.0
    """Fraction of data.path held out for eval/loss (not with data.eval_path or data.eval_split)."""
    train_size: int = 5000
    """Examples generated from the built-in task for training."""
    max_new_tokens: int = 256
    """Most tokens generated per completion (RL rollouts and eval); the arith preset uses 16."""
    seed: int = 0
    """Seed of the built-in task generator."""


@dataclass
class DeepSpeedConfig:
    name: str = "none"
    """Display name of the preset: none, zero1, zero2, zero3, zero3_offload."""
    stage: int = 0
    """ZeRO stage 0-3 (0 and no deepspeed.config: plain PyTorch, no DeepSpeed)."""
    offload_optimizer: bool = False
    """Keep optimizer states on the CPU (ZeRO-Offload)."""
    offload_params: bool = False
    """Keep parameters on the CPU between uses (stage 3)."""
    param_persistence_threshold: int | None = None
    """Stage 3: parameters smaller than this stay whole on every rank; null keeps DeepSpeed's default."""
    config: str | None = None
    """A DeepSpeed JSON config of your own; batch sizes, accumulation, clipping and bf16 are filled from train.*."""


@dataclass
class LoggerConfig:
    backend: str = "none"
    """none or wandb (metrics.jsonl and the progress bar are always written)."""
    project: str = "rltune"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user)."""
    run_name: str | None = None
    """wandb run name; null uses the run directory's name, in a sweep the job's overrides."""
    group: str | None = None
    """wandb group; null groups a sweep's jobs under the sweep's directory name."""
    mode: str = "auto"
    """wandb mode: auto (WANDB_MODE or WANDB_DISABLED where set; else online with an API key, offline without), online, offline or disabled."""


@dataclass
class SFTConfig:
    name: str = "sft"
    """Algorithm name."""
    lr: float = 2e-5
    """Default learning rate (full fine-tuning); used when train.lr is null."""
    lora_lr: float = 2e-4
    """Default learning rate with peft=lora."""
    completion_only: bool = True
    """Loss on completion/assistant tokens only; raw text always gets the full loss."""
    fused_ce: bool = True
    """Take the loss from the last hidden states, the output layer applied to labelled positions only, a chunk at a time: the [tokens, vocabulary] logits never exist (same loss; falls back to logits where the output layer is not a plain Linear)."""


@dataclass
class DPOConfig:
    name: str = "dpo"
    """Algorithm name."""
    lr: float = 1e-6
    """Default learning rate (full fine-tuning); used when train.lr is null."""
    lora_lr: float = 5e-6
    """Default learning rate with peft=lora."""
    beta: float = 0.1
    """Strength of the KL regularisation toward the reference (IPO's tau for loss_type=ipo)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO), robust, ipo or hinge."""
    label_smoothing: float = 0.0
    """Assumed share of flipped labels: conservative DPO (sigmoid; TRL 1.16's sigmoid has no smoothing) or robust DPO (robust); ipo and hinge have none."""
    sft_weight: float = 0.0
    """Weight of an NLL term on the chosen responses (RPO): each one's NLL per token, averaged over pairs as the RPO paper does (TRL's loss_type sft averages over all chosen tokens of the batch); 0 disables it."""
    precompute_ref: bool = False
    """Compute reference log-probs once before training (cached in the run dir); no reference model in memory."""
    fused_logps: bool = True
    """Take the responses' log-probs from the last hidden states, the output layer applied a chunk of positions at a time (recomputed in backward): the [tokens, vocabulary] logits never exist (same numbers; falls back to logits where the output layer is not a plain Linear)."""
    share_prompt: bool = True
    """One row per pair: the prompt once, then the chosen and the rejected response, which do not see each other (a 4-D attention mask); false gives each side its own row."""

    def check(self) -> None:
        """Value checks run before anything is loaded; ConfigError names the key."""
        if not self.beta > 0:
            raise ConfigError(f"algo.beta={self.beta} must be > 0 (at 0 the loss has no gradient)")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"algo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ConfigError(
                f"algo.label_smoothing={self.label_smoothing} has no effect with "
                f"algo.loss_type={self.loss_type}: only sigmoid and robust use it"
            )
        if self.sft_weight < 0:
            raise ConfigError(f"algo.sft_weight={self.sft_weight} must be >= 0")


@dataclass
class RMConfig:
    name: str = "rm"
    """Algorithm name."""
    lr: float = 1e-5
    """Default learning rate (full fine-tuning); used when train.lr is null."""
    lora_lr: float = 1e-4
    """Default learning rate with peft=lora."""


@dataclass
class GRPOConfig:
    name: str = "grpo"
    """Algorithm name."""
    lr: float = 1e-6
    """Default learning rate (full fine-tuning); used when train.lr is null."""
    lora_lr: float = 1e-5
    """Default learning rate with peft=lora."""
    group_size: int = 8
    """Completions sampled per prompt; train.batch_size counts completions and must be a multiple."""
    estimator: str = "grpo"
    """Baseline subtracted from each reward: grpo (group mean), rloo (mean of the group's other samples), reinforce (running mean of past rewards)."""
    scale_rewards: str = "group"
    """Divide the centred rewards by the std of the group (group, grpo only), of the batch (batch; REINFORCE++: whitening subtracts the batch mean, so reinforce's running baseline cancels), or not (none: Dr. GRPO, RLOO)."""
    baseline_momentum: float = 0.9
    """reinforce: weight of the old running mean when a batch's mean reward is folded in (it matters with scale_rewards=none only)."""
    loss_agg: str = "token_mean"
    """token_mean (DAPO: over the step's completion tokens), seq_mean_token_mean (GRPO) or seq_mean_token_sum_norm (Dr. GRPO)."""
    epsilon: float = 0.2
    """Clip range below 1 of the importance ratio (and above, unless epsilon_high is set)."""
    epsilon_high: float | None = None
    """Clip range above 1 (DAPO's clip-higher, e.g. 0.28); null uses epsilon."""
    kl_coef: float = 0.0
    """Weight of the k3 KL to the reference in the loss; 0 builds no reference model."""
    importance_level: str = "token"
    """token (one ratio per token) or sequence (GSPO: one length-normalised ratio per completion; the paper pairs it with loss_agg=seq_mean_token_mean and epsilon 3e-4 / epsilon_high 4e-4)."""
    filter_zero_std: bool = False
    """Drop groups whose rewards are all equal before the update (DAPO's filter, without its resampling: the step trains on fewer groups)."""
    num_iterations: int = 1
    """Optimizer steps per rollout batch (mu); above 1 the rollout's log-probs are stored as old log-probs."""
    mask_truncated: bool = False
    """Leave completions that hit data.max_new_tokens out of the loss."""
    logprob_chunk_size: int = 1024
    """Positions whose fp32 log-softmax is computed at once (bounds memory for large vocabularies)."""
    fused_logps: bool = True
    """Take log-probs and entropies from the last hidden states, the output layer applied a chunk of positions at a time (recomputed in backward): the [tokens, vocabulary] logits never exist (same numbers; falls back to logits where the output layer is not a plain Linear)."""
    share_prompt: bool = True
    """Train on a row per group, [prompt | completion 1 | ... ], so each prompt is computed once, not group_size times (same log-probs; sdpa/eager attention, micro_batch_size a multiple of group_size; else a row per completion)."""
    sample_every: int = 50
    """Write a few prompts, completions and rewards to samples.jsonl every N steps; 0 never."""

    def check(self) -> None:
        """Value checks run before anything is loaded; ConfigError names the key."""
        if self.group_size < (1 if self.estimator == "reinforce" else 2):
            raise ConfigError(
                f"algo.group_size={self.group_size} must be >= 2: algo.estimator={self.estimator} "
                "compares the samples of a prompt"
            )
        if self.scale_rewards == "group" and self.estimator != "grpo":
            raise ConfigError(
                f"algo.scale_rewards=group needs algo.estimator=grpo; use batch or none with "
                f"{self.estimator}"
            )
        if self.filter_zero_std and self.group_size < 2:
            raise ConfigError("algo.filter_zero_std=true needs algo.group_size >= 2")
        if not 0.0 <= self.baseline_momentum < 1.0:
            raise ConfigError(f"algo.baseline_momentum={self.baseline_momentum} must be in [0, 1)")
        if self.num_iterations < 1:
            raise ConfigError(f"algo.num_iterations={self.num_iterations} must be >= 1")
        if not self.epsilon > 0 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise ConfigError("algo.epsilon and algo.epsilon_high must be > 0")
        if self.kl_coef < 0:
            raise ConfigError(f"algo.kl_coef={self.kl_coef} must be >= 0")
        if self.logprob_chunk_size < 1:
            raise ConfigError(f"algo.logprob_chunk_size={self.logprob_chunk_size} must be >= 1")


@dataclass
class PPOConfig:
    name: str = "ppo"
    """Algorithm name."""
    lr: float = 1e-6
    """Default learning rate of the policy (full fine-tuning); used when train.lr is null."""
    lora_lr: float = 1e-5
    """Default learning rate of the policy with peft=lora."""
    critic_lr: float | None = None
    """Learning rate of the value model; null uses the policy's."""
    critic_init: str = "auto"
    """Value model's starting weights: reward (reward.model_path), policy (model.path with a new head), or auto (reward when reward.model_path is set)."""
    group_size: int = 1
    """Completions sampled per prompt."""
    num_minibatches: int = 1
    """Minibatches (optimizer steps) per epoch over a rollout; a rollout holds train.batch_size x num_minibatches completions."""
    ppo_epochs: int = 4
    """Passes over each rollout, reshuffled into minibatches each time."""
    epsilon: float = 0.2
    """Clip range of the policy's importance ratio."""
    cliprange_value: float = 0.2
    """Clip range of the value update around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    gamma: float = 1.0
    """Discount per token in GAE."""
    lam: float = 0.95
    """GAE's lambda (bias-variance trade-off of the advantages)."""
    kl_coef: float = 0.05
    """Per-token KL penalty to the reference in the reward; 0 builds no reference model."""
    adaptive_kl: bool = False
    """Adapt kl_coef toward target_kl (Ziegler et al.'s proportional controller)."""
    target_kl: float = 6.0
    """adaptive_kl: the KL per completion (summed over its tokens) the controller steers toward."""
    kl_horizon: int = 10000
    """adaptive_kl: completions over which the controller closes the gap."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over each rollout's completion tokens."""
    whiten_rewards: bool = False
    """Scale the per-token rewards (KL penalty and score) to std 1 over each rollout's completion tokens before GAE, their mean kept (TRL's whiten_rewards)."""
    max_approx_kl: float | None = None
    """Stop a rollout's remaining minibatches once a step's approximate KL to the rollout policy exceeds this; null never."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus in the loss (entropy is always logged)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a completion cut at data.max_new_tokens, without EOS or a stop string (TRL's missing_eos_penalty); null none."""
    reward_clip: float | None = None
    """Clip each completion's score to [-reward_clip, reward_clip] before the KL penalty is added (OpenRLHF's reward_clip_range); missing_eos_penalty is subtracted after the clip; null no clip."""
    logprob_chunk_size: int = 1024
    """Positions whose fp32 log-softmax is computed at once."""
    fused_logps: bool = True
    """Take log-probs and entropies from the last hidden states, the output layer applied a chunk of positions at a time (recomputed in backward): the [tokens, vocabulary] logits never exist (same numbers; falls back to logits where the output layer is not a plain Linear)."""
    sample_every: int = 50
    """Write a few prompts, completions and rewards to samples.jsonl every N steps; 0 never."""

    def check(self) -> None:
        """Value checks run before anything is loaded; ConfigError names the key."""
        if self.missing_eos_penalty is not None and not (
            math.isfinite(self.missing_eos_penalty) and self.missing_eos_penalty >= 0
        ):
            raise ConfigError(
                f"algo.missing_eos_penalty={self.missing_eos_penalty} must be a number >= 0 "
                "(or null)"
            )
        positive = {
            "algo.group_size": self.group_size,
            "algo.num_minibatches": self.num_minibatches,
            "algo.ppo_epochs": self.ppo_epochs,
            "algo.kl_horizon": self.kl_horizon,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}={value} must be >= 1")
        if self.kl_coef < 0 or not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError("algo.kl_coef must be >= 0 and algo.gamma, algo.lam in [0, 1]")
        if self.adaptive_kl and self.kl_coef == 0:
            raise ConfigError("algo.adaptive_kl=true needs algo.kl_coef > 0 to adapt")
        if self.adaptive_kl and not self.target_kl > 0:
            raise ConfigError(f"algo.target_kl={self.target_kl} must be > 0")
        if not self.epsilon > 0 or not self.cliprange_value > 0 or self.vf_coef < 0:
            raise ConfigError(
                f"algo.epsilon={self.epsilon} and algo.cliprange_value={self.cliprange_value} "
                f"must be > 0, algo.vf_coef={self.vf_coef} >= 0"
            )
        for key in ("critic_lr", "max_approx_kl", "reward_clip"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"algo.{key}={value} must be > 0 (or null)")


@dataclass
class RSConfig:
    name: str = "rs"
    """Algorithm name."""
    lr: float = 2e-5
    """Default learning rate (full fine-tuning); used when train.lr is null."""
    lora_lr: float = 2e-4
    """Default learning rate with peft=lora."""
    group_size: int = 8
    """Completions sampled per prompt; the best one is kept."""
    threshold: float = 0.5
    """Keep a prompt's best completion only when its reward is at least this."""
    prompts_per_round: int = 256
    """Prompts sampled in one round; the accepted completions feed the next SFT steps."""
    fused_logps: bool = True
    """Take log-probs and entropies from the last hidden states, the output layer applied a chunk of positions at a time (recomputed in backward): the [tokens, vocabulary] logits never exist (same numbers; falls back to logits where the output layer is not a plain Linear)."""
    sample_every: int = 50
    """Write a few prompts, completions and rewards to samples.jsonl every N steps; 0 never."""

    def check(self) -> None:
        """Value checks run before anything is loaded; ConfigError names the key."""
        if self.group_size < 1 or self.prompts_per_round < 1:
            raise ConfigError("algo.group_size and algo.prompts_per_round must be >= 1")


@dataclass
class RolloutConfig:
    engine: str = "auto"
    """fast (rltune's decode loop: prompt prefilled once per group, CUDA graphs on GPU, early exit), hf (transformers generate, the reference), or auto (fast); evaluation's greedy completions use it too."""
    temperature: float = 1.0
    """Sampling temperature; log-probs for the loss are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability; 1 disables."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p x the top token's probability; 0 disables."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion (kept in it), besides the EOS token."""
    batch_size: int = 256
    """Completions generated per call, in rollouts and in evaluation (bounds the KV cache's memory)."""
    cuda_graphs: bool = True
    """engine=fast on CUDA: a static KV cache and the decode step replayed from a CUDA graph (reads the policy's weights where they are in the compute dtype, as with model.dtype=bf16, else a copy in that dtype); false runs eager steps."""
    compile: bool = False
    """engine=fast: the static-cache decode step compiled by torch.compile (before its CUDA graph is captured), fusing its norms, rotary embeddings and activations, and the sampling from its logits compiled too (inductor's own random stream); compiles once per decoder (a new one per wider prompt width step or other row count; tens of seconds on a GPU), each with its own recompile budget. Also on CPU, where it uses the static cache uncaptured."""


@dataclass
class RewardConfig:
    funcs: list[str] = field(default_factory=lambda: ["arith"])
    """Reward functions: built-ins (arith, math_answer, format, length) or module:function / file.py:function."""
    weights: list[float] | None = None
    """One weight per function (reward.funcs, then the reward model); null weighs all 1."""
    model_path: str | None = None
    """A sequence-classification reward model (e.g. an algo=rm final/), scored as reward_model."""
    model_batch_size: int = 32
    """Completions the reward model scores per forward pass."""
    timeout_s: float = 10.0
    """Seconds a reward call may take; a failing or slow sample gets no reward (and counts as an error)."""
    format_pattern: str = "^<think>.*?</think>.+$"
    """Regex the format function searches for (DOTALL)."""
    overlong_ratio: float = 0.25
    """length function: the last ratio x data.max_new_tokens tokens are penalised linearly, to -1 at the limit."""


@dataclass
class RLTuneConfig:
    algo: Any = MISSING
    """The algorithm and its hyperparameters (config group)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model (config group)."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """Parameter-efficient fine-tuning (config group)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data (config group)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Experiment logging (config group)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward functions and reward model of the online algorithms (config group)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of completions in the online algorithms."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed ZeRO (config group)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The trainer loop."""


ALGO_CONFIGS: dict[str, type] = {
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "rm": RMConfig,
    "grpo": GRPOConfig,
    "ppo": PPOConfig,
    "rs": RSConfig,
}
"""Algorithm name -> its config dataclass. Each algorithm registers here."""

GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "peft": PeftConfig,
    "data": DataConfig,
    "logger": LoggerConfig,
    "reward": RewardConfig,
    "deepspeed": DeepSpeedConfig,
}


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore: `base_<x>` nodes the YAML presets extend."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RLTuneConfig)
    for name, cls in ALGO_CONFIGS.items():
        cs.store(group="algo", name=f"base_{name}", node=cls)
    for group, cls in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=cls)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


@dataclass(frozen=True)
class BatchPlan:
    """The resolved batch arithmetic (see rltune/config.py for the semantics)."""

    batch_size: int
    micro_batch_size: int
    grad_accum: int
    world_size: int

    @classmethod
    def from_config(cls, t: TrainConfig, world_size: int) -> BatchPlan:
        if t.micro_batch_size < 1:
            raise ConfigError(f"train.micro_batch_size={t.micro_batch_size} must be >= 1")
        per_pass = t.micro_batch_size * world_size
        if t.grad_accum is not None:
            if t.grad_accum < 1:
                raise ConfigError(f"train.grad_accum={t.grad_accum} must be >= 1")
            return cls(per_pass * t.grad_accum, t.micro_batch_size, t.grad_accum, world_size)
        if t.batch_size < 1 or t.batch_size % per_pass:
            raise ConfigError(
                f"train.batch_size={t.batch_size} must be a positive multiple of "
                f"train.micro_batch_size ({t.micro_batch_size}) x processes ({world_size}) = {per_pass}"
            )
        return cls(t.batch_size, t.micro_batch_size, t.batch_size // per_pass, world_size)

    def describe(self) -> str:
        return (
            f"{self.batch_size} examples per optimizer step = {self.micro_batch_size} per micro-batch"
            f" x {self.grad_accum} accumulated x {self.world_size} process(es)"
        )


def check_groups(plan: BatchPlan, group_size: int, *, explicit_accum: bool) -> None:
    """train.batch_size counts completions, and each process's share of a step (micro-batch x
    accumulation) must hold whole groups of algo.group_size; ConfigError with a batch size
    that satisfies both this and the micro-batch arithmetic."""
    per_process = plan.micro_batch_size * plan.grad_accum
    if group_size < 1 or per_process % group_size == 0:
        return  # group_size < 1 is the algorithm's own check
    unit = plan.world_size * math.lcm(group_size, plan.micro_batch_size)
    hint = f"train.batch_size={unit * max(1, round(plan.batch_size / unit))}"
    if explicit_accum:
        accum = group_size // math.gcd(group_size, plan.micro_batch_size)
        hint = f"train.grad_accum={accum * max(1, round(plan.grad_accum / accum))}"
    raise ConfigError(
        f"train.batch_size={plan.batch_size} counts completions: each process's share "
        f"({per_process} = micro_batch_size {plan.micro_batch_size} x grad_accum "
        f"{plan.grad_accum}) must hold whole groups of algo.group_size={group_size}; "
        f"e.g. {hint}"
    )


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[stmt.target.id] = str(nxt.value.value)
    return docs


CHOICES: dict[str, tuple[str, ...]] = {
    "train.scheduler": ("cosine", "linear", "constant"),
    "train.dtype": ("auto", "fp32", "bf16"),
    "model.dtype": ("auto", "fp32", "bf16", "fp16"),
    "peft.method": ("none", "lora", "qlora"),
    "data.format": (
        "auto",
        "text",
        "instruction",
        "prompt_completion",
        "chat",
        "sharegpt",
        "preference",
        "prompt_answer",
    ),
    "logger.backend": ("none", "wandb"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
    "algo.loss_type": ("sigmoid", "robust", "ipo", "hinge"),
    "algo.scale_rewards": ("group", "batch", "none"),
    "algo.estimator": ("grpo", "rloo", "reinforce"),
    "algo.critic_init": ("auto", "reward", "policy"),
    "algo.loss_agg": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"),
    "algo.importance_level": ("token", "sequence"),
    "rollout.engine": ("auto", "fast", "hf"),
}
"""Keys whose value must be one of a fixed set, checked before anything is loaded."""


ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
"""The common attention implementations; others are checked against transformers' registry
(which also takes hub kernels named org/name)."""


def check_algorithm(algo: Any) -> None:
    """algo.name must name an algorithm whose config class is the one composed (algo=sft
    algo.name=dpo would run DPO on SFT's settings)."""
    configs = {**ALGO_CONFIGS, "rloo": GRPOConfig, "reinforce": GRPOConfig}  # GRPO's variants
    expected = configs.get(algo.name)
    if expected is None:
        raise ConfigError(
            f"algo.name={algo.name!r} is not one of: {', '.join(configs)} "
            "(choose the algorithm with algo=NAME)"
        )
    if not isinstance(algo, expected):
        raise ConfigError(
            f"algo.name={algo.name!r} does not match the composed algo group "
            f"({type(algo).__name__}); choose the algorithm with algo={algo.name}"
        )


def validate(cfg: RLTuneConfig) -> None:
    """Value checks that the schema's types cannot express. Raises ConfigError naming the key."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if not hasattr(getattr(cfg, section), name):
            continue  # e.g. algo.loss_type exists only for some algorithms
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")
    t = cfg.train
    positive = {
        "train.micro_batch_size": t.micro_batch_size,
        "train.batch_size": t.batch_size,
        "train.log_every": t.log_every,
        "data.max_length": cfg.data.max_length,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"train.max_steps={t.max_steps} must be -1 (use train.epochs) or >= 1")
    if t.profile_step < 0 or (t.max_steps > 0 and t.profile_step > t.max_steps):
        raise ConfigError(
            f"train.profile_step={t.profile_step} must be 0 (off) or a step from 1 to "
            f"train.max_steps={t.max_steps}"
        )
    if t.max_steps == -1 and t.epochs <= 0:
        raise ConfigError(f"train.epochs={t.epochs} must be > 0 when train.max_steps is -1")
    for key in ("eval_every", "save_every", "keep_checkpoints", "eval_samples"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 0")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    for key, value in (("adam_beta1", t.adam_beta1), ("adam_beta2", t.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"train.{key}={value} must be in [0, 1)")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if not t.adam_eps > 0:
        raise ConfigError(f"train.adam_eps={t.adam_eps} must be > 0")
    if t.weight_decay < 0:
        raise ConfigError(f"train.weight_decay={t.weight_decay} must be >= 0")
    if t.max_grad_norm < 0:
        raise ConfigError(f"train.max_grad_norm={t.max_grad_norm} must be >= 0 (0: no clipping)")
    if t.device != "auto":
        import torch

        try:
            torch.device(t.device)
        except RuntimeError:
            raise ConfigError(
                f"train.device={t.device!r} is not a device: auto, cpu, cuda, cuda:N, mps, ..."
            ) from None
    check_algorithm(cfg.algo)
    # the batch arithmetic too, so that a sweep's pre-check finds a bad combination in any job
    plan = BatchPlan.from_config(t, int(os.environ.get("WORLD_SIZE", "1")))
    # the online algorithms' batches count completions in whole groups; rejection sampling's
    # count the accepted examples, one per prompt
    group_size = getattr(cfg.algo, "group_size", None)
    if group_size is not None and not isinstance(cfg.algo, RSConfig):
        check_groups(plan, group_size, explicit_accum=t.grad_accum is not None)
    if cfg.model.dtype == "fp16" and cfg.peft.method == "none" and cfg.algo.name != "rm":
        raise ConfigError(
            "model.dtype=fp16 with peft=none would train fp16 weights in place, with no fp32 "
            "master copy or loss scaling: updates underflow and the model breaks. Use "
            "model.dtype=auto (fp32 master weights, bf16 compute on GPUs) or bf16, or keep an "
            "fp16 base frozen under peft=lora"
        )
    attn = cfg.model.attn_implementation
    if attn is not None and attn not in ATTENTION and "/" not in attn:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        known = ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]
        if attn not in known:
            raise ConfigError(
                f"model.attn_implementation={attn!r} is not one of: {', '.join(known)} "
                "(or a hub kernel, org/name)"
            )
    if cfg.peft.method != "none":
        p = cfg.peft
        if p.r < 1 or not p.alpha > 0 or not 0.0 <= p.dropout < 1.0:
            raise ConfigError(
                f"peft.r={p.r} must be >= 1, peft.alpha={p.alpha} > 0 and "
                f"peft.dropout={p.dropout} in [0, 1)"
            )
        from rltune.lora import lora_targets

        lora_targets(p.target_modules)  # its form now; the names once the model has loaded
    if t.lr is not None and t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr} must be > 0 (or null for the algorithm's default)")
    if cfg.data.path is None and cfg.data.task is None:
        raise ConfigError("data.path must be set: data.task is null, so there is no built-in data")
    if cfg.data.path is None and cfg.data.train_size < 1:
        raise ConfigError(f"data.train_size={cfg.data.train_size} must be >= 1")
    if not 0.0 <= cfg.data.eval_ratio < 1.0:
        raise ConfigError(f"data.eval_ratio={cfg.data.eval_ratio} must be in [0, 1)")
    if cfg.data.eval_ratio > 0 and cfg.data.eval_split is not None:
        raise ConfigError(
            f"data.eval_ratio={cfg.data.eval_ratio} and data.eval_split="
            f"{cfg.data.eval_split!r} both choose the eval rows: set one of them"
        )
    if cfg.data.eval_ratio > 0 and cfg.data.eval_path is not None:
        raise ConfigError(
            f"data.eval_ratio={cfg.data.eval_ratio} and data.eval_path="
            f"{cfg.data.eval_path!r} both choose the eval rows: set one of them"
        )
    if cfg.data.path is None and cfg.data.eval_path is not None:
        raise ConfigError(
            f"data.eval_path={cfg.data.eval_path!r} is eval data for data.path, but data.path is "
            f"null (the built-in task {cfg.data.task!r} is used, with its own eval split): set "
            "data.path too, or leave data.eval_path out"
        )
    hub_choices = [  # data.split's default, train, chooses nothing
        f"data.{k}"
        for k, chosen in (
            ("subset", cfg.data.subset is not None),
            ("split", cfg.data.split != "train"),
            ("eval_split", cfg.data.eval_split is not None),
            ("eval_subset", cfg.data.eval_subset is not None),
        )
        if chosen
    ]
    if cfg.data.path is None and hub_choices:
        raise ConfigError(
            f"{' and '.join(hub_choices)} {'choose' if len(hub_choices) > 1 else 'chooses'} "
            f"from a hub dataset, but data.path is null (the built-in task {cfg.data.task!r} is "
            "used): set data.path to a hub dataset id"
        )
    no_hub_eval = cfg.data.eval_path is None and cfg.data.eval_split is None
    if cfg.data.eval_subset is not None and no_hub_eval:  # eval_ratio's rows or none
        raise ConfigError(
            f"data.eval_subset={cfg.data.eval_subset!r} picks the subset of the eval rows read "
            "from the hub, but none are (data.eval_path and data.eval_split are null): set "
            "data.eval_split to a split of data.path, or data.eval_path to a hub dataset id"
        )
    targets = list(cfg.data.columns.values())
    if len(set(targets)) < len(targets):
        raise ConfigError(f"data.columns={dict(cfg.data.columns)} renames two columns to one name")
    if cfg.data.path is None and cfg.data.columns:
        raise ConfigError(
            f"data.columns={dict(cfg.data.columns)} renames the columns of data.path's rows, but "
            f"data.path is null (the built-in task {cfg.data.task!r} is used, with its own columns)"
        )
    if cfg.data.system_prompt is not None and not hasattr(cfg.algo, "group_size"):
        raise ConfigError(
            f"data.system_prompt is for the prompts of online algorithms (grpo, ppo, rloo, "
            f"reinforce, rs), not algo={cfg.algo.name}: put system turns in the data instead"
        )
    if cfg.data.max_new_tokens < 1:
        raise ConfigError(f"data.max_new_tokens={cfg.data.max_new_tokens} must be >= 1")
    r = cfg.rollout
    if not r.temperature > 0:
        raise ConfigError(f"rollout.temperature={r.temperature} must be > 0")
    if not 0.0 < r.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p={r.top_p} must be in (0, 1]")
    if r.top_k < 0 or not 0.0 <= r.min_p < 1.0 or r.batch_size < 1:
        raise ConfigError(
            "rollout.top_k must be >= 0, rollout.min_p in [0, 1), rollout.batch_size >= 1"
        )
    if r.compile and (r.engine == "hf" or not r.cuda_graphs):
        raise ConfigError(
            f"rollout.compile=true compiles the static-cache decode step, which "
            f"rollout.engine={r.engine} rollout.cuda_graphs={r.cuda_graphs} does not run: "
            "set rollout.engine=fast (or auto) and rollout.cuda_graphs=true"
        )
    if not cfg.model.path:
        raise ConfigError(
            f"model.path must be set: model={cfg.model.name} model.path=<hub id or local folder>"
        )
    from rltune.models import check_model_folder

    check_model_folder(cfg.model.path, "model.path")
    if cfg.peft.method == "qlora":
        from rltune.models import check_qlora

        check_qlora(cfg.train.device)
    if not 0 <= cfg.deepspeed.stage <= 3:
        raise ConfigError(f"deepspeed.stage={cfg.deepspeed.stage} must be 0, 1, 2 or 3")
    if cfg.deepspeed.config is not None:
        from pathlib import Path

        if not Path(cfg.deepspeed.config).expanduser().is_file():
            raise ConfigError(f"deepspeed.config={cfg.deepspeed.config}: no such file")
    if t.compile and (cfg.deepspeed.stage > 0 or cfg.deepspeed.config is not None):
        raise ConfigError(
            f"train.compile=true does not combine with deepspeed={cfg.deepspeed.name}: "
            "use deepspeed=none or train.compile=false"
        )
    if cfg.deepspeed.offload_params and cfg.deepspeed.stage != 3:
        raise ConfigError("deepspeed.offload_params=true needs deepspeed.stage=3")
    check = getattr(cfg.algo, "check", None)
    if check is not None:
        check()
