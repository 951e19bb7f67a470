"""llmkit.align losses: reference formulas on fixed tensors, and the 4-action bandit."""
import math

import pytest
import torch
import torch.nn.functional as F

from llmkit.align import (dpo_loss, ipo_loss, kto_loss, log1mexp, orpo_loss, preference_metrics, reward_loss,
                          sequence_logps)


PC, PR = torch.tensor([-10.0, -8.0]), torch.tensor([-12.0, -7.0])      # policy chosen / rejected
RC, RR = torch.tensor([-11.0, -8.5]), torch.tensor([-11.5, -7.5])      # reference chosen / rejected


pytestmark = pytest.mark.usefixtures("one_thread_module")     # tiny models: see conftest.torch_threads


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_reference_value_and_accuracy_without_ties():
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert losses.mean().item() == pytest.approx(0.657052, abs=1e-6)
    metrics = preference_metrics(chosen, rejected, PC, PR)
    assert metrics["rewards/accuracies"] == 0.5          # pair 2 is a tie (0.05 vs 0.05): not counted
    assert metrics["rewards/margins"] == pytest.approx(0.075)
    assert metrics["logps/chosen"] == -9.0 and metrics["logps/rejected"] == -9.5


def test_dpo_is_ln2_when_policy_equals_reference():
    losses, _, _ = dpo_loss(PC, PR, PC.clone(), PR.clone(), beta=0.1)
    assert torch.equal(losses, torch.full((2,), math.log(2)))


def test_ipo_reference_value_summed_and_length_normalised():
    losses, _, _ = ipo_loss(PC, PR, RC, RR, tau=0.1)
    assert losses.mean().item() == pytest.approx(18.625, abs=1e-5)
    lc, lr = torch.tensor([2.0, 4.0]), torch.tensor([5.0, 1.0])
    normed, _, _ = ipo_loss(PC, PR, RC, RR, tau=0.1, chosen_lengths=lc, rejected_lengths=lr)
    h = [(1 / 2 - -0.5 / 5), (0.5 / 4 - 0.5 / 1)]
    assert normed.tolist() == pytest.approx([(x - 5) ** 2 for x in h], abs=1e-5)


def test_cdpo_and_hinge_match_hand_formulas():
    eps, beta = 0.2, 0.1
    h = [1.5, 0.0]
    cdpo, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    want = [-(1 - eps) * math.log(sig(beta * x)) - eps * math.log(sig(-beta * x)) for x in h]
    assert cdpo.tolist() == pytest.approx(want, abs=1e-6)
    hinge, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="hinge")
    assert hinge.tolist() == pytest.approx([max(0, 1 - beta * x) for x in h], abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo")


def test_reward_loss_margin_and_centering():
    sw, sl = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.0])
    plain = reward_loss(sw, sl)
    assert plain.tolist() == pytest.approx([-math.log(sig(a - b)) for a, b in zip(sw.tolist(), sl.tolist())])
    m = torch.tensor([0.5, 0.0, 1.0])
    assert reward_loss(sw, sl, margin=m).tolist() == pytest.approx(
        [-math.log(sig(a - b - c)) for a, b, c in zip(sw.tolist(), sl.tolist(), m.tolist())])
    centred = reward_loss(sw, sl, center_coef=0.01)
    assert (centred - plain).tolist() == pytest.approx([0.01 * (a + b) ** 2 for a, b in zip(sw.tolist(), sl.tolist())])
    assert preference_metrics(sw, sl)["rewards/accuracies"] == pytest.approx(1 / 3)   # the 2.0 vs 2.0 tie is wrong


def test_kto_matches_hand_formula_with_clamped_detached_zref():
    pol, ref = torch.tensor([-5.0, -7.0, -6.0], requires_grad=True), torch.tensor([-6.0, -6.5, -6.0])
    good = torch.tensor([True, False, True])
    kl_pol, kl_ref = torch.tensor([-9.0, -8.0, -10.0], requires_grad=True), torch.tensor([-9.5, -8.5, -10.0])
    beta, ld, lu = 0.5, 1.0, 1.5
    losses, rewards, z = kto_loss(pol, ref, good, kl_pol, kl_ref, beta=beta, lambda_d=ld, lambda_u=lu)
    z_hand = max(0.0, (0.5 + 0.5 + 0.0) / 3)
    r = [1.0, -0.5, 0.0]
    want = [ld * (1 - sig(beta * (r[0] - z_hand))), lu * (1 - sig(beta * (z_hand - r[1]))),
            ld * (1 - sig(beta * (r[2] - z_hand)))]
    assert z.item() == pytest.approx(z_hand) and losses.tolist() == pytest.approx(want, abs=1e-6)
    assert rewards.tolist() == pytest.approx([beta * x for x in r])
    losses.sum().backward()
    assert kl_pol.grad is None or torch.all(kl_pol.grad == 0)      # z_ref is detached
    _, _, z_neg = kto_loss(pol, ref, good, kl_pol - 5, kl_ref)      # negative KL estimate -> clamped to 0
    assert z_neg.item() == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        kto_loss(pol, ref, good, torch.zeros(0), torch.zeros(0))


