"""Backbones: a compact transformer for from-scratch work (and, later, an adapter for Hugging Face LMs)."""

from stm.models.transformer import Transformer, TransformerConfig

__all__ = ["Transformer", "TransformerConfig"]
