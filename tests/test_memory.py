"""The memory preflight: parameter counts from a config alone, the holdings of each pipeline
checked against the models the algorithms really build, and a run that cannot fit stopped
before any weights load."""

import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2Config

from rltune.algos import BuildContext, build_algorithm
from rltune.cli import check_schema, conf_dir
from rltune.config import BatchPlan, ConfigError, register_configs
from rltune.memory import GIB, Layout, check_memory, model_states, parameter_count
from rltune.models import SHIPPED

CPU = torch.device("cpu")
PLAIN = Layout()  # one process, no DeepSpeed


def _cfg(overrides):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return check_schema(compose(config_name="config", overrides=overrides))


def _states(cfg, compute=torch.float32, device=CPU, layout=PLAIN):
    held = model_states(cfg, compute_dtype=compute, device=device, layout=layout)
    return {(h.role, h.what): h.nbytes for h in held}


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A reward model of the tiny model's tokenizer (a new score head on its weights)."""
    folder = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(SHIPPED["tiny"], num_labels=1)
    model.save_pretrained(folder)
    for f in SHIPPED["tiny"].iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, folder)
    return folder


def test_parameter_counts_come_from_the_config_and_equal_the_loaded_models():
    cfg = _cfg([])
    causal = AutoModelForCausalLM.from_pretrained(SHIPPED["tiny"])
    scalar = AutoModelForSequenceClassification.from_pretrained(SHIPPED["tiny"], num_labels=1)
    assert parameter_count("tiny", cfg.model) == sum(p.numel() for p in causal.parameters())
    assert parameter_count("tiny", cfg.model, scalar_head=True) == sum(
        p.numel() for p in scalar.parameters()
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["algo=sft"],
        ["algo=dpo"],
        ["algo=dpo", "algo.loss_type=simpo"],
        ["algo=dpo", "model.dtype=bf16"],
        ["algo=grpo"],  # kl_coef 0: no reference
        ["algo=grpo", "algo.kl_coef=0.04"],
        ["algo=grpo", "algo.kl_coef=0.04", "peft=lora"],
        ["algo=ppo"],
        ["algo=ppo", "reward.funcs=[]", "reward.model_path=RM"],
        ["algo=ppo", "model.dtype=bf16"],
        ["algo=rs"],
        ["algo=rm", "data=custom", "data.path=PREFS"],
        ["algo=rm", "data=custom", "data.path=PREFS", "model.dtype=bf16"],
    ],
    ids=lambda o: " ".join(o),
)
def test_the_counted_weights_are_those_of_the_models_the_algorithm_builds(
    overrides, reward_model, tmp_path
):
    """Every weight the built pipeline holds, by role, is counted at its dtype: a change to
    what an algorithm loads that the preflight does not follow fails here. Gradients and
    moments follow from the trained weights; LoRA's adapters (a floor leaves them out) are the
    only parameters not counted."""
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n' * 4)
    overrides = [o.replace("RM", str(reward_model)).replace("PREFS", str(prefs)) for o in overrides]
    cfg = _cfg([*overrides, "train.eval_samples=0"])
    algo = build_algorithm(
        BuildContext(
            cfg=cfg,
            device=CPU,
            dtype=torch.float32,
            run_dir=tmp_path,
            plan=BatchPlan.from_config(cfg.train, 1),
        )
    )
    built: dict[str, int] = {}
    seen: set[int] = set()
    for role, model in algo.models().items():
        for p in model.parameters():
            if id(p) in seen or (cfg.peft.method != "none" and p.requires_grad):
                continue
            seen.add(id(p))
            role = {"reward_model": "reward model", "value": "value model"}.get(role, role)
            role = "reward model" if cfg.algo.name == "rm" else role
            built[role] = built.get(role, 0) + p.numel() * p.element_size()
    states = _states(cfg)
    counted: dict[str, int] = {}
    for (role, what), nbytes in states.items():
        if what.startswith(("weights", "frozen")):
            counted[role] = counted.get(role, 0) + nbytes
    assert counted == built
    for role in {r for r, _ in states}:  # trained: gradients and both moments at its dtype
        weights = states.get((role, "weights fp32")) or states.get((role, "weights bf16"))
        if weights is not None:
            grads = [n for (r, w), n in states.items() if r == role and w.startswith("gradients")]
            moments = [n for (r, w), n in states.items() if r == role and w.startswith("AdamW")]
            assert grads == [weights] and moments == [2 * weights]


