"""`FlexLoRALayer`: the SVD-form adapter ΔW = P·diag(λ)·Q wrapped around one frozen linear layer.

Owns the adapter tensors of one matrix and every operation on them: forward, prune, expand, the orthogonality term
(eq. 2), ΔW, compact export/import and merging. It wraps (never replaces) the base layer, so the same code serves
`nn.Linear`, GPT-2's `Conv1D` (weight stored as (in, out)) and bitsandbytes `Linear4bit`.

Fixed shapes, active prefix: the layer holds `capacity` slots (`P` (out, R), `lam` (R,), `Q` (R, in)) and its
active directions are always the *prefix* [0, rank). Forward, backward and eq. 2 slice that prefix (views, no copies)
and so cost exactly what a rank-`rank` LoRA costs; parameters never change shape (DDP buckets, `optimizer.pt`,
resume and in-place optimizer surgery keep working). Pruning moves the last active direction into the hole (its
optimizer moments move with it, `optim.surgery.move_slots`), expansion activates slot `rank`. Inactive slots hold
exact zeros and get exactly zero gradient. Chosen over an index tensor + `index_select` because slicing adds no
gather/scatter kernels and no (…, R) copies to every step; the price is a slot move at pruning, i.e. at an event.
`rank` is a host integer (read by the forward without a device sync), mirrored in the `lora_rank` buffer so a
`state_dict` round trip keeps it. torch.compile sees a new shape at each event (use `dynamic=True`).

Dtype policy (as PEFT's LoRA layer): the adapter keeps its own dtype (fp32 by default, also on bf16 / 4-bit bases);
outside autocast the input is cast to it and ΔW·x is cast back to the base output's dtype; under autocast nothing is
cast by hand (autocast runs both matmuls in its dtype), so bf16 inputs are never copied to fp32 for nothing.

Initialisation (`init_basis`, drawn and documented in `directions.initial_directions`): ΔW = 0, the paper's "zero
impact". New directions get λ = 0 and a draw orthogonalised against the active ones (unit norm; Gaussian basis: at
init_scale). Importance reads ΔW's real spectrum (`spectrum`) and pruning first rotates the directions onto ΔW's SVD
(`rotate_to_svd`), so neither assumes that eq. 2 has made P and Q orthonormal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import INIT_BASES
from ..constants import GAUSSIAN_INIT_STD, SMALL_INIT_VALUE
from ..functional.spectrum import factored_svd, gram_singular_values
from .directions import gaussian_direction, initial_directions, orthogonalize

logger = logging.getLogger(__name__)


def _is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def is_linear4bit(layer: nn.Module) -> bool:
    """Whether `layer` is a bitsandbytes 4-bit linear layer (matched by class name: never imports bitsandbytes)."""
    return type(layer).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")


def is_supported_layer(layer: nn.Module) -> bool:
    """Layers FlexLoRA can wrap: nn.Linear (incl. bitsandbytes Linear4bit/Linear8bitLt) and GPT-2 Conv1D."""
    return isinstance(layer, nn.Linear) or _is_conv1d(layer) or is_linear4bit(layer)


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported layer."""
    if _is_conv1d(layer):
        w: Any = layer.weight  # (in, out)
        return int(w.shape[0]), int(w.shape[1])
    return int(layer.in_features), int(layer.out_features)  # type: ignore[arg-type]


