"""Training-time MoE math as pure functions: expert capacity, token dropping, drop rate,
load-balancing losses, router z-loss, gate sharpness, and the adaptive aux-coefficient rule.

Definitions (docs/training.md, "How the MoE parts work"; Skywork did not publish its capacity
rule, so the standard one is used):
- capacity per expert = ceil(capacity_factor * k * T / E) over the T tokens of one routing
  group; capacity_factor <= 0 means dropless;
- an assignment beyond its expert's capacity is dropped and contributes nothing (the residual
  stream carries the token); drop rate d = dropped assignments / (k * T);
- Skywork aux loss = sum_j (1/E - mean_i g_ij)^2 with g the post-softmax gate probabilities;
- Switch/GShard aux loss = E * sum_j f_j * P_j, f_j the fraction of the k*T assignments routed
  to expert j and P_j = mean_i g_ij (1.0 at perfect balance);
- global-batch loss: the Switch form with f_j counted over the whole optimizer step (every
  data-parallel rank and micro-batch) instead of the routing group;
- adaptive coefficient: alpha <- beta * alpha + (1 - beta) * min(xi * d, alpha_max);
- auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the gate probabilities
  for the top-k choice only, moved after each step by rate * sign(mean load - load_j) and
  re-centred to mean zero (a shift of every bias changes no choice).
"""

from __future__ import annotations

import math

import torch

DROP_POLICIES = ("probability", "position")
AUX_LOSS_TYPES = ("skywork", "switch", "global")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int,
                    capacity_factor: float) -> int | None:
    """Assignments each expert may take from a group of ``num_tokens`` tokens (None: dropless)."""
    if capacity_factor <= 0:
        return None
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)


def capacity_keep_mask(expert_ids_TK: torch.Tensor, probs_TE: torch.Tensor, group_TK: torch.Tensor,
                       num_experts: int, capacity_G: torch.Tensor, policy: str) -> torch.Tensor:
    """Which assignments survive capacity: bool [T, K].

    Within each (routing group, expert) pair the assignments are ranked, highest gate
    probability first (``"probability"``) or earliest token first (``"position"``), and the
    first ``capacity_G[group]`` are kept. A token reaches an expert at most once, so a pair's
    assignments are distinct tokens.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"unknown drop policy {policy!r}; use one of {DROP_POLICIES}")
    t, k = expert_ids_TK.shape
    flat_ids_S = expert_ids_TK.reshape(-1)
    bucket_S = group_TK.reshape(-1) * num_experts + flat_ids_S
    if policy == "probability":
        prob_S = probs_TE.gather(1, expert_ids_TK).reshape(-1)
        order_S = torch.argsort(prob_S, descending=True, stable=True)
    else:  # flat order is token-major, so a stable sort keeps earlier tokens first
        order_S = torch.arange(t * k, device=flat_ids_S.device)
    order_S = order_S[torch.argsort(bucket_S[order_S], stable=True)]
    sorted_bucket_S = bucket_S[order_S]
    bucket_sizes = torch.bincount(sorted_bucket_S, minlength=int(capacity_G.numel()) * num_experts)
    bucket_start = torch.cumsum(bucket_sizes, 0) - bucket_sizes
    rank_sorted_S = torch.arange(t * k, device=order_S.device) - bucket_start[sorted_bucket_S]
    keep_sorted_S = rank_sorted_S < capacity_G[sorted_bucket_S // num_experts]
    keep_S = torch.empty_like(keep_sorted_S)
    keep_S[order_S] = keep_sorted_S
    return keep_S.view(t, k)


def aux_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, kind: str = "skywork",
             group_T: torch.Tensor | None = None, num_groups: int = 1,
             global_load_E: torch.Tensor | None = None) -> torch.Tensor:
    """Load-balancing loss in fp32, computed per routing group and averaged with token weights
    (sum_g T_g/T * L_g), so that a batch's loss is the same however its groups are batched.

    ``kind="skywork"``: sum_j (1/E - P_j)^2; ``kind="switch"``: E * sum_j f_j * P_j, with
    P_j = mean gate probability of expert j over the group, f_j = the group's fraction of
    assignments routed to j (a count: no gradient). ``group_T`` gives each token's group
    (default: one group). ``kind="global"``: E * sum_j f_j * P_j with f_j from
    ``global_load_E``, the assignments counted over the whole optimizer step, and P_j over
    these tokens; the step's loss, the share-weighted mean of its forwards' losses, is then the
    Switch loss of the global batch, whatever the micro-batch and data-parallel split.
    """
    t, e = probs_TE.shape
    if kind == "global":
        if global_load_E is None:
            raise ValueError("the global-batch balance loss needs the step's expert load")
        f_E = global_load_E.float() / global_load_E.sum().clamp_min(1)
        return e * (f_E.to(probs_TE.device) * probs_TE.float().mean(dim=0)).sum()
    if group_T is None:
        group_T = torch.zeros(t, dtype=torch.long, device=probs_TE.device)
    tokens_G = torch.bincount(group_T, minlength=num_groups).clamp_min(1).float()
    mean_GE = probs_TE.float().new_zeros(num_groups, e).index_add_(0, group_T, probs_TE.float())
    mean_GE = mean_GE / tokens_G[:, None]
    if kind == "skywork":
        loss_G = ((1.0 / e - mean_GE) ** 2).sum(dim=-1)
    elif kind == "switch":
        k = expert_ids_TK.shape[1]
        bucket = group_T[:, None] * e + expert_ids_TK
        f_GE = torch.bincount(bucket.reshape(-1), minlength=num_groups * e).view(num_groups, e)
        loss_G = e * (f_GE.float() / (k * tokens_G[:, None]) * mean_GE).sum(dim=-1)
    else:
        raise ValueError(f"unknown aux loss {kind!r}; use one of {AUX_LOSS_TYPES}")
    return (loss_G * tokens_G).sum() / t


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def gate_sharpness(probs_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ratios Max1/Max2 and Max2/Max3 of the sorted gate probabilities, summed over
    tokens (divide by the token count for the mean). Needs at least 3 experts."""
    top3 = torch.topk(probs_TE.float(), 3, dim=-1).values
    return (top3[:, 0] / top3[:, 1]).sum(), (top3[:, 1] / top3[:, 2]).sum()


