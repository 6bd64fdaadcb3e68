"""Loss math against hand-derived numbers (every expected value is worked out in a comment)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_prerl.objectives import PolicyGradientObjective
from lightning_prerl.objectives.advantages import group_mean, grpo, signed
from lightning_prerl.objectives.ops import kl_estimate, ppo_clip_loss

S = math.sqrt(0.5)  # std (n-1) of {1, 0} = sqrt(((.5)^2 + (.5)^2) / 1) = 0.70711


def test_grpo_advantage_by_hand():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    adv = grpo(r)
    # group 1: (1 - .5) / (0.70711 + 1e-6) = +0.707106; (0 - .5) / ... = -0.707106
    assert adv[0].tolist() == pytest.approx([0.5 / (S + 1e-6), -0.5 / (S + 1e-6)], abs=1e-7)
    # all-equal groups: std 0 -> advantage exactly 0
    assert adv[1:].abs().max().item() == 0.0


def test_group_mean_and_signed_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # mean .25: correct +.75, wrong -.25 (the wrong sample's weight is the group's success rate)
    assert group_mean(r)[0].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    # Zhu et al.: W-REINFORCE lambda=.1 -> +0.1 on correct, -1 on wrong
    assert signed(r, 0.1)[0].tolist() == pytest.approx([0.1, -1.0, -1.0, -1.0])


def test_ppo_clip_and_dual_clip_by_hand():
    # ratios 1.5, 0.5, 1.5, 20, 0.5 built from log-prob differences
    ratio = torch.tensor([[1.5, 0.5, 1.5, 20.0, 0.5]])
    logp, old = ratio.log(), torch.zeros_like(ratio)
    adv = torch.tensor([1.0])
    # A=+1: max(-r, -clip(r, .8, 1.2)) -> r=1.5: max(-1.5, -1.2) = -1.2 ; r=.5: max(-.5, -.8) = -.5
    pos = ppo_clip_loss(logp[:, :2], old[:, :2], adv, 0.2, 0.2, 10.0)
    assert pos[0].tolist() == pytest.approx([-1.2, -0.5])
    # A=-1: r=1.5: max(1.5, 1.2) = 1.5 ; r=20: max(20, 1.2) = 20, dual clip min(20, 10) = 10 ;
    #       r=.5: max(.5, .8) = .8
    neg = ppo_clip_loss(logp[:, 2:], old[:, 2:], -adv, 0.2, 0.2, 10.0)
    assert neg[0].tolist() == pytest.approx([1.5, 10.0, 0.8])
    # clip-higher: eps_high .28 -> A=+1, r=1.5: max(-1.5, -1.28) = -1.28
    assert ppo_clip_loss(logp[:, :1], old[:, :1], adv, 0.2, 0.28, 10.0).item() == pytest.approx(-1.28)
    # without dual clip the r=20 negative token costs the full 20
    assert ppo_clip_loss(logp[:, 3:4], old[:, 3:4], -adv, 0.2, 0.2, None).item() == pytest.approx(20.0)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    d = math.log(2.0)  # log-ratio log(.5/.25)
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(d)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * d * d)
    # k3 = exp(-d) + d - 1 = .5 + .693147 - 1 = .193147
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 + d - 1.0)


def test_grpo_batch_loss_by_hand():
    """2 prompts x 2 samples, on-policy; the token mean runs over all 8 response tokens."""
    obj = PolicyGradientObjective()
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    adv, keep = obj.advantages(rewards, group_size=2)
    a = 0.5 / (S + 1e-6)
    assert adv.tolist() == pytest.approx([a, -a, 0.0, 0.0], abs=1e-7)
    assert keep.all()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.float)  # 2+3+1+2 = 8 tokens
    logp = torch.full((4, 3), -1.0)
    loss_tok = obj.token_loss(logp, logp.detach(), adv)
    # ratio 1 -> per-token loss -A: (-a*2 + a*3 + 0 + 0) / 8 = a / 8 = 0.0883882
    assert ((loss_tok * mask).sum() / mask.sum()).item() == pytest.approx(a / 8, abs=1e-7)


def test_objective_rejects_bad_values_with_the_key():
    with pytest.raises(ValueError, match=r"objective.space='prompt'"):
        PolicyGradientObjective(space="prompt")
    with pytest.raises(ValueError, match=r"objective.clip_c=0.5"):
        PolicyGradientObjective(clip_c=0.5)
    with pytest.raises(ValueError, match=r"objective.kl_coef=-1"):
        PolicyGradientObjective(kl_coef=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
def test_chunked_head_logprobs_and_entropy_equal_the_full_logits(temperature):
    """`head_logprobs` (never holding (N, T, V)) = log-softmax / entropy of the whole logits, to 1e-5,
    with gradients, for chunk sizes that do and do not divide N*T. Temperature 2 catches a `!= 1.0`
    test that skips the division at some other value (found by `make mutation`)."""
    from lightning_prerl.objectives.ops import head_logprobs, token_logprobs_and_entropy

    torch.manual_seed(0)
    n, t, h, v = 3, 37, 32, 5000
    hidden = torch.randn(n, t, h, requires_grad=True)  # (N, T, H)
    weight = (0.2 * torch.randn(v, h)).requires_grad_()  # (V, H)
    targets = torch.randint(0, v, (n, t))  # (N, T)
    ref_logp, ref_ent = token_logprobs_and_entropy(hidden @ weight.T, targets, temperature, True)  # (N, T)
    direct = ((hidden @ weight.T) / temperature).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(ref_logp, direct, atol=1e-5, rtol=0)  # the reference itself, by plain torch
    ref_grads = torch.autograd.grad(ref_logp.sum() + 0.1 * ref_ent.sum(), (hidden, weight))
    for chunk in (None, 7, 64):
        logp, _ = head_logprobs(hidden, weight, targets, temperature, False, chunk)
        assert torch.allclose(logp, ref_logp, atol=1e-5, rtol=0)
        logp, ent = head_logprobs(hidden, weight, targets, temperature, True, chunk)
        assert torch.allclose(logp, ref_logp, atol=1e-5, rtol=0)
        assert torch.allclose(ent, ref_ent, atol=1e-5, rtol=0)
        grads = torch.autograd.grad(logp.sum() + 0.1 * ent.sum(), (hidden, weight))
        for g, ref in zip(grads, ref_grads, strict=True):
            assert torch.allclose(g, ref, atol=1e-5, rtol=1e-4)


def test_head_weight_gradient_is_summed_in_float32_on_every_device(monkeypatch):
    """`lce_options` names float32 accumulation. torch's "auto" resolves to "compact" for CUDA bf16
    (`linear_cross_entropy_options._AUTO_DEFAULTS`): every chunk's head-weight gradient added into the
    bf16 gradient itself. Pinned here on CPU through the options' own resolution (`_adjust`), so a torch
    that changes that table, or a return to the default options, fails here."""
    from lightning_prerl.objectives.ops import head_logprobs, lce_options

    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16
    default = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=883)._adjust(8192, 2560, 151936, bf16, cuda)
    assert default.acc_policy == "compact"  # the library fact this guards against
    ours = lce_options(883, cuda, bf16)._adjust(8192, 2560, 151936, bf16, cuda)
    if torch.__version__ < "2.14":  # torch 2.14 (the GPU install's) dropped "balanced"
        assert (ours.acc_policy, ours.acc_dtype, ours.batch_chunk_size) == ("balanced", torch.float32, 883)
    else:
        assert (ours.acc_policy, ours.acc_dtype, ours.batch_chunk_size) == ("accurate", torch.float32, 883)
    ours = lce_options(883, cpu, bf16)._adjust(8192, 2560, 151936, bf16, cpu)
    assert (ours.acc_policy, ours.acc_dtype) == ("accurate", torch.float32)
    ours = lce_options(64, cpu, torch.float32)._adjust(100, 32, 500, torch.float32, cpu)
    assert ours.acc_dtype == torch.float32
    seen, lce = [], torch.nn.functional.linear_cross_entropy  # and head_logprobs passes them

    def recording(*args, options, **kwargs):
        seen.append(options)
        return lce(*args, options=options, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear_cross_entropy", recording)
    head_logprobs(torch.randn(2, 5, 8, dtype=bf16), torch.randn(50, 8, dtype=bf16), torch.zeros(2, 5, dtype=torch.long))
    assert [(o.acc_policy, o.acc_dtype) for o in seen] == [("accurate", torch.float32)]


def test_head_weight_gradient_stays_float32_where_torch_has_no_balanced_policy(monkeypatch):
    """torch 2.14 accepts only auto, accurate and compact (`_VALID_ACC_POLICIES`): there the CUDA options
    fall back to "accurate", still float32 accumulation, instead of stopping the first step with
    "invalid acc_policy: 'balanced'". The 2.14 constructor's refusal stands in for it under torch 2.13;
    `make docker-test-gpu` runs the real one."""
    from lightning_prerl.objectives.ops import lce_options

    options = torch.nn.LinearCrossEntropyOptions

    def without_balanced(**kwargs):
        if kwargs["acc_policy"] == "balanced":
            raise ValueError("invalid acc_policy: 'balanced'; expected one of 'auto', 'accurate', 'compact'")
        return options(**kwargs)

    monkeypatch.setattr(torch.nn, "LinearCrossEntropyOptions", without_balanced)
    ours = lce_options(883, torch.device("cuda"), torch.bfloat16)
    assert (ours.acc_policy, ours.acc_dtype, ours.batch_chunk_size) == ("accurate", torch.float32, 883)


def test_head_logprobs_without_linear_cross_entropy(monkeypatch):
    """torch < 2.13 (the GPU image's 2.11) has no `linear_cross_entropy`: the checkpointed chunks give the
    same log-probs and gradients, and an entropy that is only logged carries no gradient."""
    from lightning_prerl.objectives.ops import head_logprobs

    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)  # (N, T, H)
    weight = (0.2 * torch.randn(300, 16)).requires_grad_()  # (V, H)
    targets = torch.randint(0, 300, (2, 9))  # (N, T)
    ref, _ = head_logprobs(hidden, weight, targets, 0.7, False, 5)
    ref_grads = torch.autograd.grad(ref.sum(), (hidden, weight))
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy")
    logp, ent = head_logprobs(hidden, weight, targets, 0.7, True, 5, entropy_grad=False)
    assert torch.allclose(logp, ref, atol=1e-6) and not ent.requires_grad
    for g, r in zip(torch.autograd.grad(logp.sum(), (hidden, weight)), ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-6)


def test_clamps_and_dual_clip_by_hand():
    """The guards mutation testing found untested (`make mutation`): the PPO ratio's exp clamp at +-20
    (dual clip off, a negative advantage at log-ratio 30 costs |A| e^20, not e^30; a positive one at -30
    earns e^-20), k3's clamp at 10 (log-ratio -3: e^3 - 4 = 16.1 -> 10; k3 >= 0, so its lower bound is
    unreachable), the objective passing its dual-clip bound to the loss, and a group whose spread equals
    the tolerance counting as flat."""
    import math

    from lightning_prerl.objectives.advantages import flat_groups
    from lightning_prerl.objectives.ops import kl_estimate, ppo_clip_loss

    logp, old = torch.tensor([[30.0, -30.0]]), torch.zeros(1, 2)  # (1, 2)
    loss = ppo_clip_loss(logp, old, torch.tensor([-1.0]), 0.2, 0.2, None)
    assert loss[0, 0] == pytest.approx(math.exp(20), rel=1e-6)
    loss = ppo_clip_loss(logp, old, torch.tensor([1.0]), 0.2, 0.2, None)
    assert loss[0, 1] == pytest.approx(-math.exp(-20), rel=1e-5)
    assert kl_estimate(torch.tensor([-3.0]), torch.zeros(1), "k3").item() == 10.0
    capped = PolicyGradientObjective(clip_c=3.0).token_loss(logp, old, torch.tensor([-2.0]))  # (1, 2)
    assert capped[0, 0].item() == pytest.approx(6.0)  # -A * c
    assert flat_groups(torch.tensor([[0.0, 0.5], [0.0, 0.75]]), tol=0.5).tolist() == [True, False]


def test_entropy_bonus_sign_and_config_bounds_by_hand():
    """`entropy_coef` is a bonus: with A = 0 the per-token loss is exactly -coef * entropy (a higher
    entropy lowers the loss); `clip_c` must exceed 1 and `lr_scale` be positive, at the boundary too
    (found by `make mutation`: the sign and the boundaries were untested)."""
    logp = torch.zeros(1, 3)  # (1, 3)
    entropy = torch.tensor([[0.5, 1.0, 2.0]])  # (1, 3)
    loss = PolicyGradientObjective(entropy_coef=0.1).token_loss(logp, logp, torch.zeros(1), entropy=entropy)
    assert torch.allclose(loss, -0.1 * entropy)
    with pytest.raises(ValueError, match=r"objective.clip_c=1"):
        PolicyGradientObjective(clip_c=1.0)
    PolicyGradientObjective(clip_c=1.5)
    with pytest.raises(ValueError, match=r"lr_scale"):
        PolicyGradientObjective(lr_scale=0.0)


def test_the_head_computes_in_the_autocast_dtype_and_casts_a_low_precision_weight_to_the_hidden_states():
    """Under bf16 autocast the head runs on bf16 operands, exactly as on bf16 inputs without autocast
    (`linear_cross_entropy` is on no autocast list: float32 operands would stay float32, 1.4e-2 away);
    a bf16 head weight read by float32 hidden states (a float32 final norm) is cast to float32 rather
    than refused. Catches either cast dropped (found by `make mutation`)."""
    from lightning_prerl.objectives.ops import head_logprobs

    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 9, 16), 0.2 * torch.randn(300, 16)  # (N, T, H), (V, H)
    targets = torch.randint(0, 300, (2, 9))  # (N, T)
    bf16, _ = head_logprobs(hidden.bfloat16(), weight.bfloat16(), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = head_logprobs(hidden, weight, targets)
    assert torch.equal(auto, bf16)
    assert not torch.allclose(auto, head_logprobs(hidden, weight, targets)[0], atol=1e-3)  # bf16 is visible
    mixed, _ = head_logprobs(hidden, weight.bfloat16(), targets)
    assert torch.equal(mixed, head_logprobs(hidden, weight.bfloat16().float(), targets)[0])


def test_head_chunk_rows_follow_the_512_mib_rule_and_the_explicit_size(monkeypatch):
    """The output head's chunk: 512 MiB of float32 logits (883 rows at Qwen3's 151,936-token vocabulary),
    at least 256 rows, at most the batch's rows, or `chunk_tokens` when given. A memory bound, not a
    value (rows are independent): pinned through the options `linear_cross_entropy` receives (stubbed,
    so no 151,936-wide logits are built). Catches the rule's constants or the size dropped (`make mutation`)."""
    from lightning_prerl.objectives.ops import head_logprobs

    rows = []

    def stub(flat, weight, targets, reduction, options):
        rows.append(options.batch_chunk_size)
        return torch.zeros(len(flat))

    monkeypatch.setattr(torch.nn.functional, "linear_cross_entropy", stub)
    for v, n_rows, chunk in ((151_936, 1000, None), (600_000, 300, None), (151_936, 1000, 40), (50, 30, None)):
        targets = torch.zeros(1, n_rows, dtype=torch.long)
        head_logprobs(torch.zeros(1, n_rows, 1), torch.zeros(v, 1), targets, 1.0, False, chunk)
    assert rows == [883, 256, 40, 30]