def test_orpo_matches_hand_formula_and_is_stable_near_zero():
    lw, ll, lam = torch.tensor([-0.3, -2.0]), torch.tensor([-1.2, -0.05]), 0.1
    losses, cr, rr, log_odds = orpo_loss(lw, ll, lam=lam)
    odds = lambda x: x - math.log(1 - math.exp(x))  # noqa: E731
    want = [-w + lam * -math.log(sig(odds(w) - odds(l))) for w, l in zip(lw.tolist(), ll.tolist())]
    assert losses.tolist() == pytest.approx(want, abs=1e-5)
    assert cr.tolist() == pytest.approx([lam * x for x in lw.tolist()])
    x = torch.tensor([-1e-5, -0.1, -0.69, -0.7, -5.0, -50.0], dtype=torch.float64)
    assert log1mexp(x.float()).double().tolist() == pytest.approx(torch.log(1 - torch.exp(x)).tolist(), rel=1e-4)
    assert torch.isfinite(orpo_loss(torch.tensor([0.0]), torch.tensor([-1e-9]))[0]).all()


def test_sequence_logps_sum_and_mean_against_log_softmax():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    lp = F.log_softmax(logits, -1)
    want = [sum(lp[b, t - 1, labels[b, t]].item() for t in range(1, 5) if mask[b, t]) for b in range(2)]
    assert sequence_logps(logits, labels, mask).tolist() == pytest.approx(want, abs=1e-5)
    assert sequence_logps(logits, labels, mask, "mean").tolist() == pytest.approx([want[0] / 2, want[1] / 4], abs=1e-5)
    with pytest.raises(ValueError, match="reduce"):
        sequence_logps(logits, labels, mask, "max")


# ---- bandit: 4 actions, a tabular softmax policy, the population losses --------------------------
LOG_REF = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
REWARD = torch.tensor([1.0, 0.0, 0.5, -0.5], dtype=torch.float64)


def population_loss(theta, method, beta, deterministic):
    """E over the 6 unordered pairs (uniform) and the preference label of the pair loss."""
    s = torch.log_softmax(theta, 0) - LOG_REF                                       # log π/π_ref (4,)
    total = 0
    for a in range(4):
        for b in range(4):
            if a == b:
                continue
            diff = REWARD[a] - REWARD[b]
            p = float(diff > 0) if deterministic else torch.sigmoid(diff)            # P(a ≻ b)
            h = (s[a] - s[b]).reshape(1)
            zero = torch.zeros(1, dtype=torch.float64)
            if method == "dpo":
                pair = dpo_loss(h, zero, zero, zero, beta=beta)[0]
            else:
                pair = ipo_loss(h, zero, zero, zero, tau=beta)[0]
            total = total + p * pair.sum() / 6
    return total


def fit(method, beta, deterministic, steps):
    theta = LOG_REF.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = population_loss(theta, method, beta, deterministic)
        loss.backward()
        return loss
    opt.step(closure)
    return torch.softmax(theta.detach(), 0)


def descend(method, beta, snapshots):
    """Plain gradient steps (Adam, lr 0.1): where the loss has no minimiser, the parameters drift.
    Returns the policy after each number of steps in `snapshots` (one run)."""
    theta = LOG_REF.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.1)
    out = []
    for step in range(1, max(snapshots) + 1):
        opt.zero_grad()
        population_loss(theta, method, beta, True).backward()
        opt.step()
        if step in snapshots:
            out.append(torch.softmax(theta.detach(), 0))
    return out


def test_bandit_dpo_converges_to_the_closed_form_optimum():
    beta = 0.5
    pi = fit("dpo", beta, deterministic=False, steps=500)
    target = torch.softmax(LOG_REF + REWARD / beta, 0)                              # π_ref e^{r/β} / Z
    assert (pi - target).abs().max().item() < 1e-3


def test_bandit_deterministic_preferences_dpo_collapses_ipo_stays_regularised():
    tau = 0.1
    gap = lambda pi: (torch.log(pi) - LOG_REF).max() - (torch.log(pi) - LOG_REF).min()  # noqa: E731
    dpo_short, dpo_long = descend("dpo", tau, (200, 800))
    # DPO: the winner's probability goes to 1 and the log-ratios keep growing (no finite optimum).
    assert dpo_long[0] > dpo_short[0] > 0.99 and gap(dpo_long) > gap(dpo_short) + 1
    ipo = fit("ipo", tau, True, 500)
    wins_minus_losses = torch.tensor([3.0, -1.0, 1.0, -3.0], dtype=torch.float64)    # rank by REWARD
    s = wins_minus_losses / (4 * 2 * tau)                                           # least-squares optimum
    target = torch.softmax(LOG_REF + s, 0)
    assert torch.isfinite(ipo).all() and (ipo - target).abs().max().item() < 1e-3
    assert fit("ipo", tau, True, 2000).sub(ipo).abs().max() < 1e-6                 # a fixed point, not a drift
