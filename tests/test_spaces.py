"""Conditioning spaces (issue 25, part 3): each space's context on hand-built ids, log-probs in a new
space against a hand-built forward, the alignment of two arbitrary spaces, the prompt parts on the data
side, and a short fit in the question space with the alignment of two other pairs measured."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_prerl.config.spaces import configured_spaces
from lightning_prerl.data.batch import PART_TENSORS, RolloutBatch, concat_batches
from lightning_prerl.data.prompts import PartTokens, toy_prompts
from lightning_prerl.data.rewards import Prompt
from lightning_prerl.objectives import PolicyGradientObjective as PG
from lightning_prerl.objectives.spaces import bind_space, parts_read
from lightning_prerl.reports.alignment import GradientAlignment, alignment_samples, gradient_alignment, pairs_samples
from lightning_prerl.reports.spaces import spaces_table, write_spaces_report
from lightning_prerl.rollout.hf import HFEngine
from lightning_prerl.training.datamodule import RolloutDataModule
from lightning_prerl.training.logprobs import sequence_logprobs
from lightning_prerl.training.policy import PolicyModule
from lightning_prerl.training.record import batch_table, table_batch
from tests.test_config import compose_cfg
from tests.test_policy import make_batch, quiet_cpu_trainer

S = 9  # the start token of the hand-built ids


def hand_built() -> RolloutBatch:
    """3 rows, pad id 0: a padded prompt, a full one, a one-token one; row 1 has no system prompt."""
    t = torch.tensor
    return RolloutBatch(
        prompt_ids=t([[0, 11, 12, 13], [21, 22, 23, 24], [0, 0, 0, 31]]),
        prompt_mask=t([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]),
        response_ids=t([[5], [5], [5]]),
        response_mask=t([[1], [1], [1]]),
        rewards=t([0.0, 1.0, 0.0]),
        group_size=1,
        question_ids=t([[0, 41, 42], [51, 52, 53], [0, 0, 61]]),
        question_mask=t([[0, 1, 1], [1, 1, 1], [0, 0, 1]]),
        system_ids=t([[71, 72], [0, 0], [0, 81]]),
        system_mask=t([[1, 1], [0, 0], [0, 1]]),
        fixed_ids=t([[91, 92]] * 3),
        fixed_mask=t([[1, 1]] * 3),
    )


@pytest.mark.parametrize(
    "space,ids,mask",
    [
        ("conditional", [[0, 11, 12, 13], [21, 22, 23, 24], [0, 0, 0, 31]], [[0, 1, 1, 1], [1] * 4, [0, 0, 0, 1]]),
        ("marginal", [[S], [S], [S]], [[1], [1], [1]]),
        ({"space": "last_k", "space_args": {"k": 2}}, [[12, 13], [23, 24], [0, 31]], [[1, 1], [1, 1], [0, 1]]),
        (
            {"space": "last_k", "space_args": {"k": 9}},
            [[0, 11, 12, 13], [21, 22, 23, 24], [0, 0, 0, 31]],
            [[0, 1, 1, 1], [1] * 4, [0, 0, 0, 1]],
        ),
        # s right before each row's first real token; a padded row's new column is padding
        ("question", [[0, S, 41, 42], [S, 51, 52, 53], [0, 0, S, 61]], [[0, 1, 1, 1], [1] * 4, [0, 0, 1, 1]]),
        ("system", [[S, 71, 72], [0, 0, S], [0, S, 81]], [[1, 1, 1], [0, 0, 1], [0, 1, 1]]),  # no system: s alone
        ("fixed", [[S, 91, 92]] * 3, [[1, 1, 1]] * 3),
    ],
)
def test_each_space_builds_its_context_from_hand_built_ids(space, ids, mask):
    got_ids, got_mask = bind_space(space)(hand_built(), S)
    assert got_ids.tolist() == ids and got_mask.tolist() == mask


def test_a_space_whose_part_the_batch_lacks_says_so_in_one_line():
    batch = make_batch_without_parts()
    with pytest.raises(ValueError) as err:
        bind_space("question")(batch, S)
    assert str(err.value) == (
        "objective.space='question': the rollout batch carries no question tokens (a recorded or hand-built batch)"
    )
    with pytest.raises(ValueError, match="carries no fixed tokens .set data.fixed_context.$"):
        bind_space("fixed")(batch, S)


def make_batch_without_parts() -> RolloutBatch:
    b = hand_built()
    return RolloutBatch(b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask, b.rewards, 1)


def test_select_and_concat_keep_the_parts_left_padded_and_trimmed():
    batch = hand_built()
    one = batch.select(slice(2, 3))  # row 2: one real question token, one system token
    assert (one.question_ids.tolist(), one.system_ids.tolist(), one.fixed_ids.tolist()) == ([[61]], [[81]], [[91, 92]])
    both = concat_batches([one, batch.select(slice(0, 1))], pad=0)
    assert both.question_ids.tolist() == [[0, 61], [41, 42]] and both.question_mask.tolist() == [[0, 1], [1, 1]]
    assert both.system_ids.tolist() == [[0, 81], [71, 72]]


def test_a_recorded_batch_keeps_its_prompt_parts():
    """The rollout record writes the parts as list columns and reads back every tensor equal (a replay in
    the question space has its tokens)."""
    batch = hand_built()
    back, meta = table_batch(batch_table(batch, {}, pad=0))
    assert meta["widths"] == {"prompt": 4, "response": 1, "question": 3, "system": 2, "fixed": 2}
    for name in ("prompt_ids", "prompt_mask", *PART_TENSORS):
        assert torch.equal(getattr(back, name), getattr(batch, name)), name
    assert bind_space("system")(back, S)[0].tolist() == [[S, 71, 72], [0, 0, S], [0, S, 81]]


def with_parts(tokenizer, batch: RolloutBatch) -> RolloutBatch:
    """`make_batch`'s two prompts with their bare questions, a system prompt on the second only and a
    fixed context, as the data module carries them."""
    prompts = [Prompt("Compute 1+2", "3"), Prompt("Compute 10-3", "7", system="Be brief.")]
    parts = PartTokens(tokenizer, ["question", "system", "fixed"], "Solve it.").tensors(prompts, 2)
    return RolloutBatch(**{**{f: getattr(batch, f) for f in ("prompt_ids", "prompt_mask")}, **parts},
                        response_ids=batch.response_ids, response_mask=batch.response_mask,
                        rewards=batch.rewards, group_size=batch.group_size)  # fmt: skip


def by_hand(policy, context: list[int], response: list[int]) -> torch.Tensor:
    """log P(response | context) from one unpadded forward, positions 0.."""
    ids = torch.tensor([context + response])
    logits = policy(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0]  # (L, V)
    return logits[len(context) - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.parametrize("share_prompts", [False, True])
def test_logprobs_in_every_new_space_equal_a_forward_on_the_concatenated_context(policy, tokenizer, share_prompts):
    batch = with_parts(tokenizer, make_batch(tokenizer))
    s = tokenizer.convert_tokens_to_ids("<|im_start|>")
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    questions, systems = (
        [enc("Compute 1+2")] * 2 + [enc("Compute 10-3")] * 2,
        [[], [], enc("Be brief."), enc("Be brief.")],
    )
    prompts = [row[m.bool()].tolist() for row, m in zip(batch.prompt_ids, batch.prompt_mask, strict=True)]
    contexts = {
        "question": [[s, *q] for q in questions],
        "system": [[s, *x] for x in systems],
        "fixed": [[s, *enc("Solve it.")]] * 4,
        "last_k": [p[-3:] for p in prompts],
    }
    assert contexts["question"][0] == [s] + enc("Compute 1+2") and len(enc("Solve it.")) > 1
    for name, rows in contexts.items():
        space = {"space": name, "space_args": {"k": 3}} if name == "last_k" else name
        logp, _ = sequence_logprobs(policy, batch, bind_space(space), s, share_prompts=share_prompts)  # (N, T)
        for i, context in enumerate(rows):
            response = batch.response_ids[i, : int(batch.response_mask[i].sum())].tolist()
            expected = by_hand(policy, context, response)
            assert torch.allclose(logp[i, : len(response)], expected, atol=1e-5), (name, i)


def test_alignment_compares_any_two_spaces(policy, tokenizer):
    """<g_a, g_b>, the cosine and the log-prob gap of (question, last_k 3), against hand-made gradients."""
    batch = with_parts(tokenizer, make_batch(tokenizer))
    s = tokenizer.convert_tokens_to_ids("<|im_start|>")
    pair = ("question", {"space": "last_k", "space_args": {"k": 3}})
    stats = gradient_alignment(policy, batch, s, max_samples=1, pair=pair)
    one, mask = batch.select(slice(0, 1)), batch.select(slice(0, 1)).response_mask
    flat, means = [], []
    for space in pair:
        policy.zero_grad()
        logp, _ = sequence_logprobs(policy, one, bind_space(space), s)
        total = (logp * mask).sum()
        total.backward()
        flat.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
        means.append(total.item() / mask.sum().item())
    dot = torch.dot(flat[0], flat[1]).item()
    prefix = "align/question_vs_last_k3/"
    assert stats[f"{prefix}inner_mean"] == pytest.approx(dot, rel=1e-4)
    assert stats[f"{prefix}cosine_mean"] == pytest.approx(dot / (flat[0].norm() * flat[1].norm()).item(), rel=1e-4)
    assert stats[f"{prefix}logp_gap_mean"] == pytest.approx(means[1] - means[0], rel=1e-4)
    assert stats[f"{prefix}negative_share"] == float(dot < 0)
    assert "align/inner_mean" in gradient_alignment(policy, batch, s, max_samples=1)  # the paper's pair: plain keys
    # several pairs at once share each space's gradient, with the numbers of one pair at a time
    both = pairs_samples(policy, batch, s, 2, 1.0, [pair, ("marginal", "question")])
    one_by_one = [alignment_samples(policy, batch, s, 2, 1.0, p) for p in (pair, ("marginal", "question"))]
    for got, want in zip(both, one_by_one, strict=True):
        assert [r.keys() for r in got] == [r.keys() for r in want]
        assert all(g[k] == pytest.approx(w[k], rel=1e-6) for g, w in zip(got, want, strict=True) for k in g)


def test_prompt_parts_are_tokenised_without_the_template_and_a_fixed_context_needs_a_token(tokenizer):
    parts = PartTokens(tokenizer, ["question", "system", "fixed"], "Think.")
    prompt = Prompt("Compute 2+2", "4")
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert (parts.ids(prompt, "question"), parts.ids(prompt, "system")) == (enc("Compute 2+2"), [])
    assert parts.ids(prompt, "fixed") == enc("Think.") and "<|im_start|>" not in tokenizer.decode(enc("Think."))
    with pytest.raises(ValueError) as err:
        PartTokens(tokenizer, ["fixed"], "")
    assert str(err.value) == "data.fixed_context='': the fixed space needs at least one token"
    with pytest.raises(ValueError, match=r"^data context_parts=\['prompt'\]: expected some of"):
        PartTokens(tokenizer, ["prompt"])


def test_the_config_names_the_parts_its_spaces_read():
    """Every phase's space and both spaces of every alignment pair; the default run carries none."""
    assert parts_read(configured_spaces(compose_cfg())) == []
    cfg = compose_cfg(
        "objective.warmup.space=question",
        "diagnostics=alignment",
        "callbacks.alignment.pairs=[[marginal,conditional],[fixed,{space:last_k,space_args:{k:4}}]]",
        "data.fixed_context=Solve.",
    )
    assert {"space": "last_k", "space_args": {"k": 4}} in configured_spaces(cfg)
    assert parts_read(configured_spaces(cfg)) == ["question", "fixed"]
    assert PG(space="system").lr_scale == 0.1 and PG(space="conditional").lr_scale == 1.0


