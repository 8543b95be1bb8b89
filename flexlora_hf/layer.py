"""`FlexLoRALayer`: the SVD-form adapter ΔW = P·diag(λ)·Q wrapped around one frozen linear layer.

Owns the adapter tensors of one matrix and every operation on them: forward, prune, expand, the orthogonality term
(eq. 2), ΔW, compact export/import and merging. It wraps (never replaces) the base layer, so the same code serves
`nn.Linear`, GPT-2's `Conv1D` (weight stored as (in, out)) and bitsandbytes `Linear4bit`.

Fixed shapes: the layer holds `capacity` slots (`P` (out, R), `lam` (R,), `Q` (R, in)) and a boolean `active`
mask (R,). Ranks move by flipping the mask, so parameters never change shape during training (DDP, FSDP, compile and
`optimizer.pt` resume keep working). An inactive slot holds exact zeros and is multiplied out of the forward, so it
contributes nothing and receives exactly zero gradient; AdamW's decoupled decay keeps zeros at zero.

Initialisation (AdaLoRA, and the paper's "zero-impact" rule): P and Q ~ N(0, init_scale²) (0.02 by default), λ = 0,
so the wrapped model starts exactly at the base model. New directions use the same Gaussian scale.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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


def gaussian_direction(
    d_out: int, d_in: int, std: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one (P column (out,), Q row (in,)) pair ~ N(0, std²) on the CPU (same draw on every device/process)."""
    p = torch.randn(d_out, generator=generator, dtype=torch.float32) * std  # (out,)
    q = torch.randn(d_in, generator=generator, dtype=torch.float32) * std  # (in,)
    return p, q