def test_the_decoding_replica_counts_on_cuda_with_fp32_weights_only():
    """The CUDA-graph decoder reads a compute-dtype copy of fp32 master weights; bf16 weights
    are read in place, and a CPU run decodes without it."""
    cuda = torch.device("cuda")
    replica = ("policy", "decoding replica bf16")
    n = parameter_count("tiny", _cfg([]).model)
    assert _states(_cfg(["algo=grpo"]), torch.bfloat16, cuda)[replica] == 2 * n
    assert replica not in _states(_cfg(["algo=grpo", "model.dtype=bf16"]), torch.bfloat16, cuda)
    assert replica not in _states(
        _cfg(["algo=grpo", "rollout.cuda_graphs=false"]), torch.bfloat16, cuda
    )
    assert replica not in _states(_cfg(["algo=grpo"]), torch.bfloat16, CPU)
    assert replica not in _states(_cfg(["algo=sft"]), torch.bfloat16, cuda)


def _qwen7b_folder(folder, layers=28):
    """Qwen2.5-7B's architecture as a config alone (no weights)."""
    Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=layers,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ).save_pretrained(folder)
    return folder


def test_a_run_that_cannot_fit_is_stopped_with_the_figures_and_the_settings_that_need_less(
    tmp_path, monkeypatch
):
    cfg = _cfg(["algo=grpo", "algo.kl_coef=0.04", f"model.path={_qwen7b_folder(tmp_path)}"])
    params = 7_615_616_512  # Qwen2.5-7B, its output layer untied
    assert parameter_count(cfg.model.path, cfg.model) == params
    monkeypatch.setattr("rltune.memory.free_memory", lambda device: 79 * GIB)
    with pytest.raises(ConfigError) as err:
        check_memory(cfg, compute_dtype=torch.bfloat16, device=torch.device("cuda"))
    message = str(err.value)
    # fp32 weights, gradients and two moments (16 bytes each), a frozen fp32 reference (4) and
    # the decoder's bf16 replica (2): 22 bytes a parameter
    assert f"alone need {22 * params / GIB:.1f} GiB" in message, message
    assert "cuda has 79.0 GiB free" in message
    # bf16 weights: 2 + 2 + 4 + 2 (reference), read in place by the decoder: 10 bytes
    assert (
        f"model.dtype=bf16 (weights, gradients and moments in bf16: {10 * params / GIB:.1f} GiB, below the free memory)"
        in message
    )
    # LoRA: the base frozen in bf16, no reference, no replica: 2 bytes
    assert (
        f"peft=lora (the base frozen, no reference copy: {2 * params / GIB:.1f} GiB, below the free memory)"
        in message
    )
    assert "train.memory_check=false" in message
    fitting = _cfg(["algo=grpo", "peft=lora", f"model.path={tmp_path}"])
    check_memory(fitting, compute_dtype=torch.bfloat16, device=torch.device("cuda"))


def test_the_command_line_stops_before_loading_and_memory_check_false_goes_on(tmp_path, cli):
    """A config folder holds no weights: a run stopped by the check never reaches them, one
    with the check off fails at loading them. 300 layers of 7B's width, ~70B parameters (1.1 TB
    of states), exceed any machine the tests run on."""
    folder = _qwen7b_folder(tmp_path / "q70b", layers=300)
    for f in SHIPPED["tiny"].iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, folder)
    common = ["algo=sft", f"model.path={folder}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = cli(*common, "train.device=cpu", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "rltune: error: model.path=" in proc.stderr and "optimizer states alone need" in proc.stderr
    )
    assert "memory: model states" in (tmp_path / "run" / "cli.log").read_text()  # logged first
    proc = cli(*common, "train.memory_check=false", timeout=120)
    assert proc.returncode != 0 and "optimizer states alone need" not in proc.stderr


