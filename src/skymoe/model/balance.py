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
- adaptive coefficient: alpha <- beta * alpha + (1 - beta) * min(xi * d, alpha_max).
"""

from __future__ import annotations

import math

import torch

DROP_POLICIES = ("probability", "position")
AUX_LOSS_TYPES = ("skywork", "switch")


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
             group_T: torch.Tensor | None = None, num_groups: int = 1) -> torch.Tensor:
    """Load-balancing loss in fp32, computed per routing group and averaged with token weights
    (sum_g T_g/T * L_g), so that a batch's loss is the same however its groups are batched.

    ``kind="skywork"``: sum_j (1/E - P_j)^2; ``kind="switch"``: E * sum_j f_j * P_j, with
    P_j = mean gate probability of expert j over the group, f_j = the group's fraction of
    assignments routed to j (a count: no gradient). ``group_T`` gives each token's group
    (default: one group).
    """
    t, e = probs_TE.shape
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
