"""Composition: every preset and recipe composes into the typed schema; bad keys and values
fail before anything loads, naming the key."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from rltune.cli import check_schema, conf_dir
from rltune.config import (
    ALGO_CONFIGS,
    GROUPS,
    ConfigError,
    RLTuneConfig,
    TrainConfig,
    field_docs,
    register_configs,
)

CONF = conf_dir()
RECIPES = sorted(p.stem for p in (CONF.parent / "recipes").glob("*.yaml"))


def _compose(overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=overrides)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group", ["algo", "model", "peft", "data", "reward", "deepspeed", "logger"]
)
def test_every_preset_composes(group):
    options = _options(group)
    assert options
    for option in options:
        overrides = [f"{group}={option}"]
        if (group, option) == ("data", "custom"):
            overrides.append("data.path=x.jsonl")
        if (group, option) == ("model", "custom"):
            overrides.append("model.path=org/some-model")
        if (group, option) == ("peft", "qlora") and not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="needs a CUDA GPU"):
                check_schema(_compose(overrides))
            continue
        settings = check_schema(_compose(overrides))
        assert isinstance(settings, RLTuneConfig)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes(recipe):
    settings = check_schema(_compose([f"+recipe={recipe}"]))
    assert isinstance(settings, RLTuneConfig)


def test_recipe_overrides_groups_and_values():
    settings = check_schema(_compose(["+recipe=sft_tiny_arith"]))
    assert settings.model.path == "tiny_init"
    assert settings.train.max_steps == 1600 and settings.train.scheduler == "constant"


def test_plus_key_is_rejected_with_suggestion():
    with pytest.raises(ConfigError, match=r"'train.max_stepz'.*Did you mean 'train.max_steps'"):
        check_schema(_compose(["+train.max_stepz=3"]))


def test_plus_key_in_algo_names_it():
    with pytest.raises(ConfigError, match=r"Unknown config key 'algo.lrr'"):
        check_schema(_compose(["+algo.lrr=1"]))


def test_plus_top_level_key_is_rejected():
    with pytest.raises(ConfigError, match=r"Unknown config key 'foo'"):
        check_schema(_compose(["+foo=1"]))


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.scheduler=cosin", "train.scheduler"),
        ("train.dtype=float32", "train.dtype"),
        ("peft.method=dora", "peft.method"),
        ("data.format=tsv", "data.format"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio"),
        ("rollout.compile=true,rollout.engine=hf", "rollout.compile"),
        ("rollout.compile=true,rollout.cuda_graphs=false", "rollout.compile"),
        ("train.adam_beta1=1.5", "train.adam_beta1"),
        ("train.adam_eps=0", "train.adam_eps"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("train.max_grad_norm=-1", "train.max_grad_norm"),
        ("train.min_lr_ratio=2", "train.min_lr_ratio"),
        ("train.device=gpu", "train.device"),
        ("model.attn_implementation=flash", "model.attn_implementation"),
        ("model.dtype=fp16", "model.dtype=fp16 with peft=none"),
        ("peft=lora,peft.r=0", "peft.r"),
        ("peft=lora,peft.dropout=1.5", "peft.dropout"),
        ("algo.name=foo", "algo.name='foo' is not one of"),
        ("algo=sft,algo.name=dpo", "does not match the composed algo group"),
        ("algo=dpo,algo.beta=0", "algo.beta"),
        ("algo=dpo,algo.label_smoothing=0.5", "algo.label_smoothing"),
        ("algo=dpo,algo.loss_type=ipo,algo.label_smoothing=0.1", "only sigmoid, robust and simpo"),
        ("algo=dpo,algo.loss_type=orpo,algo.label_smoothing=0.1", "only sigmoid, robust and sim"),
        ("algo=dpo,algo.sft_weight=-1", "algo.sft_weight"),
        ("algo=dpo,algo.loss_type=simpod", "algo.loss_type='simpod' is not one of"),
        ("algo=dpo,algo.loss_type=simpo,algo.precompute_ref=true", "algo.precompute_ref=true has"),
        (
            "algo=dpo,algo.loss_type=orpo,algo.precompute_ref=true",
            "no effect with algo.loss_type=o",
        ),
        (
            "algo=dpo,algo.simpo_gamma=1.0",
            "algo.simpo_gamma=1.0 has no effect with algo.loss_type=s",
        ),
        ("algo=dpo,algo.loss_type=simpo,algo.simpo_gamma=-1", "algo.simpo_gamma=-1"),
        ("algo=dpo,algo.loss_type=orpo,algo.sft_weight=0.5", "algo.sft_weight=0.5 with algo.loss"),
        ("algo=ppo,algo.vf_coef=-1", "algo.vf_coef"),
        ("algo=ppo,algo.adaptive_kl=true,algo.target_kl=0", "algo.target_kl"),
        ("algo=ppo,algo.max_approx_kl=0", "algo.max_approx_kl"),
        ("algo=ppo,algo.reward_clip=-1", "algo.reward_clip"),
        ("data.train_size=0", "data.train_size"),
        ("data.path=x.jsonl,data.eval_ratio=0.1,data.eval_split=test", "both choose the eval"),
        ("data.path=x.jsonl,data.eval_ratio=0.1,data.eval_path=y.jsonl", "data.eval_path='y.j"),
        ("data.eval_path=y.jsonl", "data.eval_path='y.jsonl' is eval data for data.path, but"),
        ("data.subset=main", "data.subset chooses from a hub dataset, but data.path is null"),
        ("data.split=test,data.eval_split=dev", "data.split and data.eval_split choose from a"),
        ("data.eval_subset=en", "data.eval_subset chooses from a hub dataset, but data.path is"),
        (
            "data.path=org/a,data.eval_subset=en",
            "data.eval_subset='en' picks the subset of the eva",
        ),
        ("+data.columns.question=prompt", "renames the columns of data.path's rows, but data.pat"),
        ("+data.columns.q=prompt,+data.columns.p=prompt", "renames two columns to one name"),
        ("algo=sft,data.system_prompt=Think", "data.system_prompt is for the prompts of online"),
        # nan passes every range check (nan < 0 is false); inf passes the lower bounds
        ("train.lr=nan", "train.lr=nan must be a finite number"),
        ("train.lr=inf", "train.lr=inf must be a finite number"),
        ("algo=sft,train.epochs=nan", "train.epochs=nan must be a finite number"),
        ("train.weight_decay=nan", "train.weight_decay=nan must be a finite number"),
        ("train.max_grad_norm=inf", "train.max_grad_norm=inf must be a finite number"),
        ("rollout.temperature=inf", "rollout.temperature=inf must be a finite number"),
        ("algo.kl_coef=nan", "algo.kl_coef=nan must be a finite number"),
        ("algo=rs,algo.threshold=nan", "algo.threshold=nan must be a finite number"),
        ("reward.timeout_s=inf", "reward.timeout_s=inf must be a finite number"),
        ("++model.lrs.grpo=nan", "model.lrs.grpo=nan must be a finite number"),
        ("algo=dpo,data.packing=true", "data.packing=true packs SFT examples; algo=dpo does"),
        ("data.packing=true", "data.packing=true packs SFT examples; algo=grpo does not"),
        ("train.seed=-1", "train.seed=-1 must be in"),
        ("train.seed=4294967296", "train.seed=4294967296 must be in"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_schema(_compose(override.split(",")))


def test_an_empty_stop_string_is_named():
    """An empty string is found at once in any text: every completion would end at once."""
    with pytest.raises(ConfigError) as err:
        check_schema(_compose(["rollout.stop=['</a>','']"]))
    assert str(err.value).startswith("rollout.stop=['</a>', ''] holds an empty string")


@pytest.mark.parametrize(
    "overrides",
    [
        "algo.loss_type=simpo,algo.beta=2.5,algo.simpo_gamma=1.25,algo.label_smoothing=0.1",
        "algo.loss_type=simpo,algo.sft_weight=1",
        "algo.loss_type=orpo,peft=lora",
    ],
)
def test_reference_free_settings_that_apply_are_accepted(overrides):
    settings = check_schema(_compose(["algo=dpo", *overrides.split(",")]))
    assert settings.algo.loss_type in ("simpo", "orpo")


def test_every_field_has_a_docstring():
    for cls in [TrainConfig, *GROUPS.values(), *ALGO_CONFIGS.values()]:
        docs = field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if f not in docs]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_model_path_resolution(tmp_path):
    from rltune.models import resolve_path

    assert resolve_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"  # a hub id
    assert resolve_path(str(tmp_path)) == str(tmp_path)
    assert resolve_path("tiny").endswith("assets/tiny")
    with pytest.raises(ConfigError, match=r"model.path=/no/such/dir: no such folder"):
        resolve_path("/no/such/dir")


def test_a_local_folder_without_a_model_is_named_before_loading(tmp_path):
    from rltune import rewards
    from rltune.config import ModelConfig, RewardConfig
    from rltune.models import SHIPPED, load_tokenizer

    with pytest.raises(ConfigError, match=r"model.path=.*: no config.json there"):
        check_schema(_compose([f"model.path={tmp_path}"]))
    # with the config's checks, before the memory check reads the models' configs
    with pytest.raises(ConfigError, match=r"reward.model_path=.*: no config.json there"):
        check_schema(_compose(["algo=grpo", f"reward.model_path={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"reward.model_path=.*a Qwen2ForCausalLM, not a reward"):
        rewards.resolve(RewardConfig(model_path=str(SHIPPED["tiny"])), max_new_tokens=8)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"reward.model_path=.*config.json is not a JSON object"):
        rewards.resolve(RewardConfig(model_path=str(tmp_path)), max_new_tokens=8)
    with pytest.raises(ConfigError, match=r"model.tokenizer_path=/no/such: no such folder"):
        load_tokenizer(ModelConfig(tokenizer_path="/no/such"))


def test_a_model_path_that_cannot_load_is_named_before_loading(tmp_path):
    """A file for a folder, a broken config.json and a model type transformers does not know
    stop the run at the check, naming the setting, not with a tokenizer error or a traceback
    from from_pretrained after the data loaded."""
    import json

    from rltune.models import SHIPPED

    file = tmp_path / "model.safetensors"
    file.write_text("x")
    with pytest.raises(ConfigError, match=rf"model.path={file}: a file, not a model folder"):
        check_schema(_compose([f"model.path={file}"]))
    folder = tmp_path / "m"
    folder.mkdir()
    for text, message in [
        ('{"model_type": "qwen2",', r"config.json is not a JSON object \(Expecting"),
        ("[1]", r"config.json is not a JSON object \(a list\)"),
        ('{"model_type": "qwen9"}', r"config.json's model_type 'qwen9' is not one transformers"),
        ('{"hidden_size": 8}', r"config.json has no model_type"),
    ]:
        (folder / "config.json").write_text(text)
        with pytest.raises(ConfigError, match=rf"model.path={folder}: {message}"):
            check_schema(_compose([f"model.path={folder}"]))
    # a model with code of its own, and the shipped one, pass
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen9", "auto_map": {}}))
    check_schema(_compose([f"model.path={folder}"]))
    check_schema(_compose([f"model.path={SHIPPED['tiny']}"]))


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["train.max_stepz=3"],
            "Unknown config key 'train.max_stepz'. Did you mean 'train.max_steps'?",
        ),
        (["algo=dpo", "algo.bta=1"], "Unknown config key 'algo.bta'. Did you mean 'algo.beta'?"),
        (["rollout.temprature=1"], "Did you mean 'rollout.temperature'?"),
    ],
)
def test_override_typos_are_caught_before_hydra(args, message):
    from rltune.cli import check_override_keys

    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("?", r"\?")):
        check_override_keys(args)
    # valid keys, groups, hydra's own and +additions pass through
    check_override_keys(["algo=dpo", "algo.beta=0.2", "model.lrs.sft=1e-5", "hydra.run.dir=x"])


@pytest.mark.parametrize(
    "override",
    [
        "model.attn_implementation=flash_attention_4",  # in transformers' registry
        "model.attn_implementation=kernels-community/flash-attn",  # a hub kernel
        "train.device=cuda:1",
        "train.max_grad_norm=0",  # no clipping
        "train.min_lr_ratio=1",
    ],
)
def test_valid_values_on_the_edges_pass(override):
    check_schema(_compose([override]))


def test_another_model_under_a_tuned_preset_is_named(tmp_path):
    """`model.path=X` keeps the default preset, tiny, whose learning rates and tuned settings
    are for the tiny model: the start log says so and names model=custom; the same folder
    spelled another way, or model=custom, is no mismatch."""
    import shutil

    from rltune.models import SHIPPED
    from rltune.trainer import preset_mismatch

    other = tmp_path / "other"
    shutil.copytree(SHIPPED["tiny"], other)
    warning = preset_mismatch(check_schema(_compose([f"model.path={other}"])))
    assert warning is not None
    assert f"model.path={other} is not model=tiny's own model (tiny)" in warning
    assert "model.lrs.grpo=0.0001 and conf/tuned/grpo_tiny.yaml" in warning
    assert f"use model=custom model.path={other}" in warning
    warning = preset_mismatch(check_schema(_compose(["model.path=tiny_init", "train.lr=1e-3"])))
    assert warning.endswith(
        "apply: conf/tuned/grpo_tiny.yaml. For another model, use model=tiny_init"
    )
    for same in ([], [f"model.path={SHIPPED['tiny']}/"], ["model=custom", f"model.path={other}"]):
        assert preset_mismatch(check_schema(_compose(same))) is None, same
    with pytest.raises(ConfigError, match="model.path must be set: model=custom model.path="):
        check_schema(_compose(["model=custom"]))


def test_rejection_sampling_batches_count_examples_not_groups():
    settings = check_schema(_compose(["algo=rs", "train.batch_size=4", "train.micro_batch_size=4"]))
    assert settings.algo.group_size == 8  # sampled per prompt; a step trains on 4 accepted


@pytest.mark.parametrize(
    "args",
    [
        ["logger.run_name=${hydra:job.name}", "train.max_steps=1"],
        ["hydra.mode=MULTIRUN", "train.seed=1,2"],
        ["hydra.searchpath=[file:///no/such/dir]", "model=not_here_but_maybe_there"],
    ],
)
def test_what_only_hydras_run_can_compose_is_left_to_it(args):
    """${hydra:...} needs Hydra's runtime, hydra.mode and hydra.searchpath change what Hydra
    composes: the pre-check stands aside instead of refusing valid commands."""
    from rltune.cli import check_jobs

    check_jobs(args)


@pytest.mark.parametrize(
    "value, message",
    [
        ("[]", "peft.target_modules=[] must be all-linear, a list of module names"),
        ("[1]", "peft.target_modules: 1 is not a module name"),
        ("'a('", "peft.target_modules='a(' is not a regular expression"),
    ],
)
def test_lora_target_modules_of_the_wrong_form_fail_before_loading(value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        check_schema(_compose(["peft=lora", f"peft.target_modules={value}"]))


def test_lora_target_modules_are_checked_against_the_models_layers():
    """Each name must match a layer LoRA can adapt: a typo next to a good name would otherwise
    train the good one alone, silently. A plain string is one name, not peft's whole-name
    regular expression (which `q_proj` never matches)."""
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from rltune.config import PeftConfig
    from rltune.lora import apply_lora
    from rltune.models import SHIPPED

    def lora(target):
        model = AutoModelForCausalLM.from_pretrained(SHIPPED["tiny"])
        return apply_lora(model, PeftConfig(method="lora", target_modules=target))

    for target in (["q_prj", "v_proj"], "q_prj"):
        with pytest.raises(ConfigError) as err:
            lora(target)
        assert str(err.value) == (
            "peft.target_modules: 'q_prj' matches no module of Qwen2ForCausalLM; its linear "
            "layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or all-linear)"
        )  # not lm_head: the tiny model ties it to the embedding (below)
    with pytest.raises(ConfigError, match=r"'mlp' matches model.layers.0.mlp, a Qwen2MLP, which"):
        lora(["mlp"])
    for target in ("q_proj", ["self_attn.q_proj"], r".*\.q_proj"):
        adapted = {k.split(".")[-3] for k in get_peft_model_state_dict(lora(target))}
        assert adapted == {"q_proj"}, (target, adapted)


def test_lora_on_a_tied_output_layer_or_embedding_is_refused_and_untied_merges_exactly():
    """The tiny model ties lm_head to embed_tokens (one matrix): an adapter on either, merged
    into final/, would change the other as well, so neither may be targeted. Untied, an adapter
    on lm_head merges into a model that computes what base + adapter does."""
    from transformers import AutoModelForCausalLM

    from rltune.config import PeftConfig
    from rltune.lora import apply_lora
    from rltune.models import SHIPPED

    tied = AutoModelForCausalLM.from_pretrained(SHIPPED["tiny"])
    for target, hit, partner in (
        (["lm_head", "q_proj"], "lm_head", "model.embed_tokens"),
        (["embed_tokens"], "model.embed_tokens", "lm_head"),
        ("lm_.*", "lm_head", "model.embed_tokens"),
    ):
        with pytest.raises(ConfigError) as err:
            apply_lora(tied, PeftConfig(method="lora", target_modules=target))
        assert str(err.value).startswith(
            f"peft.target_modules: {target[0] if isinstance(target, list) else target!r} puts an "
            f"adapter on {hit}, whose weight Qwen2ForCausalLM shares with {partner} "
            "(tie_word_embeddings)"
        ), str(err.value)
    assert not hasattr(tied, "peft_config")  # refused before peft touched the model

    untied = AutoModelForCausalLM.from_pretrained(SHIPPED["tiny"], tie_word_embeddings=False)
    model = apply_lora(untied, PeftConfig(method="lora", target_modules=["lm_head", "q_proj"]))
    model.eval()  # no LoRA dropout
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        ids = torch.arange(5, 45)[None]
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_a_tokenizer_without_eos_is_named_before_the_model_loads(tmp_path):
    """Without EOS (and so without the pad token that falls back to it) nothing can end an
    example or pad a batch: online algorithms crashed in the rollout's padding."""
    import json
    import shutil

    from rltune.config import ModelConfig
    from rltune.models import SHIPPED, load_tokenizer

    for name in ("tokenizer.json", "chat_template.jinja", "config.json"):
        shutil.copy(SHIPPED["tiny"] / name, tmp_path / name)
    settings = json.loads((SHIPPED["tiny"] / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({**settings, "eos_token": None, "pad_token": None})
    )
    for cfg, key in (
        (ModelConfig(path=str(tmp_path)), "model.path"),
        (ModelConfig(tokenizer_path=str(tmp_path)), "model.tokenizer_path"),
    ):
        with pytest.raises(ConfigError) as err:
            load_tokenizer(cfg)
        assert str(err.value).startswith(f"{key}={tmp_path}: the tokenizer has no eos_token;")
    assert load_tokenizer(ModelConfig()).pad_token == "<|endoftext|>"


def test_tuned_settings_apply_by_themselves_and_tilde_tuned_leaves_them_out():
    from rltune.config import TrainConfig

    assert _compose([]).train.batch_size == 256  # conf/tuned/grpo_tiny.yaml
    assert _compose(["~tuned"]).train.batch_size == TrainConfig.batch_size
    assert TrainConfig.batch_size != 256