class FlexLoRALayer(nn.Module):
    """A frozen base linear layer plus a FlexLoRA adapter with `capacity` slots, `r` of them active at start.

    Args:
        base_layer (`nn.Module`): `nn.Linear`, `Conv1D` or bitsandbytes `Linear4bit`; frozen by the caller.
        r (`int`): initial active rank.
        capacity (`int`): number of slots (the module's rank cap), `>= r`.
        lora_alpha (`float`): scaling numerator; `scaling = lora_alpha / r` with the initial `r`, never updated, so
            pruning a zero-λ direction or adding a new one leaves the output unchanged.
        lora_dropout (`float`): dropout on the adapter input.
        init_scale (`float`): std of the Gaussian P, Q (`init_basis="gaussian"` only).
        init_basis (`str`): `"orthonormal"`, `"lora_like"` or `"gaussian"` (see the module docstring).
        generator (`torch.Generator`, *optional*): CPU generator for the initial draw.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        capacity: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_scale: float = GAUSSIAN_INIT_STD,
        init_basis: str = "orthonormal",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if capacity < r:
            raise ValueError(f"FlexLoRALayer: capacity={capacity} must be >= r={r}.")
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_shape(base_layer)
        if r > min(self.in_features, self.out_features):
            raise ValueError(
                f"FlexLoRALayer: r={r} exceeds min(d_in, d_out)={min(self.in_features, self.out_features)} "
                f"of a ({self.out_features} x {self.in_features}) layer; lower r."
            )
        self.r_init = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.init_scale = init_scale
        if init_basis not in INIT_BASES:
            raise ValueError(f"FlexLoRALayer: init_basis={init_basis!r} must be one of {INIT_BASES}.")
        self.init_basis = init_basis
        self.fan_in_fan_out = _is_conv1d(base_layer)
        self.lora_dropout: nn.Module = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.orth_in_forward = False  # FSDP2 (sharding.py): eq. 2 taken in the forward, where P and Q are whole
        self.orth_term: torch.Tensor | None = None

        device = self._base_device()
        self.lora_P = nn.Parameter(torch.zeros(self.out_features, capacity, device=device))  # (out, R)
        self.lora_lam = nn.Parameter(torch.zeros(capacity, device=device))  # (R,)
        self.lora_Q = nn.Parameter(torch.zeros(capacity, self.in_features, device=device))  # (R, in)
        self._rank = r
        self.lora_rank: torch.Tensor
        self.register_buffer("lora_rank", torch.tensor(r, dtype=torch.long, device=device))  # mirrors `rank`
        self.slot_birth: dict[int, int] = {}  # slot -> optimizer step it was activated at (young slots only)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        with torch.no_grad():
            P, lam, Q = initial_directions(self.out_features, self.in_features, r, init_basis, init_scale, gen)
            self.lora_P[:, :r], self.lora_lam[:r], self.lora_Q[:r] = P.to(device), lam.to(device), Q.to(device)

    def _base_device(self) -> torch.device:
        for t in self.base_layer.parameters():
            return t.device if t.device.type != "meta" else torch.device("cpu")
        return torch.device("cpu")

    # ------------------------------------------------------------------ properties
    @property
    def capacity(self) -> int:
        return int(self.lora_lam.shape[0])

    @property
    def rank(self) -> int:
        """Number of active directions: slots [0, rank)."""
        return self._rank

    def _set_rank(self, r: int) -> None:
        self._rank = r
        self.lora_rank.fill_(r)  # a device write, never read back in a step

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "lora_rank" in state_dict:  # a state_dict round trip (accelerate save_state) restores the rank
            self._rank = int(state_dict[prefix + "lora_rank"])

    @property
    def lora_active(self) -> torch.Tensor:
        """Boolean mask of the active slots (R,), derived from `rank` (the active slots are a prefix)."""
        return torch.arange(self.capacity, device=self.lora_lam.device) < self._rank

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads `.weight` of projections (e.g. dtype checks)
        return self.base_layer.weight  # type: ignore[return-value]

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def active_slots(self) -> torch.Tensor:
        """Indices of active slots, ascending (r,): always 0 .. rank - 1."""
        return torch.arange(self._rank, device=self.lora_lam.device)

    # ------------------------------------------------------------------ forward
    def lam_eff(self) -> torch.Tensor:
        """λ with inactive slots exactly zero (R,) (they are zero anyway; this is the full-capacity view)."""
        return self.lora_lam * self.lora_active.to(self.lora_lam.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        r = self._rank
        if self.disabled or self.merged or (r == 0 and not (self.training and torch.is_grad_enabled())):
            return result  # (a rank-0 module still runs its empty path in training: DDP expects every parameter)
        h = self.lora_dropout(x)
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.lora_Q.dtype)
        h = F.linear(h, self.lora_Q[:r])  # (..., r)
        h = h * (self.lora_lam[:r] * self.scaling)  # (..., r): the scaling folded into the (r,) vector
        delta = F.linear(h, self.lora_P[:, :r])  # (..., out)
        if self.orth_in_forward and self.training and torch.is_grad_enabled():
            self.orth_term = self.orth_reg()  # FSDP2: the unsharded P, Q exist only now (sharding.py)
        return result + delta.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · P diag(λ) Q in the base layer's (out, in) orientation (float32)."""
        r = self._rank
        P = self.lora_P.detach()[:, :r].float()  # (out, r)
        lam = self.lora_lam.detach()[:r].float()  # (r,)
        Q = self.lora_Q.detach()[:r].float()  # (r, in)
        return (P * (lam * self.scaling)) @ Q  # (out, in)

    def direction_sizes(self, whole: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
        """Size of each slot's rank-one term (R,), what pruning and eq. 3 rank: |λ| (the paper), or under
        `init_basis="lora_like"` |λ|·||p||·||q||. `whole` makes a sharded (R,) vector whole (`sharding.full_tensor`
        under FSDP2: the norms reduce over P's and Q's shards, never gathering P or Q)."""
        lam = whole(self.lora_lam.detach()).float().abs()  # (R,)
        if self.init_basis != "lora_like":
            return lam
        p_norm = whole(self.lora_P.detach().float().square().sum(0)).sqrt()  # (R,)
        q_norm = whole(self.lora_Q.detach().float().square().sum(1)).sqrt()  # (R,)
        return lam * p_norm * q_norm

    def spectrum(self, whole: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
        """Singular values of the active P·diag(λ)·Q (rank,), descending, float64: what eq. 3 scores, whatever the
        basis (`spectrum.py`). `whole` makes a sharded tensor whole (FSDP2: `sharding.full_tensor`, a gather)."""
        r = self._rank
        P = whole(self.lora_P.detach())[:, :r]  # (out, r)
        Q = whole(self.lora_Q.detach())[:r]  # (r, in)
        return gram_singular_values(P, whole(self.lora_lam.detach())[:r], Q)  # (r,)

    # ------------------------------------------------------------------ regulariser
    def orth_reg(self) -> torch.Tensor:
        """Eq. 2 over the active directions: ||PᵀP - I||_F² + ||QQᵀ - I||_F² (squared, as printed in the paper).

        Computed on the active prefix only (views; the (r, r) Gram matrices are all that backward keeps).
        """
        r = self._rank
        exact = torch.promote_types(self.lora_P.dtype, torch.float32)  # bf16 P, Q (FSDP2 mixed precision): in fp32
        P = self.lora_P[:, :r].to(exact)  # (out, r)
        Q = self.lora_Q[:r].to(exact)  # (r, in)
        eye = torch.eye(r, device=P.device, dtype=P.dtype)  # (r, r)
        return ((P.T @ P - eye) ** 2).sum() + ((Q @ Q.T - eye) ** 2).sum()

    # ------------------------------------------------------------------ rank surgery
    @torch.no_grad()
    def _move(self, src: int, dst: int) -> None:
        """Move slot `src` into `dst` and zero `src` (tensors and birth record; optimizer state: the caller)."""
        self.lora_P[:, dst] = self.lora_P[:, src]
        self.lora_lam[dst] = self.lora_lam[src]
        self.lora_Q[dst] = self.lora_Q[src]
        self._zero(src)
        if src in self.slot_birth:
            self.slot_birth[dst] = self.slot_birth.pop(src)

    @torch.no_grad()
    def _zero(self, slot: int) -> None:
        self.lora_P[:, slot] = 0
        self.lora_lam[slot] = 0
        self.lora_Q[slot] = 0
        self.slot_birth.pop(slot, None)

    @torch.no_grad()
    def rotate_to_svd(self) -> None:
        """Re-express the active directions as ΔW's thin SVD, ΔW unchanged (`spectrum.factored_svd`): P's columns
        and Q's rows become orthonormal, λ the singular values, slot i the i-th strongest direction. The optimizer
        state of every active slot no longer matches its direction: the caller resets it
        (`FlexLoRAModel.apply_plan`)."""
        r = self._rank
        U, S, Vh = factored_svd(self.lora_P[:, :r], self.lora_lam[:r], self.lora_Q[:r])  # (out, r), (r,), (r, in)
        self.lora_P[:, :r] = U.to(self.lora_P.device, self.lora_P.dtype)
        self.lora_lam[:r] = S.to(self.lora_lam.device, self.lora_lam.dtype)
        self.lora_Q[:r] = Vh.to(self.lora_Q.device, self.lora_Q.dtype)
        self.slot_birth = {}

    @torch.no_grad()
    def prune_smallest(self, *, rotate: bool = True) -> tuple[int, int | None]:
        """Remove the weakest active direction and keep the active slots a prefix.

        `rotate=True` (default): first `rotate_to_svd`, then drop the last slot, the smallest singular direction, so
        the pruned ΔW is the best rank-(r-1) approximation (Eckart-Young). `rotate=False`: drop the direction of
        smallest `direction_sizes` (ties: lowest slot) as it stands, which is a singular direction only when P and Q
        are orthonormal (the paper's assumption). Either way never argmin of the *signed* λ (the authors' code).

        Returns:
            `(slot, moved_from)`: the slot whose direction was removed, and the slot whose direction now occupies it
            (`None` when the removed direction was the last one). The optimizer state must move the same way.
        """
        r = self._rank
        if r == 0:
            raise RuntimeError("prune_smallest: no active direction left to prune.")
        if rotate:
            self.rotate_to_svd()
            slot = r - 1
        else:
            slot = int(torch.argmin(self.direction_sizes()[:r]).item())
        last = r - 1
        self._zero(slot)
        moved_from = None
        if slot != last:
            self._move(last, slot)
            moved_from = last
        self._set_rank(r - 1)
        return slot, moved_from

    @torch.no_grad()
    def expand(
        self,
        generator: torch.Generator,
        *,
        init: str = "zero_impact",
        small_value: float = SMALL_INIT_VALUE,
        step: int | None = None,
    ) -> int:
        """Activate slot `rank` as a new direction. Returns the slot.

        Inits (Table 6): `zero_impact` (λ = 0, a random P column and Q row), `small` (λ = `small_value`, vectors
        Gram-Schmidt-orthogonalised against the active ones), `orthogonal` (λ = 0, orthogonalised vectors), `zero`
        (everything 0: in exact arithmetic such a direction never receives gradient, which is what that ablation
        measures; the paper's "until gradients accumulate" does not happen). Orthonormal and lora_like bases: every
        new vector orthogonalised against the active ones, unit norm (`zero_impact` = `orthogonal`); Gaussian: drawn
        at `init_scale`. `step` is the slot's birth for the per-direction Adam correction (`slot_age.py`).
        """
        r = self._rank
        if r >= self.capacity:
            raise RuntimeError(f"expand: module is at its capacity of {self.capacity} directions.")
        if init not in ("zero_impact", "small", "orthogonal", "zero"):
            raise ValueError(f"Unknown expansion_init {init!r}.")
        orthonormal = self.init_basis in ("orthonormal", "lora_like")  # lora_like: new directions as the paper's
        p, q = gaussian_direction(self.out_features, self.in_features, self.init_scale, generator)
        if init in ("small", "orthogonal") or orthonormal:
            exact = torch.float64 if self.lora_P.dtype == torch.float64 else torch.float32  # never in bf16/fp16
            p_basis = self.lora_P.detach()[:, :r].to("cpu", exact)  # (out, r): not orthonormal under lora_like
            p = orthogonalize(p, p_basis, near_orthonormal=self.init_basis == "orthonormal")
            q = orthogonalize(q, self.lora_Q.detach()[:r].to("cpu", exact).T, near_orthonormal=orthonormal)
        if orthonormal:
            p, q = p / p.norm().clamp_min(1e-30), q / q.norm().clamp_min(1e-30)
        if init == "zero":
            p, q = torch.zeros_like(p), torch.zeros_like(q)
        self.lora_P[:, r] = p.to(self.lora_P.device, self.lora_P.dtype)
        self.lora_Q[r] = q.to(self.lora_Q.device, self.lora_Q.dtype)
        self.lora_lam[r] = small_value if init == "small" else 0.0
        if step is not None:
            self.slot_birth[r] = int(step)
        self._set_rank(r + 1)
        return r

    @torch.no_grad()
    def grow_capacity(self, capacity: int) -> None:
        """Add empty slots (only before an optimizer holds the parameters: it replaces the Parameter objects)."""
        extra = capacity - self.capacity
        if extra <= 0:
            return
        grad = self.lora_P.requires_grad
        self.lora_P = nn.Parameter(torch.cat([self.lora_P, self.lora_P.new_zeros(self.out_features, extra)], 1), grad)
        self.lora_lam = nn.Parameter(torch.cat([self.lora_lam, self.lora_lam.new_zeros(extra)]), grad)
        self.lora_Q = nn.Parameter(torch.cat([self.lora_Q, self.lora_Q.new_zeros(extra, self.in_features)], 0), grad)

    @torch.no_grad()
    def set_capacity(self, capacity: int) -> None:
        """Give the layer exactly `capacity` empty slots (the caller restores contents right after, e.g.
        `load_compact`). Shrinking exists for resume (`optimizer.pt` holds moments of the checkpoint's shapes) and
        for inference loads (exactly the active directions)."""
        grad = self.lora_P.requires_grad
        self.lora_P = nn.Parameter(self.lora_P.new_zeros(self.out_features, capacity), requires_grad=grad)
        self.lora_lam = nn.Parameter(self.lora_lam.new_zeros(capacity), requires_grad=grad)
        self.lora_Q = nn.Parameter(self.lora_Q.new_zeros(capacity, self.in_features), requires_grad=grad)
        self._set_rank(0)
        self.slot_birth = {}

    # ------------------------------------------------------------------ compact form (save / export)
    def compact(self) -> dict[str, torch.Tensor]:
        """Active directions only: `P` (out, r), `lam` (r,), `Q` (r, in) and their `slots` (r,) (always 0 .. r-1)."""
        r = self._rank
        return {
            "P": self.lora_P.detach()[:, :r].contiguous(),
            "lam": self.lora_lam.detach()[:r].contiguous(),
            "Q": self.lora_Q.detach()[:r].contiguous(),
            "slots": torch.arange(r, dtype=torch.int64),
        }

    @torch.no_grad()
    def load_compact(self, P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor, slots: torch.Tensor | None) -> None:
        """Inverse of `compact`: the directions become the active prefix, in the order of their saved `slots`
        (folders written before the prefix layout may hold gaps; their directions are packed in slot order).
        Shapes and capacity are checked by the caller."""
        r = int(lam.shape[0])
        if r > self.capacity:
            self.grow_capacity(r)
        order = torch.argsort(slots.to(torch.int64).cpu()) if slots is not None and r else torch.arange(r)
        self.lora_P.zero_()
        self.lora_lam.zero_()
        self.lora_Q.zero_()
        self.lora_P[:, :r] = P[:, order].to(self.lora_P.device, self.lora_P.dtype)
        self.lora_lam[:r] = lam[order].to(self.lora_lam.device, self.lora_lam.dtype)
        self.lora_Q[:r] = Q[order].to(self.lora_Q.device, self.lora_Q.dtype)
        self._set_rank(r)
        self.slot_birth = {}

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self._rank}/{self.capacity}, "
            f"scaling={self.scaling:.4g}"
        )

