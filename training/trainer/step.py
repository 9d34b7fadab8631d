"""One optimisation step of the TopK SAE over a global batch split across ranks.

loss = Σ_ranks ‖x − x̂‖² / D  +  aux_coef · scale · Σ_ranks ‖ê − (x − x̂)‖² / D,
D = Σ_ranks ‖x − mean_global(x)‖² (sparsify's FVU and AuxK, with global sums).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from steering.sae import TopKSAE
from training.trainer.config import TrainConfig
from training.trainer.distributed import DistEnv
from training.trainer.encode import Encoded, topk_encode


@dataclass
class StepStats:
    """Per-step figures, as device tensors (no host sync), global over ranks where noted."""

    fvu: Tensor          # this rank's share of the global FVU (sum over ranks = global FVU)
    auxk: Tensor         # this rank's share of the (scaled) AuxK loss
    active: Tensor       # number of non-zero latents over this rank's tokens
    num_dead: int        # dead latents entering this step (global)


def global_denominator(x: Tensor, env: DistEnv, total_rows: int) -> Tensor:
    """Σ over the global batch of ‖x − mean(x)‖², the mean taken over the global batch."""
    s = env.all_reduce_(x.sum(dim=0, dtype=torch.float64))
    mean = (s / total_rows).to(x.dtype)
    den = env.all_reduce_((x - mean).pow(2).sum(dtype=torch.float64).reshape(1))
    return den.to(x.dtype).squeeze(0).clamp_min(torch.finfo(x.dtype).tiny)


def sae_losses(sae: TopKSAE, x: Tensor, den: Tensor, pre: Tensor, dead: Tensor | None,
               k_aux: int) -> tuple[Tensor, Tensor, Encoded]:
    """(fvu share, scaled auxk share, encoding) of x [B, d]; both losses divide by ``den``."""
    enc = topk_encode(x, sae.b_dec, sae.encoder.weight, sae.encoder.bias, sae.k, pre,
                      dead, k_aux)
    x_hat = sae.decode(enc.values, enc.indices)
    e = x - x_hat
    fvu = e.pow(2).sum() / den
    if enc.aux_indices.shape[1]:
        num_dead = dead.numel() if dead is not None else 0
        scale = min(num_dead / k_aux, 1.0)
        e_hat = F.embedding_bag(enc.aux_indices, sae.W_dec, per_sample_weights=enc.aux_values,
                                mode="sum")
        auxk = scale * (e_hat - e.detach()).pow(2).sum() / den
    else:
        auxk = fvu.new_zeros(())
    return fvu, auxk, enc


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """LR multiplier: linear warm-up over warmup_steps, then linear decay to 0 at total_steps."""
    warm, total = cfg.warmup_steps, cfg.total_steps
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / (total - warm))


class TrainStep:
    """Owns the SAE, Adam, the LR schedule, the dead-latent counters and the scratch buffer."""

    def __init__(self, cfg: TrainConfig, sae: TopKSAE, env: DistEnv) -> None:
        """Build Adam + warm-up/linear-decay LambdaLR for ``sae`` (already on env.device)."""
        self.cfg, self.sae, self.env = cfg, sae, env
        self.local_batch = cfg.local_batch(env.world_size)
        dev = env.device
        fused = dev.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(cfg, step))
        self.tokens_since_fired = torch.zeros(cfg.num_latents, dtype=torch.int64, device=dev)
        gemm_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        self.pre = torch.empty(self.local_batch, cfg.num_latents, dtype=gemm_dtype, device=dev)

    def dead_latents(self) -> Tensor | None:
        """Ids of latents that have not fired for more than dead_tokens tokens, or None."""
        if self.cfg.aux_coef == 0:
            return None
        dead = torch.nonzero(self.tokens_since_fired > self.cfg.dead_tokens).squeeze(1)
        return dead if dead.numel() else None

    def forward_backward(self, x: Tensor) -> StepStats:
        """Losses on this rank's rows and their gradients, summed over ranks."""
        if x.shape != (self.local_batch, self.cfg.d_in):
            raise ValueError(f"batch is {list(x.shape)}, expected "
                             f"{[self.local_batch, self.cfg.d_in]}")
        den = global_denominator(x, self.env, self.cfg.batch_size)
        dead = self.dead_latents()
        fvu, auxk, enc = sae_losses(self.sae, x, den, self.pre, dead, self.cfg.effective_aux_k)
        self.optimizer.zero_grad(set_to_none=True)
        (fvu + self.cfg.aux_coef * auxk).backward()
        self.env.sum_gradients_(self.sae)
        self._update_dead(enc)
        return StepStats(fvu=fvu.detach(), auxk=auxk.detach(),
                         active=(enc.values > 0).sum(),
                         num_dead=0 if dead is None else dead.numel())

    def apply(self) -> None:
        """Parallel-gradient removal, grad clip, Adam, LR step, decoder re-normalisation."""
        self.sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.sae.set_decoder_norm_to_unit_norm()

    def __call__(self, x: Tensor) -> StepStats:
        """A whole step on this rank's batch x."""
        stats = self.forward_backward(x)
        self.apply()
        return stats

    @torch.no_grad()
    def _update_dead(self, enc: Encoded) -> None:
        fired = torch.zeros(self.cfg.num_latents, dtype=torch.int32, device=self.env.device)
        fired.index_add_(0, enc.indices.reshape(-1), (enc.values > 0).reshape(-1).to(torch.int32))
        self.env.all_reduce_(fired)
        self.tokens_since_fired += self.cfg.batch_size
        self.tokens_since_fired.masked_fill_(fired > 0, 0)