def test_advantage_knobs_and_the_tolerance_boundary_by_hand():
    """`adv_eps` reaches GRPO's std, `adv_tolerance` decides which groups are flat, |A| equal to the
    tolerance counts as zero (neither negative nor positive), and k2 is an accepted KL estimator: 0.5 *
    kl_coef * (logp - ref)^2. Catches each knob dropped for its default, `<` / `>` loosened to `<=` /
    `>=`, and a misspelled "k2" (found by `make mutation`)."""
    rewards = torch.tensor([1.0, 0.0, 0.3, 0.0])  # two groups of two
    adv, _ = PolicyGradientObjective(adv_eps=1.0).advantages(rewards, 2)
    # group 1: +-0.5 / (sqrt(0.5) + 1); group 2 spans 0.3 > 1e-6: +-0.15 / (sqrt(0.045) + 1)
    s2 = math.sqrt(0.045) + 1
    assert adv.tolist() == pytest.approx([0.5 / (S + 1), -0.5 / (S + 1), 0.15 / s2, -0.15 / s2])
    adv, _ = PolicyGradientObjective(advantage="group_mean", adv_tolerance=0.4).advantages(rewards, 2)
    assert adv.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])  # group 2 spans 0.3 <= 0.4: flat
    for samples in ("negative", "positive"):
        _, keep = PolicyGradientObjective(advantage="group_mean", samples=samples, adv_tolerance=0.5).advantages(
            torch.tensor([1.0, 0.0]), 2
        )  # A = +-0.5 = +-tolerance: zero, not signed
        assert keep.tolist() == [False, False], samples
    k2 = PolicyGradientObjective(kl_coef=0.5, kl_estimator="k2")
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    loss = k2.token_loss(logp, logp, torch.zeros(1), ref_logp=ref)  # A = 0: only the KL term
    assert loss[0].tolist() == pytest.approx([0.5 * 0.5 * 0.25, 0.0])