def _length_parity(prompt, completion: str) -> float:
    return float(len(completion) % 2 == 0)


def test_a_short_fit_in_the_question_space_with_two_alignment_pairs(tiny_model_dir, tmp_path):
    """Two GRPO steps scored after s + the bare question, which is what every training forward sees;
    the alignment callback measures (question, conditional) and (marginal, system) and writes each."""
    objective = PG(space="question")
    module = PolicyModule(objective, model_path=str(tiny_model_dir), lr=1e-3)
    prompts = [Prompt(p.question, p.answer, system="Be exact.") for p in toy_prompts("train", 8)]
    dm = RolloutDataModule(
        module.tokenizer, HFEngine, _length_parity, prompts, None, 2, 4, {"max_new_tokens": 6},
        context_parts=["question", "system"],
    )  # fmt: skip
    pairs = [["question", "conditional"], ["marginal", "system"]]
    inputs, before = [], []

    class Forwards(L.Callback):
        def on_train_start(self, trainer, pl_module):
            before.extend(p.detach().clone() for p in pl_module.policy.parameters())

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            hook = lambda m, a, kw: inputs.append((kw["input_ids"], batch)) if torch.is_grad_enabled() else None  # noqa: E731
            self.handle = pl_module.policy.register_forward_pre_hook(hook, with_kwargs=True)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.handle.remove()

    trainer = quiet_cpu_trainer(
        callbacks=[GradientAlignment(every_n_steps=1, max_samples=2, pairs=pairs), Forwards()],
        max_steps=2,
        logger=CSVLogger(tmp_path, name="logs", version=""),
    )
    trainer.fit(module, datamodule=dm)
    s = module.start_token_id
    assert len({id(batch) for _, batch in inputs}) == 2  # both steps' training forwards were seen
    for batch in {id(b): b for _, b in inputs}.values():  # s + the bare question, never the templated prompt
        contexts = bind_space("question")(batch, s)[0]  # (N, C)
        passes = [set(map(tuple, ids.tolist())) for ids, b in inputs if b is batch]  # rows of each forward
        assert any(rows <= set(map(tuple, contexts.tolist())) for rows in passes)  # the shared contexts' pass
        assert not any(rows & set(map(tuple, batch.prompt_ids.tolist())) for rows in passes)  # never the prompt
    assert any(not torch.equal(p, b) for p, b in zip(module.policy.parameters(), before, strict=True))
    logs = tmp_path / "logs"
    rows = list(csv.DictReader(open(logs / "metrics.csv")))
    keys = ("align/question_vs_conditional/cosine_mean", "align/marginal_vs_system/cosine_mean")
    for key in keys:
        values = [float(r[key]) for r in rows if r.get(key)]
        assert len(values) == 2 and all(math.isfinite(v) and -1 <= v <= 1 for v in values), (key, values)
    for name in ("alignment_question_vs_conditional.csv", "alignment_marginal_vs_system.csv"):
        assert len(list(csv.DictReader(open(logs / name)))) == 4  # 2 steps x 2 responses
    assert not (logs / "alignment.csv").exists()  # the paper's pair was not asked for


