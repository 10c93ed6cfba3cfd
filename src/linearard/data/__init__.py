"""Corpora -> token blocks: documents from files, the built-in public-domain corpus, training blocks.

Documents (`iter_documents`) stream from .txt/.md/.rst files, .jsonl records and .parquet rows;
`TokenBlocks` tokenizes them (many in one tokenizer call) into shuffled, sharded, resumable fixed-length blocks;
`default_corpus_files`, `heldout_texts` and `long_texts` are the built-in training and evaluation
text; `training_files` resolves ``--data`` (paths and named built-in sources);
`estimate_corpus_tokens` sizes a corpus from a sample.
"""

from linearard.data.blocks import TokenBlocks
from linearard.data.default_corpus import SOURCES, default_corpus_files, heldout_texts, long_texts, training_files
from linearard.data.documents import corpus_files, iter_documents, strip_gutenberg_boilerplate
from linearard.data.estimate import estimate_corpus_tokens

__all__ = [
    "SOURCES",
    "TokenBlocks",
    "corpus_files",
    "default_corpus_files",
    "estimate_corpus_tokens",
    "heldout_texts",
    "iter_documents",
    "long_texts",
    "strip_gutenberg_boilerplate",
    "training_files",
]
