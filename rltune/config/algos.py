"""One dataclass per algorithm (the `algo` config group): its hyperparameters, each with a
one-line docstring, and `check()`, the value checks run before anything is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rltune.config.groups import ConfigError


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
    """Strength of the KL regularisation toward the reference (IPO's tau for loss_type=ipo); simpo: the reward scale (the SimPO paper uses 2.0-2.5); orpo: the odds-ratio term's weight lambda (0.1 as in TRL)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO), robust, ipo or hinge; simpo or orpo train without a reference model."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (loss_type=simpo), as TRL's and LLaMA-Factory's simpo_gamma; the paper pairs beta 2.0-2.5 with gamma about beta / 2."""
    label_smoothing: float = 0.0
    """Assumed share of flipped labels: conservative DPO (sigmoid; TRL 1.16's sigmoid has no smoothing), robust DPO (robust) or smoothed SimPO (simpo, as TRL's CPO); ipo, hinge and orpo have none."""
    sft_weight: float = 0.0
    """Weight of an NLL term on the chosen responses (RPO): each one's NLL per token, averaged over pairs as the RPO paper does (TRL's loss_type sft averages over all chosen tokens of the batch); 0 disables it. Not with orpo, whose loss has this term at weight 1."""
    precompute_ref: bool = False
    """Compute reference log-probs once before training (cached in the run dir); no reference model in memory. Not with simpo or orpo, which use no reference."""
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
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust", "simpo"):
            raise ConfigError(
                f"algo.label_smoothing={self.label_smoothing} has no effect with "
                f"algo.loss_type={self.loss_type}: only sigmoid, robust and simpo use it"
            )
        if self.sft_weight < 0:
            raise ConfigError(f"algo.sft_weight={self.sft_weight} must be >= 0")
        if not (math.isfinite(self.simpo_gamma) and self.simpo_gamma >= 0):
            raise ConfigError(
                f"algo.simpo_gamma={self.simpo_gamma} must be >= 0 (a target reward margin)"
            )
        # a setting left at its default cannot be told from one not given: only other values
        # are refused
        if self.simpo_gamma != DPOConfig.simpo_gamma and self.loss_type != "simpo":
            raise ConfigError(
                f"algo.simpo_gamma={self.simpo_gamma} has no effect with "
                f"algo.loss_type={self.loss_type}: only simpo uses it"
            )
        if self.loss_type in ("simpo", "orpo") and self.precompute_ref:
            raise ConfigError(
                f"algo.precompute_ref=true has no effect with algo.loss_type={self.loss_type}, "
                "which uses no reference model: leave algo.precompute_ref out"
            )
        if self.loss_type == "orpo" and self.sft_weight:
            raise ConfigError(
                f"algo.sft_weight={self.sft_weight} with algo.loss_type=orpo would add a second "
                "NLL term on the chosen responses: ORPO's loss has one at weight 1 (algo.beta "
                "weighs its odds-ratio term against it)"
            )


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


ALGO_CONFIGS: dict[str, type] = {
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "rm": RMConfig,
    "grpo": GRPOConfig,
    "ppo": PPOConfig,
    "rs": RSConfig,
}
"""Algorithm name -> its config dataclass. Each algorithm registers here."""
