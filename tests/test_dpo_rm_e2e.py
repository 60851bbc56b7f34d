"""DPO and reward-model training end to end on the shipped tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from rltune.cli import run
from rltune.logging import read_metrics

pytestmark = pytest.mark.slow

STEP0 = [
    "algo=dpo",
    "train.max_steps=1",
    "train.log_every=1",
    "train.eval_samples=16",
    "train.batch_size=8",
    "train.micro_batch_size=8",
]


def _train_rows(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_dpo_learns_the_preferences(tmp_path):
    run_dir = run(
        ["algo=dpo", f"hydra.run.dir={tmp_path}", "train.log_every=1", "train.eval_samples=100"]
    )
    rows = _train_rows(run_dir)
    tail = rows[-max(1, len(rows) // 10) :]
    assert sum(r["rewards/accuracies"] for r in tail) / len(tail) >= 0.9
    k = len(rows) // 5
    early = sum(r["rewards/margins"] for r in rows[:k]) / k
    late = sum(r["rewards/margins"] for r in rows[-k:]) / k
    assert late > early + 0.1, (early, late)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert key in rows[-1]
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == rows[-1]["step"]
    assert evals[-1]["eval/rewards/accuracies"] > 0.8


REFERENCE_FREE = [
    "algo=dpo",
    "train.max_steps=100",
    "train.log_every=1",
    "train.eval_samples=100",
    "train.eval_every=100",
]


def _fifths(rows, key):
    """Means of `key` over the first and the last fifth of the logged steps."""
    k = len(rows) // 5
    return sum(r[key] for r in rows[:k]) / k, sum(r[key] for r in rows[-k:]) / k


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_learn_without_a_reference(tmp_path, loss_type):
    """100 steps with the defaults (beta 0.1, simpo_gamma 0.5). Measured: SimPO's margins
    (beta x average log-prob) 0.230 -> 0.318 between the first and the last fifth, held-out
    0.251 -> 0.330; ORPO's log odds ratio 4.17 -> 5.28, its NLL 0.316 -> 0.179, held-out loss
    0.328 -> 0.193. The thresholds ask for about half of that."""
    run_dir = run([*REFERENCE_FREE, f"algo.loss_type={loss_type}", f"hydra.run.dir={tmp_path}"])
    log = (run_dir / "cli.log").read_text()
    assert f"reference: none (algo.loss_type={loss_type} needs no reference)" in log
    assert "policy: 854,144 parameters" in log
    assert "reference: 854,144 parameters" not in log  # no second model, no precompute pass
    assert "reference log-probs" not in log and not (run_dir / "ref_logps.pt").exists()
    rows = _train_rows(run_dir)
    assert len(rows) == 100
    shared = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
    assert set(shared) | {"logps/chosen", "logps/rejected", "loss"} <= set(rows[-1])
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 100]
    if loss_type == "simpo":
        early, late = _fifths(rows, "rewards/margins")
        assert late > early + 0.04, (early, late)
        start, end = (r["eval/rewards/margins"] for r in evals)
        assert end > start + 0.04, (start, end)
    else:
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(rows[-1])
        early, late = _fifths(rows, "log_odds_chosen")
        assert late > early + 0.5, (early, late)
        early, late = _fifths(rows, "nll_loss")
        assert late < 0.75 * early, (early, late)
        start, end = (r["eval/loss"] for r in evals)
        assert end < start - 0.05, (start, end)
    assert evals[-1]["eval/rewards/accuracies"] >= 0.85


def test_reference_modes_agree_at_step_zero(tmp_path):
    """A frozen copy, the LoRA base with adapters disabled, and precomputed log-probs are the same
    reference at the start: same first-step loss and policy log-probs on the same batch."""
    copy = run([*STEP0, f"hydra.run.dir={tmp_path / 'copy'}"])
    lora = run([*STEP0, "peft=lora", f"hydra.run.dir={tmp_path / 'lora'}"])
    pre = run([*STEP0, "algo.precompute_ref=true", f"hydra.run.dir={tmp_path / 'pre'}"])
    rows = {name: _train_rows(d)[0] for name, d in (("copy", copy), ("lora", lora), ("pre", pre))}
    for name in ("lora", "pre"):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
            assert rows[name][key] == pytest.approx(rows["copy"][key], abs=1e-5), (name, key)
    assert rows["copy"]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference: log 2
    copy_log, lora_log, pre_log = ((d / "cli.log").read_text() for d in (copy, lora, pre))
    assert "reference: 854,144 parameters, 0 trainable" in copy_log
    assert "reference:" in lora_log and "adapters disabled (no second model)" in lora_log
    assert "reference: 854,144 parameters" not in lora_log + pre_log  # no second model built
    assert (pre / "ref_logps.pt").exists()


def test_precomputed_reference_is_reused_on_resume(tmp_path):
    args = [
        *STEP0,
        "algo.precompute_ref=true",
        "train.max_steps=2",
        "train.save_every=1",
        f"hydra.run.dir={tmp_path}",
    ]
    run(args)
    stamp = (tmp_path / "ref_logps.pt").stat().st_mtime_ns
    run([*args[:-2], "train.max_steps=3", "train.resume=auto", f"hydra.run.dir={tmp_path}"])
    assert (tmp_path / "ref_logps.pt").stat().st_mtime_ns == stamp
    assert "reference: reusing" in (tmp_path / "cli.log").read_text()
    # other pairs of the same number (another data seed): the cache is stale, not reused, and
    # the policy starts equal to the reference again (loss log 2)
    fresh = [*args[:-2], "data.seed=1", f"hydra.run.dir={tmp_path}"]
    run(fresh)
    log = (tmp_path / "cli.log").read_text()
    assert "was made for other data or model, recomputing" in log
    rows = _train_rows(tmp_path)
    assert rows[0]["step"] == 1 and rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)


def test_preference_row_without_rejected_fails_naming_file_and_line(tmp_path, cli):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(4)]
    rows[2]["rejected"] = ""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = cli("algo=dpo", f"data.path={path}", f"hydra.run.dir={tmp_path / 'run'}", timeout=60)
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "line 3" in proc.stderr and "rejected" in proc.stderr
    del rows[2]["rejected"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = cli("algo=rm", f"data.path={path}", f"hydra.run.dir={tmp_path / 'run2'}", timeout=60)
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "line 3" in proc.stderr


def test_reward_model_trains_and_final_loads_and_scores(tmp_path):
    run_dir = run(
        [
            "algo=rm",
            f"hydra.run.dir={tmp_path}",
            "train.max_steps=60",
            "train.log_every=10",
            "train.eval_samples=100",
        ]
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"]
    assert {"loss", "accuracy", "margin"} <= set(_train_rows(run_dir)[-1])

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": a}],
            tokenize=False,
        )
        for a in ("4", "5")
    ]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    batch = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    with torch.no_grad():
        scores = model(input_ids=batch, attention_mask=(batch != tok.pad_token_id).long()).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_logps"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_row_gives_each_sides_log_probs_and_gradients(attention, fused):
    """algo.share_prompt: one row [prompt | chosen | rejected] with a 4-D mask gives the same
    summed log-probs, token counts and gradients as a row per side (fp32, 1e-5); a rejected
    token that could see the chosen response would change its log-prob. With algo.fused_logps
    (log-probs from hidden states) both layouts also equal the logits path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rltune.algos.dpo import response_logps
    from rltune.data.preference import collate_pairs, collate_shared, encode_pair, shared_prompt
    from rltune.models import SHIPPED
    from rltune.prefix import mask_for
    from rltune.tasks.arith import rows

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED["tiny"])
    model = AutoModelForCausalLM.from_pretrained(
        SHIPPED["tiny"], dtype=torch.float32, attn_implementation=attention
    )
    pairs = [encode_pair(r, tokenizer) for r in rows("preference", 12, seed=0, split="train")]
    pad = tokenizer.pad_token_id
    head = model.lm_head if fused else None

    def logps_and_grads(batch, head=head):
        model.zero_grad()
        logps, counts = response_logps(model, batch, head)
        logps.sum().backward()
        return logps.detach(), counts, [p.grad.clone() for p in model.parameters()]

    rowwise, counts, grads = logps_and_grads(collate_pairs(pairs, pad))
    if fused:  # the logits path, a row per side
        plain, plain_counts, plain_grads = logps_and_grads(collate_pairs(pairs, pad), head=None)
        assert torch.equal(counts, plain_counts)
        torch.testing.assert_close(rowwise, plain, atol=1e-5, rtol=1e-5)
        for a, b in zip(plain_grads, grads, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    batch = collate_shared(pairs, pad)
    batch["attention_mask"] = mask_for(model, batch["attention_mask"])
    shared, shared_counts, shared_grads = logps_and_grads(batch)
    assert torch.equal(counts, shared_counts)
    torch.testing.assert_close(shared, rowwise, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, shared_grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)

    batch = collate_shared(pairs, pad)
    leak = batch["attention_mask"] | torch.ones_like(batch["attention_mask"]).tril()
    batch["attention_mask"] = mask_for(model, leak)  # let rejected tokens see the chosen ones
    leaked, _ = response_logps(model, batch, head)
    assert not torch.allclose(leaked[12:], rowwise[12:], atol=1e-3)

    other = {**pairs[0], "rejected": dict(pairs[1]["rejected"])}  # a different prompt
    assert shared_prompt(pairs[0]) is not None and shared_prompt(other) is None


def test_response_token_counts_leave_out_prompt_and_padding_in_both_layouts():
    """SimPO and ORPO divide each response's log-prob by its token count: in a row per side and
    in the shared [prompt | chosen | rejected] row alike, the count is that response's labelled
    tokens, whatever the prompt's length and the padding around it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rltune.algos.dpo import response_logps
    from rltune.data.preference import collate_pairs, collate_shared, encode_pair, shared_prompt
    from rltune.logps import IGNORE_INDEX
    from rltune.models import SHIPPED
    from rltune.prefix import mask_for
    from rltune.tasks.arith import rows

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED["tiny"])
    model = AutoModelForCausalLM.from_pretrained(
        SHIPPED["tiny"], dtype=torch.float32, attn_implementation="sdpa"
    )
    pairs = [encode_pair(r, tokenizer) for r in rows("preference", 12, seed=0, split="train")]
    expected = [
        sum(label != IGNORE_INDEX for label in p[side]["labels"])
        for side in ("chosen", "rejected")
        for p in pairs
    ]
    assert len({shared_prompt(p) for p in pairs}) > 1 and len(set(expected)) > 1
    shared = collate_shared(pairs, tokenizer.pad_token_id)
    shared["attention_mask"] = mask_for(model, shared["attention_mask"])
    with torch.no_grad():
        for batch in (collate_pairs(pairs, tokenizer.pad_token_id), shared):
            for head in (None, model.lm_head):
                _, counts = response_logps(model, batch, head)
                assert counts.tolist() == expected


def test_scalar_head_scores_the_last_token_before_the_tokenizers_padding(tmp_path):
    """A model whose config names another pad id (here none) than the tokenizer's: the head
    would score a padding position of every padded row. Loading makes them agree, so a padded
    row scores as it does alone."""
    import shutil

    from rltune.config import ModelConfig
    from rltune.models import SHIPPED, load_scalar_model, load_tokenizer

    folder = tmp_path / "model"
    shutil.copytree(SHIPPED["tiny"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pad_token_id": None}))
    tok = load_tokenizer(ModelConfig())
    torch.manual_seed(0)
    model = load_scalar_model(
        str(folder), ModelConfig(), device=torch.device("cpu"), pad_token_id=tok.pad_token_id
    ).eval()
    assert model.config.pad_token_id == tok.pad_token_id
    short, long = tok("1+1=2").input_ids, tok("12+34=46").input_ids
    padded = torch.tensor([short + [tok.pad_token_id] * (len(long) - len(short)), long])
    with torch.no_grad():
        batch = model(input_ids=padded, attention_mask=(padded != tok.pad_token_id).long()).logits
        alone = model(input_ids=torch.tensor([short])).logits
    torch.testing.assert_close(batch[0], alone[0])
