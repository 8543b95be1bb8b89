"""The optimizer side of reallocation: in-place state surgery for pruned and new directions, and their own
Adam bias correction. Imports torch and the adapter layer only.
"""
