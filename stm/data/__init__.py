"""Data: tokenizers, text sources, chunking and LightningDataModules."""

from stm.data.text import ChunkDataset, TextDataModule, read_documents, sample_files
from stm.data.tokenizers import ByteTokenizer, HFTokenizer

__all__ = ["ByteTokenizer", "ChunkDataset", "HFTokenizer", "TextDataModule", "read_documents", "sample_files"]
