"""DiffHammer (Wang et al., NeurIPS 2024): the selective EM attack with N-evaluation and gradient
grafting, with the exact trajectory of the representative purification.

Per evaluated iterate, N purifications p_i of the [0,1] iterate run as ONE batched forward pass
without a graph (``x.repeat(N, 1, 1, 1)``); per copy the loss L_i, whether it is misclassified, and
the classifier-only gradient g_i = dL_i/dp at p_i. The representative j* (per image) maximises
sum_i ELU(L_i + eps <u(g_j), g_i>), u the threat model's unit step (Linf: sign, L2: the
L2-normalised gradient, as the reference's code); the E-step weights are
q_i = sigmoid(5 (L_i + <u(g_j*), g_i>)); the grafted output gradient g~ = sum q_i g_i / sum q_i is
back-propagated through purification j* alone: g = J_phi_j*(x)^T g~. Purification j* is recomputed
with a graph from the very noise copy j* drew (noise.CopyReplay from a snapshot of the streams
taken before the batched pass): the same noise bit for bit, the same schedule, so the same
trajectory up to the rounding of matrix products, which depends on the number of rows (B for the
replay, N x B for the batched pass: about 1e-7 in the tiny tests). The largest difference seen is
kept in the history (``replay_deviation``); one above REPLAY_TOLERANCE is a bug and stops the run.
The released code instead chained a coarse surrogate over states of the fine forward, which gives
wrong gradients.

The gradient is smoothed, G_t = t^-0.5 g + (1 - t^-0.5) G_{t-1} (t the step, from 1), and drives
APGD's step (apgd.py: first step 2 eps, momentum 0.75, per-image step-size checkpoints that halve
the step and go back to the restart's best iterate). One restart per loss of ``losses`` (default CW
margin, CE, DLR, ``steps`` iterations each, from a new random start); restarts after the first
attack only the images whose average success so far is at most ``restart_threshold``. A restart
stops early once every purification of every image it attacks is misclassified.

N-evaluation: the N purifications of every evaluated iterate (the clean image first) are also its
evaluation. Per image "Wor" is broken once any purification of any evaluated iterate is
misclassified, "Avg" is the highest fraction of misclassified purifications of one iterate; the
returned example is that iterate (ties: an attacked iterate over the clean image, within a restart
the higher mean loss, else the earlier). The runner still re-evaluates it under fresh noise, as
every attack's. The purification is ``purify``: for GDMP one path (its prediction averages the
logits of ``paths`` paths), so there Avg and Wor are over single-path predictions; with
"surrogate:K" gradients they describe the surrogate the attack runs, not the defense.

Differences from the released code (DiffHammer's attacker.py), each for a reason:
- the exact trajectory of j*, as above (the point of this implementation);
- the checkpoints and the halving rule are APGD-EOT's (apgd.py), and only images whose step is
  halved go back to their best iterate, with that iterate's gradient (the released code sends
  every image back, and steps with the gradient of the iterate it left);
- the schedule's loss of an iterate is the highest of its N losses, as the released code's;
- images a restart leaves out are not run at all (the released code refills its batches with
  copies of attacked images); their noise streams go on where they were (noise.subset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..defenses.base import Defense
from ..diffusion.noise import CopyReplay
from ..errors import UserError
from .apgd import APGDEOT, MOMENTUM, StepSizeSchedule, _keep_better
from .base import Attack
from .convergence import AttackHistory
from .gradients import parse_gradient_mode
from .losses import LOSSES, loss_function
from .threat import NORMS, project, uniform_in_ball

WEIGHT_SCALE = 5.0  # the E-step's sigmoid sharpness (the paper's lambda)
SMOOTHING = 0.5  # G_t = t^-SMOOTHING g + (1 - t^-SMOOTHING) G_{t-1}
REPLAY_TOLERANCE = 1e-2  # a larger difference between a purification and its replay is a bug, not rounding
BPDA_REFUSAL = "diffhammer back-propagates through the purifier's trajectory: use gradient 'full' or 'surrogate:K', not 'bpda'"


# ---------------------------------------------------------------- the EM step, pure functions


def unit_step(grads: torch.Tensor, norm: str) -> torch.Tensor:
    """The unit ascent direction of flattened gradients (..., D): Linf sign, L2 normalised."""
    if norm == "Linf":
        return grads.sign()
    return grads / grads.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def representative(losses: torch.Tensor, grads: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Per image (B,), the purification j whose eps-step along u(g_j) raises the most losses:
    argmax_j sum_i ELU(L_i + eps <u(g_j), g_i>), for losses (N, B) and flattened gradients
    (N, B, D); ties: the first."""
    inner = torch.einsum("jbd,ibd->jib", unit_step(grads, norm), grads)  # <u(g_j), g_i>
    return F.elu(losses.unsqueeze(0) + eps * inner).sum(1).argmax(0)


