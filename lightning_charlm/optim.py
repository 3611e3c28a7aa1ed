"""Muon for the matrices inside the blocks and AdamW for the rest, as one torch optimizer; the lr schedule."""

from __future__ import annotations

import math

import torch

# Keller Jordan's quintic Newton-Schulz coefficients (as torch.optim.Muon's): steep at zero, so five steps
# bring every singular value of the update near 1.
NS_COEFFICIENTS, NS_STEPS = (3.4445, -4.7750, 2.0315), 5


def orthogonalize(g: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """About U V^T of g = U S V^T, by Newton-Schulz. By default in bf16 on CUDA (tensor cores), as
    torch.optim.Muon always does; in float32 elsewhere: on a CPU without bf16 matrix units torch's bf16
    iteration made a gpt-cpu step 3x slower (benchmarks/recipe.py), in float32 it adds a few percent."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype or (torch.bfloat16 if g.is_cuda else torch.float32))
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x  # the Gram matrix of the short side: fewer flops
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon over `muon_groups` (2-D weights: momentum, then the orthogonalised update) and torch's AdamW
    over `adamw_groups` (embeddings, head, norm gains), behind one optimizer: one list of param groups, which
    the lr schedule scales together, and one state dict, which a checkpoint saves and a resume restores.

    Muon's update is scaled to the RMS of an AdamW update (0.2 * sqrt(max(rows, cols)), Moonshot's rule,
    torch's adjust_lr_fn "match_rms_adamw"), so one learning rate serves both."""

    def __init__(self, muon_groups, adamw_groups, lr: float, betas=(0.9, 0.99), fused=False, momentum=0.95):
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, fused=fused)
        muon = [{"momentum": momentum, "weight_decay": 0.0, **g, "muon": True} for g in muon_groups]
        super().__init__(muon + self.adamw.param_groups, {"lr": lr})
        self._link()

    def _link(self) -> None:
        """AdamW works on this optimizer's own group dicts and state (load_state_dict replaces both)."""
        self.adamw.param_groups = [g for g in self.param_groups if not g.get("muon")]
        self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group.get("muon"):
                continue
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum)  # Nesterov
                p.mul_(1 - lr * group["weight_decay"])  # decoupled, as AdamW's
                p.add_(orthogonalize(update), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._link()


def warmup_cosine(
    lr: float, min_lr: float, warmup: int, total: int, saved: dict | None = None, resumed_at: int = 0
):
    """The lr factor per step: linear warmup over `warmup` steps, then cosine decay to min_lr at step
    `total`. A run resumed after its warmup with another total than its `saved` schedule decays from the
    factor it had reached at `resumed_at`, instead of jumping to where a run of the new length would be.
    Returns the factor (a plain function: LambdaLR would save a callable object's state, and a resume would
    put the old schedule's back), the state to save for later resumes, and the change in words (or None)."""
    floor, change = min_lr / lr, None
    saved = saved or {"total": total, "start": None, "start_factor": 1.0}
    start, start_factor = saved["start"], saved["start_factor"]

    def factor_of(step: int, total: int, start: int | None, start_factor: float) -> float:
        if start is None and step < warmup:
            return (step + 1) / (warmup + 1)
        start = warmup if start is None else start
        if total <= start:
            return start_factor
        progress = min(1.0, (step - start) / (total - start))
        return floor + (start_factor - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    if saved["total"] != total and resumed_at > warmup:
        old = factor_of(resumed_at, saved["total"], start, start_factor)
        if old - floor > 1e-6:
            change = f"now decays from {lr * old:.3g} at step {resumed_at} to {min_lr:.3g} at step {total}"
        else:  # a finished schedule: training on at min_lr, not a restart of the warmup and decay
            change = f"had reached min_lr ({min_lr:.3g}): the steps added run at min_lr"
        change = f"max_steps {saved['total']} -> {total}: the learning rate {change}"
        start, start_factor = resumed_at, old
    state = {"total": total, "start": start, "start_factor": start_factor}
    return (lambda step: factor_of(step, total, start, start_factor)), state, change
