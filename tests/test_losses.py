"""losses.py against hand computations."""
import math

import pytest
import torch

from losses import dpo_loss, sft_loss, token_logps


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_dpo_sigmoid_hand_value():
    # h = (-1 - -3) - (-2 - -2) = 2; beta h = 1; loss = -log sigma(1) = log(1 + e^-1)
    losses, cr, rr = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert cr.item() == pytest.approx(0.5 * (-1 + 2)) and rr.item() == pytest.approx(0.5 * (-3 + 2))


def test_dpo_is_ln2_and_zero_rewards_when_policy_equals_reference():
    pc, pr = t(-5.0, -1.5, -30.0), t(-7.0, -0.2, -2.0)
    losses, cr, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    assert torch.count_nonzero(cr) == 0 and torch.count_nonzero(rr) == 0


def test_swapping_chosen_and_rejected_mirrors_the_loss():
    pc, pr, rc, rj = t(-1.0, -4.0), t(-2.0, -1.0), t(-1.5, -3.0), t(-1.0, -2.5)
    beta = 0.3
    l, cr, rr = dpo_loss(pc, pr, rc, rj, beta=beta)
    ls, crs, rrs = dpo_loss(pr, pc, rj, rc, beta=beta)
    h = (pc - pr) - (rc - rj)
    # -log sigma(x) + log sigma(-x) = -x
    assert torch.allclose(l - ls, -beta * h, atol=1e-6)
    assert torch.equal(cr, rrs) and torch.equal(rr, crs)


def test_rewards_carry_no_gradient_and_gradient_pushes_chosen_up():
    pc, pr = t(-3.0, -2.0).requires_grad_(), t(-2.0, -4.0).requires_grad_()
    losses, cr, rr = dpo_loss(pc, pr, t(-3.0, -3.0), t(-3.0, -3.0))
    assert not cr.requires_grad and not rr.requires_grad
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()   # descent raises log p(chosen), lowers log p(rejected)


def test_conservative_dpo_formula():
    eps, beta = 0.2, 0.1
    losses, _, _ = dpo_loss(t(-1.0), t(-6.0), t(-2.0), t(-3.0), beta=beta, label_smoothing=eps)
    x = beta * ((-1 + 6) - (-2 + 3))        # beta h = 0.4
    sig = 1 / (1 + math.exp(-x))
    assert losses.item() == pytest.approx(-(1 - eps) * math.log(sig) - eps * math.log(1 - sig), abs=1e-6)


def test_ipo_formula():
    beta = 0.5
    losses, _, _ = dpo_loss(t(-1.0, -2.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -1.0), beta=beta, loss_type="ipo")
    hs = [(-1 + 3) - (-2 + 2), (-2 + 2) - (-2 + 1)]   # 2 and 1
    assert losses.tolist() == pytest.approx([(h - 1 / (2 * beta)) ** 2 for h in hs])


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), loss_type="hinge?")


def test_sft_loss_is_token_mean_and_empty_row_is_zero():
    out = sft_loss(t(-6.0, -4.0, 0.0), torch.tensor([3, 2, 0]))
    assert out.tolist() == [2.0, 2.0, 0.0]
    assert torch.isfinite(out).all()


def test_token_logps_matches_log_softmax_including_chunk_edges_and_bf16():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50) * 4
    targets = torch.randint(0, 50, (3, 5))
    expected = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    got = token_logps(logits, targets, chunk_rows=4)         # 15 rows: chunks of 4, 4, 4, 3
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    got16 = token_logps(logits.bfloat16(), targets)
    expected16 = torch.log_softmax(logits.bfloat16().double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(got16.double(), expected16, atol=1e-4)


def test_the_update_is_dpo_plus_weighted_sft(tokenizer):
    """train()'s preference step (kind "dpo") on one pair: its first logged loss is the DPO loss plus 0.2 x the
    positive's token-mean NLL, with the log-probs computed here one sequence at a time (log_softmax), and the
    reference log-probs set so that h = 2: loss = log(1 + e^(-0.1 x 2)) + 0.2 x NLL, accuracy 1, margin 0.2."""
    from tiny import encode, make_model
    from train import TrainSettings, train
    model = make_model(tokenizer, seed=3)
    prompt, chosen, rejected = "USER: What is 12 + 30? ASSISTANT:", "12 + 30 = 42.", "12 + 30 = 43."

    def logp(response):                             # independent of generate.py: a plain forward and gather
        ids, mask = encode(tokenizer, prompt, response, 64)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
        token = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        return float((token * torch.tensor(mask[1:])).sum()), sum(mask)
    (pc, n), (pr, _) = logp(chosen), logp(rejected)
    reference = (torch.tensor([pc - 1.0]), torch.tensor([pr + 1.0]))        # h = (pc - pr) - (pc - 1 - pr - 1) = 2
    logged = train(model, tokenizer, [(prompt, chosen, rejected)],
                   TrainSettings(kind="dpo", lr=1e-9, batch_size=1, max_length=64, beta=0.1, sft_weight=0.2,
                                 log_every=1, progress=False, share_prompts=False), reference=reference)
    first = logged[0]
    assert first["loss"] == pytest.approx(math.log(1 + math.exp(-0.1 * 2)) + 0.2 * (-pc / n), abs=1e-4)
    assert first["dpo"] == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-4)
    assert first["accuracy"] == 1.0 and first["margin"] == pytest.approx(0.1 * 1 - 0.1 * -1, abs=1e-4)