def test_deepspeed_layouts_come_from_its_config_and_partition_by_stage():
    from rltune.distributed import deepspeed_config

    def layout(overrides, world=8):
        cfg = _cfg(overrides)
        return Layout.of(deepspeed_config(cfg, grad_accum=1, dtype=torch.bfloat16), world)

    assert layout(["deepspeed=zero2"]) == Layout(stage=2, world=8, bf16=True)
    assert layout(["deepspeed=zero3_offload"]) == Layout(
        stage=3, world=8, bf16=True, offload_optimizer=True, offload_params=True
    )
    assert Layout.of(None, 1) == Layout()

    cfg = _cfg(["algo=grpo", "algo.kl_coef=0.04"])
    p = parameter_count("tiny", cfg.model)
    cuda = torch.device("cuda")
    opt = ("policy", "optimizer fp32 (master weights, AdamW moments)")

    def states(stage, **offload):
        return _states(cfg, torch.bfloat16, cuda, Layout(stage, 8, True, **offload))

    # bf16 weights and gradients, an fp32 master copy and two moments (12 bytes) partitioned
    # from stage 1, gradients from stage 2, everything at stage 3; the frozen reference in
    # bf16, partitioned at stage 3; no decoding replica (the module is bf16 already)
    assert states(1) == {
        ("policy", "weights bf16"): 2 * p,
        ("policy", "gradients bf16"): 2 * p,
        opt: 12 * p // 8,
        ("reference", "frozen bf16"): 2 * p,
    }
    assert states(2)[("policy", "gradients bf16")] == 2 * p // 8
    assert states(3) == {
        ("policy", "weights bf16"): 2 * p // 8,
        ("policy", "gradients bf16"): 2 * p // 8,
        opt: 12 * p // 8,
        ("reference", "frozen bf16"): 2 * p // 8,
    }
    # offloaded: the optimizer's partition (with stage 2-3's gradients) and the parameters
    assert states(3, offload_optimizer=True, offload_params=True) == {
        ("reference", "frozen bf16"): 2 * p // 8
    }
    assert states(2, offload_optimizer=True) == {
        ("policy", "weights bf16"): 2 * p,
        ("reference", "frozen bf16"): 2 * p,
    }
    # DeepSpeed in fp32: an fp32 module and gradients; the optimizer holds the two moments
    fp32 = _states(cfg, torch.float32, CPU, Layout(2, 8, False))
    assert fp32[("policy", "optimizer fp32 (AdamW moments)")] == 8 * p // 8


def test_under_deepspeed_the_check_counts_one_process_share_and_names_stages(tmp_path, cli):
    """One process under ZeRO-2 (no launcher needed) with a config of ~70B parameters: stopped
    before anything loads, its share counted per process, with ZeRO-3 and offload offered."""
    folder = _qwen7b_folder(tmp_path / "q70b", layers=300)
    for f in SHIPPED["tiny"].iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, folder)
    proc = cli(
        "algo=sft",
        "deepspeed=zero2",
        "train.device=cpu",
        f"model.path={folder}",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "per process (ZeRO-2, 1 process)" in proc.stderr
    assert "deepspeed=zero3 (parameters partitioned too, over the 1 processes" in proc.stderr
    # on a CPU, offloading to CPU memory frees nothing: not offered
    assert "deepspeed=zero3_offload" not in proc.stderr


def test_offloading_is_offered_on_a_gpu(tmp_path, monkeypatch):
    cfg = _cfg(["algo=sft", f"model.path={_qwen7b_folder(tmp_path)}"])
    monkeypatch.setattr("rltune.memory.free_memory", lambda device: 20 * GIB)
    with pytest.raises(ConfigError) as err:
        layout = Layout(stage=2, world=8, bf16=True)
        check_memory(cfg, compute_dtype=torch.bfloat16, device=torch.device("cuda"), layout=layout)
    p = 7_615_616_512
    message = str(err.value)
    assert (
        f"need {(2 * p + 14 * p // 8) / GIB:.1f} GiB per process (ZeRO-2, 8 processes)" in message
    )
    # ZeRO-3 partitions the weights too; with both offloads no state stays on the GPU
    assert (
        f"deepspeed=zero3 (parameters partitioned too, over the 8 processes: {16 * p / 8 / GIB:.1f} GiB, below the free memory)"
        in message
    )
    offload = "deepspeed=zero3_offload (optimizer states and parameters in CPU memory: 0.0 MiB"
    assert offload in message