def test_the_spaces_table_bootstraps_prompts_then_samples(tmp_path):
    """2 prompts x 2 samples of one pair at step 0: the means by hand, intervals around them, the
    paper's pair read from alignment.csv, the files written."""
    logs = tmp_path / "logs"
    logs.mkdir()
    fields = ["step", "sample", "reward", "inner", "cosine", "logp_gap"]
    for name, inners in (
        ("alignment_question_vs_conditional.csv", [2.0, -1.0, 4.0, 3.0]),
        ("alignment.csv", [1.0] * 4),
    ):
        with open(logs / name, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(fields)
            writer.writerows([0, i, 0.0, inner, inner / 10, 0.5 * i] for i, inner in enumerate(inners))
    rows = {row["pair"]: row for row in spaces_table(tmp_path, group_size=2)}
    assert set(rows) == {"question_vs_conditional", "marginal_vs_conditional"}
    row = rows["question_vs_conditional"]
    assert (row["step"], row["rollouts"]) == (0, 4)
    assert row["inner"].estimate == pytest.approx(2.0) and row["cosine"].estimate == pytest.approx(0.2)
    assert row["negative_share"].estimate == pytest.approx(0.25) and row["logp_gap"].estimate == pytest.approx(0.75)
    assert row["inner"].low <= 2.0 <= row["inner"].high and row["inner"].low < row["inner"].high
    assert rows["marginal_vs_conditional"]["negative_share"].text() == "0.000 [0.000, 0.000]"
    md, flat = write_spaces_report(tmp_path, 2, "python experiments/run.py experiment=spaces_toy")
    assert "| question_vs_conditional | 0 | 4 | 0.200 [" in md.read_text()
    assert next(csv.reader(open(flat)))[:6] == ["run", "pair", "step", "rollouts", "cosine", "cosine_low"]
