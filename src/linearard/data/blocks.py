"""Fixed-length token blocks for training: streamed, shuffled, split, sharded and resumable."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from linearard.data.documents import PathLike, corpus_files, iter_records
from linearard.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPLITS = ("train", "heldout")
_STATE_VERSION = 1
# Long documents are tokenized in pieces of about this many characters, cut at paragraph breaks:
# a fast tokenizer's per-token bookkeeping for a whole book would cost far more memory than its ids.
_PIECE_CHARS = 1 << 16
# Documents are read ahead and tokenized together, about this many characters in one tokenizer call: a
# fast tokenizer encodes a call's pieces in parallel, and one call per piece (or per short document)
# capped the stream near 200K tokens/s on one core, below what a GPU trains a small model at.
_ENCODE_CHARS = 1 << 20
# the default shuffle buffer holds about this many tokens (and at least _MIN_SHUFFLE_BLOCKS blocks)
_SHUFFLE_TOKENS = 1 << 19
_MIN_SHUFFLE_BLOCKS = 16


@dataclass
class _Position:
    """Where the block stream of one rank stands; exactly what a resumed run needs to continue."""

    epoch: int
    rng: random.Random
    record: int = 0  # record being cut, counted in this epoch's file order (all splits and ranks)
    block_in_record: int = 0  # blocks already drawn from that record
    drawn: int = 0  # blocks drawn this epoch by all ranks together: block i belongs to rank i % world
    carry: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))  # pack=True
    stream_done: bool = False  # every record is cut; only the shuffle buffer is left to empty
    buffer: list[torch.Tensor] = field(default_factory=list)
    yielded: int = 0  # blocks this rank yielded this epoch


class TokenBlocks:
    """An endless (or one-epoch) stream of fixed-length token blocks from a text corpus.

    Each document is tokenized on its own and cut into `seq_len`-token blocks. A document's last,
    shorter block is kept, right-padded, when it has at least `min_tokens` tokens, and dropped
    otherwise; with ``pack=True`` documents are instead concatenated (add an EOS between them with
    ``add_eos=True``) so that only the corpus's last block can be short.

    Order: every epoch reads the files in a fresh seeded order and shuffles blocks through a buffer
    of `shuffle_buffer` blocks (memory: that many blocks of int32 ids), so the order is deterministic
    for a seed and no more than the buffer and one document is ever held in memory. Records inside
    one .jsonl/.parquet file keep their order, mixed only as far as the buffer reaches.

    Held-out split: a document belongs to the held-out split when a hash of its text falls below
    `heldout_fraction`, so the split is stable across seeds, file orders and runs; ``split`` picks
    the side. Sharding: the stream's blocks are dealt round-robin to `world_size` ranks before
    shuffling, so ranks never overlap, together cover every block of an epoch, and get equal counts
    (within one block). Every rank tokenizes the whole corpus for that.

    Resuming: `state_dict()` between two blocks, then `load_state_dict()` on a new instance with
    the same arguments, and iteration continues with exactly the blocks an uninterrupted run would
    have produced. Skipped records are not re-tokenized, and text files not even re-read. Iterate
    in the process that owns the state (not in DataLoader workers); a new ``iter()`` continues from
    the current position.

    Yields:
        ``{"input_ids": LongTensor [seq_len], "attention_mask": LongTensor [seq_len]}``; the mask is
        1 on real tokens and 0 on the right padding of a short last block (pad id: the tokenizer's
        pad, else EOS, else 0). ``torch.utils.data.default_collate`` batches them into [B, seq_len].

    Args:
        paths: corpus files or folders (see `corpus_files`).
        tokenizer: a Hugging Face tokenizer; special tokens are added only through add_bos/add_eos.
        seq_len: tokens per block.
        min_tokens: the shortest last block of a document that is kept (padded); default seq_len // 2.
        pack: concatenate documents instead of cutting each on its own.
        add_bos, add_eos: put the tokenizer's BOS / EOS token before / after every document.
        shuffle_buffer: blocks held for shuffling; 0 or 1 keeps the stream order. Default: about
            512K tokens' worth, at least 16 blocks.
        seed: seeds the file order and the shuffle of every epoch.
        heldout_fraction: share of documents (by hash) in the held-out split, in [0, 1).
        split: "train" or "heldout".
        rank, world_size: this process's shard.
        repeat: start a new epoch (new order) when the corpus runs out; False stops after one.
        text_field: text field of .jsonl records and text column of .parquet files.

    Example:
        >>> blocks = TokenBlocks(["corpus/"], tokenizer, seq_len=512, seed=0)  # doctest: +SKIP
        >>> stream = iter(blocks)  # doctest: +SKIP
        >>> batch = torch.utils.data.default_collate([next(stream) for _ in range(8)])  # doctest: +SKIP
        >>> batch["input_ids"].shape, blocks.epoch  # doctest: +SKIP
        (torch.Size([8, 512]), 0)
    """

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike],
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        *,
        min_tokens: int | None = None,
        pack: bool = False,
        add_bos: bool = False,
        add_eos: bool = False,
        shuffle_buffer: int | None = None,
        seed: int = 0,
        heldout_fraction: float = 0.0,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        repeat: bool = True,
        text_field: str = "text",
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        min_tokens = max(1, seq_len // 2) if min_tokens is None else min_tokens
        if not 1 <= min_tokens <= seq_len:
            raise ValueError(f"min_tokens must be in [1, seq_len={seq_len}], got {min_tokens}")
        if shuffle_buffer is None:
            shuffle_buffer = max(_MIN_SHUFFLE_BLOCKS, _SHUFFLE_TOKENS // seq_len)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "heldout" and heldout_fraction == 0.0:
            raise ValueError("split='heldout' needs heldout_fraction > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.bos_id = _special_id(tokenizer, "bos") if add_bos else None
        self.eos_id = _special_id(tokenizer, "eos") if add_eos else None
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad_id is None else pad_id

        self.files = corpus_files(paths)
        # the corpus by file names and sizes, not paths: a checkpoint still resumes after a move
        corpus = hashlib.sha256()
        for file in self.files:
            corpus.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        self._corpus_digest = corpus.hexdigest()[:16]
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.min_tokens = min_tokens
        self.pack = pack
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.heldout_fraction = heldout_fraction
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.repeat = repeat
        self.text_field = text_field
        self._pos = self._epoch_start(0)

    @property
    def epoch(self) -> int:
        """The epoch (0-based) of the last block yielded, or of the next one before any."""
        return self._pos.epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            pos = self._pos
            if not pos.stream_done:
                for block in self._stream(pos):
                    if self.shuffle_buffer <= 1:
                        yield self._emit(pos, block)
                    elif len(pos.buffer) < self.shuffle_buffer:
                        pos.buffer.append(block)
                    else:
                        slot = pos.rng.randrange(self.shuffle_buffer)
                        block, pos.buffer[slot] = pos.buffer[slot], block
                        yield self._emit(pos, block)
                pos.stream_done = True
            while pos.buffer:
                slot = pos.rng.randrange(len(pos.buffer))
                pos.buffer[slot], pos.buffer[-1] = pos.buffer[-1], pos.buffer[slot]
                yield self._emit(pos, pos.buffer.pop())
            if pos.yielded == 0:
                raise UserError(
                    f"the corpus gives no {self.split} block for rank {self.rank} of {self.world_size}: "
                    f"need documents of at least {self.min_tokens} tokens "
                    f"(lower --seq-len, or add longer or more documents)"
                )
            self._pos = self._epoch_start(pos.epoch + 1)
            if not self.repeat:
                return

    def position(self) -> _Position:
        """A cheap copy of the stream position after the last yielded block, for `state_dict` later
        (a thread that makes batches ahead keeps one per batch; only a checkpoint turns it into tensors)."""
        pos = self._pos
        rng = random.Random()
        rng.setstate(pos.rng.getstate())
        # blocks are never changed in place (the buffer swaps references), so a shallow copy suffices
        return dataclasses.replace(pos, rng=rng, buffer=list(pos.buffer))

    def state_dict(self, position: _Position | None = None) -> dict[str, Any]:
        """The stream position after the last yielded block (or a saved `position()`): plain values and
        tensors for torch.save."""
        pos = position or self._pos
        lengths = torch.tensor([len(b) for b in pos.buffer], dtype=torch.int32)
        buffer = torch.zeros(len(pos.buffer), self.seq_len, dtype=torch.int32)
        for row, block in zip(buffer, pos.buffer):
            row[: len(block)] = block
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "epoch": pos.epoch,
            "rng": pos.rng.getstate(),
            "record": pos.record,
            "block_in_record": pos.block_in_record,
            "drawn": pos.drawn,
            "carry": pos.carry.clone(),
            "stream_done": pos.stream_done,
            "buffer": buffer,
            "buffer_lengths": lengths,
            "yielded": pos.yielded,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` of a stream built with the same arguments and corpus.

        Raises:
            UserError: the saved position belongs to a different corpus or data setting.
        """
        if state.get("version") != _STATE_VERSION:
            raise UserError(f"unknown data position format {state.get('version')!r}")
        saved, current = state["config"], self._config()
        changed = [f"{k} was {saved.get(k)!r}, now {v!r}" for k, v in current.items() if saved.get(k) != v]
        if changed:
            raise UserError(f"cannot resume the data stream: {'; '.join(changed)}")
        rng = random.Random()
        rng.setstate(_as_rng_state(state["rng"]))
        self._pos = _Position(
            epoch=int(state["epoch"]),
            rng=rng,
            record=int(state["record"]),
            block_in_record=int(state["block_in_record"]),
            drawn=int(state["drawn"]),
            carry=state["carry"].to(torch.int32).clone(),
            stream_done=bool(state["stream_done"]),
            buffer=[row[:n].clone() for row, n in zip(state["buffer"], state["buffer_lengths"].tolist())],
            yielded=int(state["yielded"]),
        )

    def _epoch_start(self, epoch: int) -> _Position:
        # string seeds are hashed with SHA-512, so the order is the same in every process and run
        return _Position(epoch=epoch, rng=random.Random(f"{self.seed}/{epoch}/{self.rank}/blocks"))

    def _epoch_files(self, epoch: int) -> list[Path]:
        files = list(self.files)
        random.Random(f"{self.seed}/{epoch}/files").shuffle(files)  # the same on every rank
        return files

    def _stream(self, pos: _Position) -> Iterator[torch.Tensor]:
        """This rank's blocks of the epoch from `pos` on, in stream order, advancing `pos` as it goes.

        `pos` is current whenever a block is handed out; resuming from a copy skips what it counts.
        """
        end = pos.record
        records = iter_records(self._epoch_files(pos.epoch), self.text_field, skip=pos.record)
        for index, tokens in self._encoded(enumerate(records, start=pos.record)):
            end = index + 1
            if index > pos.record:
                pos.record, pos.block_in_record = index, 0
            if tokens is None:  # not in this split
                continue
            blocks, rest = self._cut(pos.carry, tokens)
            for block in blocks[pos.block_in_record :]:
                pos.block_in_record += 1
                if self._take(pos):
                    yield block
            if self.pack:
                pos.carry = rest
        if pos.record < end:
            pos.record, pos.block_in_record = end, 0
        # pack=True: what is left after the last document is one more (short) block
        if self.pack and pos.block_in_record == 0 and len(pos.carry) >= self.min_tokens:
            pos.block_in_record = 1
            if self._take(pos):
                yield pos.carry

    def _take(self, pos: _Position) -> bool:
        mine = pos.drawn % self.world_size == self.rank
        pos.drawn += 1
        return mine

    def _in_split(self, text: str) -> bool:
        if not text.strip():
            return False
        if self.heldout_fraction == 0.0:
            return True
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        heldout = int.from_bytes(digest, "big") < self.heldout_fraction * 2**64
        return heldout == (self.split == "heldout")

    def _encoded(self, records: Iterator[tuple[int, str]]) -> Iterator[tuple[int, torch.Tensor | None]]:
        """``(index, tokens)`` of each record in order, ``None`` for one outside the split; records are
        read ahead and tokenized in batches of about `_ENCODE_CHARS` characters."""
        batch: list[tuple[int, str | None]] = []
        chars = 0
        for index, text in records:
            batch.append((index, text if self._in_split(text) else None))
            chars += len(text)
            if chars >= _ENCODE_CHARS:
                yield from self._encode(batch)
                batch, chars = [], 0
        yield from self._encode(batch)

    def _encode(self, batch: list[tuple[int, str | None]]) -> Iterator[tuple[int, torch.Tensor | None]]:
        """The records' tokens from one tokenizer call over all their pieces."""
        pieces = [list(_pieces(text)) if text is not None else [] for _, text in batch]
        flat = [piece for doc in pieces for piece in doc]
        ids = self.tokenizer(flat, add_special_tokens=False, return_attention_mask=False)["input_ids"] if flat else []
        start = 0
        for (index, text), doc in zip(batch, pieces):
            if text is None:
                yield index, None
                continue
            parts = list(ids[start:start + len(doc)])
            start += len(doc)
            if self.bos_id is not None:
                parts.insert(0, [self.bos_id])
            if self.eos_id is not None:
                parts.append([self.eos_id])
            yield index, torch.cat([torch.tensor(part, dtype=torch.int32) for part in parts])

    def _cut(self, carry: torch.Tensor, tokens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Blocks of `carry + tokens` and the tokens left over for the next document (pack only)."""
        if self.pack:
            tokens = torch.cat([carry, tokens])
        full = len(tokens) // self.seq_len * self.seq_len
        # (split() of an empty tensor would give one empty block)
        blocks = [b.clone() for b in tokens[:full].split(self.seq_len)] if full else []
        rest = tokens[full:].clone()
        if not self.pack and len(rest) >= self.min_tokens:
            blocks.append(rest)
        return blocks, rest

    def _emit(self, pos: _Position, block: torch.Tensor) -> dict[str, torch.Tensor]:
        pos.yielded += 1
        input_ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        input_ids[: len(block)] = block
        attention_mask = torch.zeros(self.seq_len, dtype=torch.long)
        attention_mask[: len(block)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _config(self) -> dict[str, Any]:
        """The settings a saved position depends on."""
        return {
            "corpus": self._corpus_digest,
            "seq_len": self.seq_len,
            "min_tokens": self.min_tokens,
            "pack": self.pack,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "shuffle_buffer": self.shuffle_buffer,
            "seed": self.seed,
            "heldout_fraction": self.heldout_fraction,
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "text_field": self.text_field,
        }


def _special_id(tokenizer: PreTrainedTokenizerBase, name: str) -> int:
    token_id = getattr(tokenizer, f"{name}_token_id")
    if token_id is None:
        raise ValueError(f"add_{name}=True but the tokenizer has no {name.upper()} token")
    return token_id


def _as_rng_state(state: Any) -> tuple:
    # a state that went through torch.save/load or JSON may come back with lists for tuples
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _pieces(text: str, size: int = _PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of about `size` characters, cut inside whitespace.

    The cut falls before the last character of a whitespace run at a paragraph break (else a line
    break). GPT-2-style pre-tokenizers split such a run the same way, so the pieces tokenize exactly
    like the whole text; other tokenizers may differ in a whitespace token at the cut.
    """
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            cut = cut if cut > start else text.rfind("\n", start, end)
            if cut > start:
                run_end = cut + 1
                while run_end < len(text) and text[run_end].isspace():
                    run_end += 1
                end = max(run_end - 1, cut)
        yield text[start:end]
        start = end
