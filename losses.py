"""Pure tensor math: the log-prob gather and the preference / SFT losses. Imports torch only.

Every loss returns PER-EXAMPLE tensors of shape (B,) plus detached statistics; the caller reduces.
MACPO's update (train.train, kind "dpo") is the release's --stage dpo --dpo_ftx 0.2:

    L(x, y+, y-) = dpo_loss(x, y+, y-) + sft_weight * sft_loss(y+)
"""
import torch
import torch.nn.functional as F


def token_logps(logits, target_ids, chunk_rows=4096):
    """log p(target) for every row of logits: logits [..., V] (any float dtype), target_ids [...] -> [...] float32.

    log p(y) = z_y - logsumexp(z). One logit is gathered per row and the row is reduced, so no [N, V]
    log-softmax is ever stored; rows go through in chunks so a bf16 logits tensor is upcast to float32 a chunk
    at a time (a full fp32 copy of [N, 128k] logits would be the largest tensor of the step).
    """
    V = logits.shape[-1]
    flat_logits, flat_targets = logits.reshape(-1, V), target_ids.reshape(-1)
    out = []
    for s in range(0, flat_logits.shape[0], chunk_rows):
        z = flat_logits[s:s + chunk_rows].float()                                   # [n, V]
        out.append(z.gather(-1, flat_targets[s:s + chunk_rows, None]).squeeze(-1) - torch.logsumexp(z, dim=-1))
    if not out:
        return flat_logits.new_zeros(target_ids.shape, dtype=torch.float32)
    return torch.cat(out).view(target_ids.shape)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta=0.1, label_smoothing=0.0, loss_type="sigmoid"):
    """Direct Preference Optimization on summed sequence log-probs, each (B,). Returns (losses, chosen_rewards,
    rejected_rewards), each (B,); rewards are beta * (policy - reference), detached.

    h = [log pi(y+|x) - log pi(y-|x)] - [log ref(y+|x) - log ref(y-|x)]
    sigmoid  L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)      DPO (Rafailov et al. 2023, eq. 7);
             eps = label_smoothing > 0 is conservative DPO (Mitchell 2023: labels flipped with probability eps)
    ipo      L = (h - 1 / (2 beta))^2                                       IPO (Azar et al. 2023, eq. 17)
    """
    h = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose 'sigmoid' or 'ipo'")
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def sft_loss(logps, n_tokens):
    """Per-example negative log-likelihood averaged over the example's tokens, (B,):  -logps / max(n_tokens, 1).
    The release's SFT term (LLaMA-Factory's dpo_ftx) is this token average, not the sum; the clamp makes a
    fully masked row give 0, never NaN."""
    return -logps / n_tokens.clamp(min=1)


def confident_loss(logits, weak_ids, example_ids, n_examples, alpha):
    """The auxiliary confidence loss of Burns et al. (2023, "Weak-to-strong generalization", eq. 1), adapted to
    generation token by token. Burns et al. classify: L = (1 - a) CE(f(x), f_w(x)) + a CE(f(x), hard(f(x))),
    the weak label mixed with the student's own hardened prediction (thresholded). Here every response token
    is one classification over the vocabulary, teacher-forced on the weak label:

        l_t = -(1 - alpha) log p(w_t | x, w_<t) - alpha log p(argmax_v p(v | x, w_<t) | x, w_<t)

    so where the student is confident of a different token than the weak label it is pulled towards its own
    choice. The hardened target is an argmax, so no gradient flows through it. The caller warms alpha up.

    logits [N, V] at the N scored positions of a batch, weak_ids [N] the weak label's tokens there,
    example_ids [N] the example (0..n_examples-1) each position belongs to. Returns (losses (n_examples,),
    the token average of l_t per example (a fully masked example gives 0), stats) with stats["agreement"]
    (n_examples,) the share of the example's tokens whose argmax is the weak label's, detached.
    """
    hard_ids = logits.detach().argmax(-1)                                               # [N]
    token_losses = -(1 - alpha) * token_logps(logits, weak_ids) - alpha * token_logps(logits, hard_ids)   # [N]
    n = torch.zeros(n_examples, device=logits.device).index_add(0, example_ids, torch.ones_like(token_losses))
    losses = torch.zeros(n_examples, device=logits.device).index_add(0, example_ids, token_losses) / n.clamp(min=1)
    agree = torch.zeros(n_examples, device=logits.device).index_add(0, example_ids, (hard_ids == weak_ids).float())
    return losses, {"agreement": agree / n.clamp(min=1)}
