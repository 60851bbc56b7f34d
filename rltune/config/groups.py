"""The run-wide config groups (train, model, peft, data, deepspeed, logger, rollout, reward),
ConfigError, and the batch arithmetic that train.batch_size and train.micro_batch_size define."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


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
    """How many step-N checkpoints to keep (0: all); older ones are deleted after a new one is complete."""
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
    memory_check: bool = True
    """Before any weights load: count the models' weights, gradients, optimizer states and frozen copies from their configs (under DeepSpeed, each process's share), log the sum, and stop with the settings that need less when it alone exceeds the device's free memory (the GPU's, or the host's MemAvailable)."""
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
    """Weights dtype: auto (fp32 for trained weights, the compute dtype for frozen LoRA bases), fp32, bf16 (trained weights too, reward and value models included), or fp16 (a policy's frozen LoRA base only)."""
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


@dataclass(frozen=True)
class BatchPlan:
    """The resolved batch arithmetic (see rltune/config/__init__.py for the semantics)."""

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
