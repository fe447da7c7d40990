"""Kept for imports of ``layervault.torch.placement``; the rule lives in :mod:`layervault.placement`."""

from layervault.placement import assign_owners

__all__ = ["assign_owners"]