def e_step_log_weights(losses: torch.Tensor, grads: torch.Tensor, chosen: torch.Tensor, norm: str) -> torch.Tensor:
    """log q_i, q_i = sigmoid(5 (L_i + <u(g_j*), g_i>)) (N, B): how much purification i shares
    the vulnerability of the representative ``chosen`` (B,). In logs, because every q_i of a
    well-defended image can underflow to 0 in float32 and only their ratios matter."""
    direction = unit_step(grads[chosen, torch.arange(grads.shape[1])], norm)  # (B, D)
    return F.logsigmoid(WEIGHT_SCALE * (losses + (grads * direction).sum(-1)))


def graft(grads: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """sum_i q_i g_i / sum_i q_i (B, D) of gradients (N, B, D) and log-weights (N, B)."""
    return (torch.softmax(log_weights, 0).unsqueeze(-1) * grads).sum(0)


# ---------------------------------------------------------------- one N-evaluation


class Evaluation(NamedTuple):
    """What the N purifications of a batch of [0,1] iterates (B rows) showed: per purification
    and image (N, B) the loss and whether it was misclassified; the gradient J_phi_j*^T g~ of
    the iterates (zeros when not asked for); how far the replay of j* was from its forward."""

    losses: torch.Tensor
    wrong: torch.Tensor
    gradient: torch.Tensor
    replay_deviation: float


# ---------------------------------------------------------------- the attack


def parse_losses(losses: str | Sequence[str]) -> tuple[str, ...]:
    """One loss name per restart: "margin,ce,dlr" or a list of names."""
    names = tuple(n.strip() for n in losses.split(",")) if isinstance(losses, str) else tuple(losses)
    if not names:
        raise UserError(f"diffhammer needs at least one loss: choose from {', '.join(LOSSES)}")
    for name in names:
        loss_function(name)
    return names


@dataclass(frozen=True)
class DiffHammerHistory(AttackHistory):
    """AttackHistory (one record per evaluated iterate: the clean image, then each restart's
    start point and iterations; ``robust``: the returned iterate so far has most of its N
    purifications right; ``step_size``: 0 where an image is not attacked) plus, per record and
    image (records, B), the N-evaluation: ``avg``, the highest fraction of misclassified
    purifications of one iterate so far, and ``wor``, whether any purification of any iterate so
    far was misclassified; and ``replay_deviation``, the largest difference between the
    representative's forward and its replay (0.0 when exact)."""

    avg: torch.Tensor
    wor: torch.Tensor
    replay_deviation: float

    @property
    def avg_success(self) -> torch.Tensor:
        """Per image (B,), DiffHammer's "Avg" success; its robust accuracy is 1 - the mean."""
        return self.avg[-1]

    @property
    def worst_broken(self) -> torch.Tensor:
        """Per image (B,), DiffHammer's "Wor": broken by some purification of some iterate."""
        return self.wor[-1]


@dataclass(frozen=True)
class DiffHammer(Attack):
    norm: str = "Linf"
    eps: float = 8 / 255
    losses: str | tuple[str, ...] = ("margin", "ce", "dlr")
    steps: int = 50
    purifications: int = 10
    restart_threshold: float = 0.5
    rho: float = 0.75
    random_start: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.norm not in NORMS:
            raise UserError(f"unknown norm {self.norm!r}: choose Linf or L2")
        object.__setattr__(self, "losses", parse_losses(self.losses))
        if self.eps < 0 or self.steps < 0 or self.purifications < 1 or not 0 <= self.rho <= 1:
            raise UserError("diffhammer needs eps >= 0, steps >= 0, purifications >= 1 and 0 <= rho <= 1")
        if not 0 <= self.restart_threshold <= 1:
            raise UserError(f"diffhammer restart_threshold must be in [0, 1], got {self.restart_threshold}")

    @property
    def name(self) -> str:
        threshold = f", restart if avg <= {self.restart_threshold:g}" if self.restart_threshold != 0.5 else ""
        start = "" if self.random_start else ", no random start"
        rho = f", rho {self.rho:g}" if self.rho != 0.75 else ""
        return f"DiffHammer({self.norm}, {'/'.join(self.losses)}, {self.steps} iter, N {self.purifications}{threshold}{start}{rho})"

    def check_target(self, gradient: str, defense) -> None:
        if parse_gradient_mode(gradient)[0] == "bpda":
            raise UserError(BPDA_REFUSAL)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Adversarial examples for [0,1] images ``x`` with labels ``y`` against the Defense ``model``."""
        return self.perturb_with_history(model, x, y, progress)[0]

    def perturb_with_history(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False,
    ) -> tuple[torch.Tensor, DiffHammerHistory]:
        """The adversarial examples and the N-evaluation of every iterate (DiffHammerHistory)."""
        if not isinstance(model, Defense):  # BPDA's module, or a bare classifier
            raise UserError(BPDA_REFUSAL)
        x = x.detach()
        generator = torch.Generator(x.device).manual_seed(self.seed)
        clean = self.evaluate(model, x, y, self.losses[0], gradient=False)
        frac = clean.wrong.float().mean(0)
        # per image: the returned iterate, its fraction misclassified and mean loss, its restart (-1: clean)
        best = [x, frac, clean.losses.mean(0), torch.full_like(y, -1)]
        avg, wor, deviation = frac, clean.wrong.any(0), clean.replay_deviation
        zero = torch.zeros(y.shape, dtype=x.dtype, device=x.device)
        records = [(best[1] < 0.5, best[2], zero, avg, wor)]
        with tqdm(total=len(self.losses) * (self.steps + 1), desc="DiffHammer", leave=False, disable=not progress) as bar:
            for restart, loss_name in enumerate(self.losses):
                rows = torch.arange(len(y), device=x.device) if restart == 0 else (avg <= self.restart_threshold).nonzero()[:, 0]
                if len(rows) == 0:
                    break
                with model.drawing_noise_from(model.noise.subset(rows.tolist())):
                    for x_adv, ev, step_size in self.iterates(model, x[rows], y[rows], loss_name, generator):
                        frac, mean_loss = ev.wrong.float().mean(0), ev.losses.mean(0)
                        old = [b[rows] for b in best]
                        # ties: an attacked iterate over the clean image, within a restart the higher loss
                        tie_won = (old[3] < 0) | ((old[3] == restart) & (mean_loss > old[2]))
                        better = (frac > old[1]) | ((frac == old[1]) & tie_won)
                        new = _keep_better(better, (x_adv, frac, mean_loss, torch.full_like(old[3], restart)), old)
                        best = [b.index_copy(0, rows, n) for b, n in zip(best, new)]
                        avg = avg.index_copy(0, rows, torch.maximum(avg[rows], frac))
                        wor = wor.index_copy(0, rows, wor[rows] | ev.wrong.any(0))
                        deviation = max(deviation, ev.replay_deviation)
                        records.append((best[1] < 0.5, best[2], zero.index_copy(0, rows, step_size), avg, wor))
                        bar.update()
        robust, best_loss, step_size, avg_rec, wor_rec = (torch.stack(column) for column in zip(*records))
        history = DiffHammerHistory(
            robust=robust, best_loss=best_loss, step_size=step_size, avg=avg_rec, wor=wor_rec, replay_deviation=deviation,
        )
        return best[0].detach(), history

    def iterates(self, model: Defense, x: torch.Tensor, y: torch.Tensor, loss_name: str, generator: torch.Generator):
        """One restart: per evaluated iterate, the iterate, its Evaluation and the step size in
        force after the iterate's checkpoint decision."""
        x_adv = x
        if self.random_start:
            x_adv = project(x + uniform_in_ball(x, self.norm, self.eps, generator), x, self.norm, self.eps)
        ev = self.evaluate(model, x_adv, y, loss_name, gradient=self.steps > 0)
        loss, grad = ev.losses.amax(0), ev.gradient  # the schedule's loss: the highest of the N
        schedule = StepSizeSchedule.start(x_adv, loss, grad, self.eps, self.steps, self.rho)
        apgd = APGDEOT(norm=self.norm, eps=self.eps)  # for its step
        x_prev, smoothed = x_adv, None
        for i in range(self.steps + 1):
            if i > 0:
                weight = i ** -SMOOTHING
                smoothed = grad if smoothed is None else weight * grad + (1 - weight) * smoothed
                x_next = apgd.step(x_adv, x_prev, smoothed, schedule.step_size, x, MOMENTUM if i > 1 else 1.0)
                x_prev, x_adv, last_loss = x_adv, x_next, loss
                ev = self.evaluate(model, x_adv, y, loss_name, gradient=i < self.steps)
                loss, grad = ev.losses.amax(0), ev.gradient
                schedule.observe(x_adv, loss, grad, last_loss)
            evaluated = x_adv
            x_adv, grad = schedule.checkpoint(i, x_adv, grad)
            yield evaluated, ev, schedule.step_size
            if ev.wrong.all():  # every purification of every image misclassified: nothing to gain
                return

    def evaluate(self, model: Defense, x_adv: torch.Tensor, y: torch.Tensor, loss_name: str, gradient: bool) -> Evaluation:
        """The N-evaluation of the [0,1] iterates ``x_adv`` and, with ``gradient``, the grafted
        gradient through the representative purification's exact trajectory."""
        n, rows = self.purifications, x_adv.shape[0]
        snapshot = model.noise.snapshot() if gradient else None
        with torch.no_grad():
            purified = model.purify(x_adv.detach().repeat(n, 1, 1, 1))
        with torch.enable_grad():
            p = purified.requires_grad_(True)
            logits = model.classifier(p)
            losses = loss_function(loss_name)(logits, y.repeat(n))
            grads, = torch.autograd.grad(losses.sum(), p)
        losses, grads = losses.detach().view(n, rows), grads.view(n, rows, -1)
        wrong = (logits.detach().argmax(1) != y.repeat(n)).view(n, rows)
        if not gradient:
            return Evaluation(losses, wrong, torch.zeros_like(x_adv), 0.0)
        chosen = representative(losses, grads, self.eps, self.norm)
        grafted = graft(grads, e_step_log_weights(losses, grads, chosen, self.norm)).view_as(x_adv)
        x_in = x_adv.detach().requires_grad_(True)
        with torch.enable_grad(), model.drawing_noise_from(CopyReplay(snapshot, n, chosen)):
            replayed = model.purify(x_in)
            grad, = torch.autograd.grad(replayed, x_in, grad_outputs=grafted)
        forward = purified.view(n, rows, *x_adv.shape[1:])[chosen, torch.arange(rows)]
        deviation = (replayed.detach() - forward).abs().max().item() if rows else 0.0
        if deviation > REPLAY_TOLERANCE:  # a bug (noise drawn outside generator(x)), never a result
            raise RuntimeError(f"diffhammer's replay of the representative purification is off by {deviation:g}")
        return Evaluation(losses, wrong, grad.detach(), deviation)
