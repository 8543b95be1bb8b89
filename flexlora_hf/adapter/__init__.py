"""The adapter itself: `FlexLoRALayer` (ΔW = P·diag(λ)·Q in fixed-shape slots), its directions, target
matching, merging, 4-bit bases, and `FlexLoRAModel` with its reallocation events. Imports torch and the math only.
"""