def orthogonalize(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt `v` (d,) against the columns of `basis` (d, k), then restore `v`'s original norm."""
    if basis.numel() == 0 or basis.shape[1] >= basis.shape[0]:
        return v
    Qb, _ = torch.linalg.qr(basis.double())  # (d, k) orthonormal span of the active directions
    w = v.double() - Qb @ (Qb.T @ v.double())  # (d,)
    w = w * (v.norm() / w.norm().clamp_min(1e-30))
    return w.to(v.dtype)


class FlexLoRALayer(nn.Module):
    """A frozen base linear layer plus a FlexLoRA adapter with `capacity` slots, `r` of them active at start.

    Args:
        base_layer (`nn.Module`): `nn.Linear`, `Conv1D` or bitsandbytes `Linear4bit`; frozen by the caller.
        r (`int`): initial active rank.
        capacity (`int`): number of slots (the module's rank cap), `>= r`.
        lora_alpha (`float`): scaling numerator; `scaling = lora_alpha / r` with the initial `r`, never updated, so
            pruning a zero-λ direction or adding a new one leaves the output unchanged.
        lora_dropout (`float`): dropout on the adapter input.
        init_scale (`float`): std of the Gaussian P, Q.
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
        init_scale: float = 0.02,
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
        self.fan_in_fan_out = _is_conv1d(base_layer)
        self.lora_dropout: nn.Module = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False

        device = self._base_device()
        self.lora_P = nn.Parameter(torch.zeros(self.out_features, capacity, device=device))  # (out, R)
        self.lora_lam = nn.Parameter(torch.zeros(capacity, device=device))  # (R,)
        self.lora_Q = nn.Parameter(torch.zeros(capacity, self.in_features, device=device))  # (R, in)
        self.lora_active: torch.Tensor
        self.register_buffer("lora_active", torch.zeros(capacity, dtype=torch.bool, device=device))  # (R,)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        with torch.no_grad():
            for j in range(r):
                p, q = gaussian_direction(self.out_features, self.in_features, init_scale, gen)
                self.lora_P[:, j] = p.to(device)
                self.lora_Q[j] = q.to(device)
            self.lora_active[:r] = True

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
        return int(self.lora_active.sum().item())

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads `.weight` of projections (e.g. dtype checks)
        return self.base_layer.weight  # type: ignore[return-value]

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def active_slots(self) -> torch.Tensor:
        """Indices of active slots, ascending (R_active,)."""
        return torch.nonzero(self.lora_active, as_tuple=False).flatten()

    # ------------------------------------------------------------------ forward
    def lam_eff(self) -> torch.Tensor:
        """λ with inactive slots forced to exactly zero (R,)."""
        return self.lora_lam * self.lora_active.to(self.lora_lam.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        h = self.lora_dropout(x).to(self.lora_Q.dtype)
        h = F.linear(h, self.lora_Q)  # (..., R)
        h = h * self.lam_eff()  # (..., R); masked slots give exactly 0 and get 0 gradient
        delta = F.linear(h, self.lora_P) * self.scaling  # (..., out)
        return result + delta.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · P diag(λ) Q in the base layer's (out, in) orientation (float32)."""
        P = self.lora_P.detach().float()  # (out, R)
        lam = self.lam_eff().detach().float()  # (R,)
        Q = self.lora_Q.detach().float()  # (R, in)
        return (P * lam) @ Q * self.scaling  # (out, in)

    # ------------------------------------------------------------------ regulariser
    def orth_reg(self) -> torch.Tensor:
        """Eq. 2 over the active directions: ||PᵀP - I||_F² + ||QQᵀ - I||_F² (squared, as printed in the paper).

        Inactive columns/rows are zero, and the identity is masked to the active diagonal, so this equals the value
        computed on the compacted (out, r) / (r, in) matrices.
        """
        m = self.lora_active.to(self.lora_P.dtype)  # (R,)
        P = self.lora_P * m  # (out, R)
        Q = self.lora_Q * m[:, None]  # (R, in)
        eye = torch.diag(m)  # (R, R)
        return ((P.T @ P - eye) ** 2).sum() + ((Q @ Q.T - eye) ** 2).sum()

    # ------------------------------------------------------------------ rank surgery
    @torch.no_grad()
    def prune_smallest(self) -> int:
        """Deactivate the active direction with the smallest |λ| (ties: lowest slot) and zero it. Returns the slot.

        The authors' code removes argmin of the *signed* λ, which can drop the largest-magnitude negative direction.
        """
        slots = self.active_slots()
        if slots.numel() == 0:
            raise RuntimeError("prune_smallest: no active direction left to prune.")
        mags = self.lora_lam.detach()[slots].abs()
        slot = int(slots[int(torch.argmin(mags).item())].item())
        self.lora_P[:, slot] = 0
        self.lora_lam[slot] = 0
        self.lora_Q[slot] = 0
        self.lora_active[slot] = False
        return slot

    @torch.no_grad()
    def expand(self, generator: torch.Generator, *, init: str = "zero_impact", small_value: float = 1e-3) -> int:
        """Activate the first free slot as a new direction. Returns the slot.

        Inits (Table 6): `zero_impact` (λ = 0, Gaussian P column and Q row at `init_scale`), `small` (λ =
        `small_value`, Gaussian vectors Gram-Schmidt-orthogonalised against the active ones), `orthogonal` (λ = 0,
        orthogonalised vectors), `zero` (everything 0: in exact arithmetic such a direction never receives gradient,
        which is what that ablation measures; the paper's "until gradients accumulate" does not happen).
        """
        free = torch.nonzero(~self.lora_active, as_tuple=False).flatten()
        if free.numel() == 0:
            raise RuntimeError(f"expand: module is at its capacity of {self.capacity} directions.")
        slot = int(free[0].item())
        p, q = gaussian_direction(self.out_features, self.in_features, self.init_scale, generator)
        if init in ("small", "orthogonal"):
            slots = self.active_slots()
            p = orthogonalize(p, self.lora_P.detach()[:, slots].float().cpu())
            q = orthogonalize(q, self.lora_Q.detach()[slots].float().cpu().T)
        elif init == "zero":
            p, q = torch.zeros_like(p), torch.zeros_like(q)
        elif init != "zero_impact":
            raise ValueError(f"Unknown expansion_init {init!r}.")
        self.lora_P[:, slot] = p.to(self.lora_P.device, self.lora_P.dtype)
        self.lora_Q[slot] = q.to(self.lora_Q.device, self.lora_Q.dtype)
        self.lora_lam[slot] = small_value if init == "small" else 0.0
        self.lora_active[slot] = True
        return slot

    @torch.no_grad()
    def grow_capacity(self, capacity: int) -> None:
        """Add empty slots (only before an optimizer holds the parameters: it replaces the Parameter objects)."""
        extra = capacity - self.capacity
        if extra <= 0:
            return
        dev = self.lora_P.device
        self.lora_P = nn.Parameter(torch.cat([self.lora_P, self.lora_P.new_zeros(self.out_features, extra)], 1))
        self.lora_lam = nn.Parameter(torch.cat([self.lora_lam, self.lora_lam.new_zeros(extra)]))
        self.lora_Q = nn.Parameter(torch.cat([self.lora_Q, self.lora_Q.new_zeros(extra, self.in_features)], 0))
        self.lora_active = torch.cat([self.lora_active, torch.zeros(extra, dtype=torch.bool, device=dev)])

    @torch.no_grad()
    def set_capacity(self, capacity: int) -> None:
        """Give the layer exactly `capacity` empty slots (the caller restores contents right after, e.g.
        `load_compact`). Shrinking exists for resume: `optimizer.pt` holds moments of the checkpoint's shapes."""
        if capacity > self.capacity:
            self.grow_capacity(capacity)
        elif capacity < self.capacity:
            grad = self.lora_P.requires_grad
            self.lora_P = nn.Parameter(self.lora_P.new_zeros(self.out_features, capacity), requires_grad=grad)
            self.lora_lam = nn.Parameter(self.lora_lam.new_zeros(capacity), requires_grad=grad)
            self.lora_Q = nn.Parameter(self.lora_Q.new_zeros(capacity, self.in_features), requires_grad=grad)
            self.lora_active = torch.zeros(capacity, dtype=torch.bool, device=self.lora_active.device)

    # ------------------------------------------------------------------ compact form (save / export)
    def compact(self) -> dict[str, torch.Tensor]:
        """Active directions only: `P` (out, r), `lam` (r,), `Q` (r, in) and their `slots` (r,) for exact resume."""
        slots = self.active_slots()
        return {
            "P": self.lora_P.detach()[:, slots].contiguous(),
            "lam": self.lora_lam.detach()[slots].contiguous(),
            "Q": self.lora_Q.detach()[slots].contiguous(),
            "slots": slots.to(torch.int64).cpu(),
        }

    @torch.no_grad()
    def load_compact(self, P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor, slots: torch.Tensor | None) -> None:
        """Inverse of `compact`; grows capacity if the saved slots need it. Shapes are checked by the caller."""
        r = int(lam.shape[0])
        if slots is None:
            slots = torch.arange(r)
        slots = slots.to(torch.int64).cpu()
        need = int(slots.max().item()) + 1 if r > 0 else 0
        if need > self.capacity:
            self.grow_capacity(need)
        self.lora_P.zero_()
        self.lora_lam.zero_()
        self.lora_Q.zero_()
        self.lora_active.zero_()
        idx = slots.to(self.lora_P.device)
        self.lora_P[:, idx] = P.to(self.lora_P.device, self.lora_P.dtype)
        self.lora_lam[idx] = lam.to(self.lora_lam.device, self.lora_lam.dtype)
        self.lora_Q[idx] = Q.to(self.lora_Q.device, self.lora_Q.dtype)
        self.lora_active[idx] = True

    # ------------------------------------------------------------------ merging
    def check_mergeable(self) -> None:
        """Raise `ValueError` if ΔW cannot be merged exactly into the base layer (bitsandbytes-quantised base)."""
        base: Any = self.base_layer
        kind = type(base).__name__
        if is_linear4bit(base) or kind == "Linear8bitLt":
            raise ValueError(
                f"Refusing to merge FlexLoRA into a bitsandbytes-quantised {kind} base layer: re-quantising W + ΔW "
                "rounds most of ΔW away (an update of std 1e-3 on NF4 weights of std 0.02 keeps ~30% of its "
                "effect), so the merged model would silently lose the fine-tuning. Either keep the adapter unmerged "
                "(inference on the quantised base matches training), or load the base in full precision "
                "(`flexlora_hf.quantization.load_base_model(path, load_in_4bit=False)` or `from_pretrained(path, "
                "dtype=torch.bfloat16)`), load the adapter with `FlexLoRAModel.from_pretrained(base, adapter_dir)` "
                "and call `merge_and_unload()` there."
            )

    @torch.no_grad()
    def merged_base_layer(self) -> nn.Module:
        """Return the base layer with ΔW added to its weight (the adapter is left untouched).

        A bitsandbytes 4-bit (`Linear4bit`) or 8-bit (`Linear8bitLt`) base is refused with a `ValueError`: merging
        would mean re-quantising W + ΔW, and since the dequantised W already sits exactly on the quantisation grid,
        rounding snaps most of a typical ΔW back to W (measured for NF4 with double quantisation, weights of std
        0.02: an update of std 1e-3 keeps ~30% of its effect, 1e-4 keeps ~1%), so the "merged" model would silently
        lose most of the fine-tuning. Keep the adapter unmerged on a quantised base (it runs exactly as trained),
        or merge into a full-precision copy of the base.

        Raises:
            ValueError: if the base layer is bitsandbytes-quantised.
        """
        self.check_mergeable()
        base: Any = self.base_layer
        delta = self.delta_weight()  # (out, in)
        w = base.weight
        if self.fan_in_fan_out:
            w.data += delta.T.to(w.device, w.dtype)  # Conv1D stores (in, out)
        else:
            w.data += delta.to(w.device, w.dtype)
        return base

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}/{self.capacity}, "
            f"scaling={self.scaling:.4g}"
        )