def updated_aux_coef(alpha: float, drop_rate: float, xi: float = 0.2, alpha_max: float = 0.01,
                     beta: float = 0.99) -> float:
    """One step of Skywork's adaptive rule: beta * alpha + (1 - beta) * min(xi * d, alpha_max)."""
    return beta * alpha + (1.0 - beta) * min(xi * drop_rate, alpha_max)


def updated_expert_bias(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """One step of auxiliary-loss-free balancing: each expert's bias moves by ``rate`` toward
    balance (up when it got fewer than the mean number of assignments, down when more, not
    when exactly the mean), then all are shifted to mean zero. Returns a new fp32 tensor."""
    step_E = torch.sign(load_E.float().mean() - load_E.float()) * rate
    updated = bias_E.float() + step_E.to(bias_E.device)
    return updated - updated.mean()


class AuxCoefController:
    """Per-layer aux-loss coefficients, updated once per optimizer step from that step's drop
    rates (``adaptive=True``), or kept at their initial value (fixed-coefficient mode)."""

    def __init__(self, num_layers: int, initial: float, adaptive: bool = True, xi: float = 0.2,
                 alpha_max: float = 0.01, beta: float = 0.99) -> None:
        self.alphas = [float(initial)] * num_layers
        self.adaptive, self.xi, self.alpha_max, self.beta = adaptive, xi, alpha_max, beta

    def step(self, drop_rates: list[float]) -> list[float]:
        """Apply one update per layer; returns the coefficients for the next step."""
        if len(drop_rates) != len(self.alphas):
            raise ValueError(f"got {len(drop_rates)} drop rates for {len(self.alphas)} layers")
        if self.adaptive:
            self.alphas = [updated_aux_coef(a, d, self.xi, self.alpha_max, self.beta)
                           for a, d in zip(self.alphas, drop_rates)]
        return list(self.alphas)

    def state_dict(self) -> dict:
        return {"alphas": list(self.alphas), "adaptive": self.adaptive, "xi": self.xi,
                "alpha_max": self.alpha_max, "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        if len(state["alphas"]) != len(self.alphas):
            raise ValueError(f"controller state has {len(state['alphas'])} layers, the model "
                             f"has {len(self.alphas)} MoE layers")
        self.alphas = [float(a) for a in state["alphas"]]
        self.adaptive, self.xi = bool(state["adaptive"]), float(state["xi"])
        self.alpha_max, self.beta = float(state["alpha_max"]), float(state["beta"])


class ExpertBiasController:
    """Every MoE layer's routing bias (auxiliary-loss-free balancing) by global layer index,
    moved once per optimizer step from that step's expert loads (``updated_expert_bias``).

    Every rank keeps all layers' biases and updates them from the same whole-step loads, so
    the copies agree; ``copy_into`` then sets the blocks a rank holds. The biases travel in the
    model's checkpoints (``expert_bias`` tensors), so the controller has no state of its own.
    """

    def __init__(self, biases: dict[int, torch.Tensor], rate: float) -> None:
        self.biases = {i: b.detach().float().cpu().clone() for i, b in biases.items()}
        self.rate = rate

    def step(self, loads: dict[int, torch.Tensor]) -> None:
        for i in self.biases:
            self.biases[i] = updated_expert_bias(self.biases[i], loads[i].cpu(), self.rate)

    @torch.no_grad()
    def copy_into(self, blocks: dict[int, "torch.nn.Module"]) -> None:
        """Write the biases into the ``expert_bias`` buffers of ``blocks`` (by layer index)."""
        for i, block in blocks.items():
            block.expert_bias.copy_(self.biases[i])

    def ranges(self) -> tuple[list[float], list[float]]:
        """Per layer (in layer order), the smallest and the largest bias."""
        order = sorted(self.biases)
        return ([float(self.biases[i].min()) for i in order],
                [float(self.biases[i].max()) for i in order])
