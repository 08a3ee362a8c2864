"""``--meta-grad fd`` / ``exact``: the meta-gradient on all parameters through the one-step look-ahead
theta'(w) = theta - lr * grad(sum_i w_i l_i / denom) (core/metagrad.py), as in L2RW, MW-Net and the paper.

The glue supplies ``lookahead() -> (params, train_losses, meta_loss)``: the student's parameters and its
per-example training losses / clean meta loss as functions of a parameter dict (draw the meta batch there).
This strategy replays them with the random state of the real forward, so dropout masks match. The teacher
takes its step before the student's (the weights the student trains with come from the updated teacher).
"""

import contextlib
from typing import Callable, Dict, Optional, Tuple

import torch

from ..metagrad import MetaGrad, capture_rng, fixed_rng, weight_gradient


class LookAhead:
    def __init__(self, reweighter, mode: str = "fd", fd_eps: float = 1e-3, **fast_only):
        """``fd_eps``: the finite-difference step of ``fd`` (relative to the parameter norm); options of
        ``--meta-grad fast`` (``fast_only``) are accepted and unused."""
        if mode not in ("fd", "exact"):
            raise ValueError(f"LookAhead: mode must be fd or exact, got {mode!r}")
        self.rw, self.mode, self.fd_eps = reweighter, mode, fd_eps
        self._rng = None
        self._active = self._real = False

    def begin_update(self, step: int, real: bool = True, **unused) -> None:
        self._real = real
        self._active = real and self.rw.is_meta_step(step)

    @contextlib.contextmanager
    def forward(self, device: torch.device):
        """Around the student's training forward: its random state, for the replays."""
        self._rng = capture_rng(device)
        yield

    def meta_grad_fn(self, lookahead: Callable[[], tuple], losses: torch.Tensor, lr: float, denom: float):
        """``w -> MetaGrad`` for this batch (``losses``: the real forward's, with graph)."""
        return replayed(lookahead(), losses, lr, denom, self.mode, self.fd_eps, self._rng)

    def weights(self, step: int, features: Optional[torch.Tensor], losses: torch.Tensor, lr: float, denom: float,
                lookahead: Optional[Callable[[], tuple]] = None,
                ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        n = losses.shape[0]
        if not self._real:
            return torch.ones(n, device=losses.device), {}
        fn = self.meta_grad_fn(lookahead, losses, lr, denom) if self._active else None
        with torch.autograd.profiler.record_function("reweight"):
            return self.rw.weights(step, features, fn, batch_size=n, device=losses.device, ids=ids)

    def after_backward(self, weights: torch.Tensor, info: Dict[str, float], loss_scale: float = 1.0) -> None:
        pass  # the teacher stepped in `weights`

    def end_update(self, step: int) -> bool:
        rw = self.rw
        rw.end_update()
        return rw.has_teacher and rw.is_meta_step(step) and rw.check_in_sync(step)

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: Optional[dict]) -> None:
        pass


def replayed(fns: tuple, losses: torch.Tensor, lr: float, denom: float, mode: str = "fd", fd_eps: float = 1e-3,
             rng=None) -> Callable[[torch.Tensor], MetaGrad]:
    """``w -> dL_meta(theta'(w))/dw`` (core/metagrad.py) from ``fns = (params, train_losses, meta_loss)``; the
    training losses are replayed with ``rng`` (captured before the real forward), the meta loss with the random
    state of now, so every replay sees the same dropout masks."""
    params, train_losses, meta_loss = fns
    device = losses.device
    rng = rng if rng is not None else capture_rng(device)
    meta_rng = capture_rng(device)

    def replay_train(p):
        with fixed_rng(rng, device):
            return train_losses(p)

    def replay_meta(p):
        with fixed_rng(meta_rng, device):
            return meta_loss(p)

    def fn(w: torch.Tensor) -> MetaGrad:
        with torch.autograd.profiler.record_function("meta_gradient"):
            return weight_gradient(params, replay_train, replay_meta, w, lr, denom, mode=mode, fd_eps=fd_eps,
                                   losses=losses)
    return fn
