"""Tokenizers: train a byte-level BPE with HF `tokenizers`, load any tokenizer.json or SentencePiece .model,
and report whether articles ("a", "an", "the") are single, frequent tokens.

Every command loads tokenizers through `load_tokenizer`, which returns one interface (`TextTokenizer`).
Our BPE has one special token, `<|endoftext|>`, placed before every story: it starts a story and ends the
previous one. SentencePiece models follow llama2.c: BOS before every story, generation stops at BOS or EOS.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from tinystories.core.atomic import atomic_file, copy_file_atomic, write_text_atomic
from tinystories.core.errors import UserError

END_OF_TEXT = "<|endoftext|>"
ARTICLES = ("a", "an", "the", "A", "An", "The")
BYTE_ALPHABET = 256


class TextTokenizer:
    """The one tokenizer interface the toolkit uses."""

    kind: str  # "bpe" (HF tokenizers) or "sentencepiece"
    path: Path  # the file the tokenizer was loaded from
    vocab_size: int
    doc_start_id: int  # placed before each document
    stop_ids: frozenset[int]  # generation ends at any of these

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def piece_id(self, word: str, leading_space: bool) -> int | None:
        """The id of `word` as one token (with a leading space, as mid-sentence), or None if it is split."""
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    @property
    def special_ids(self) -> set[int]:
        return set(self.stop_ids) | {self.doc_start_id}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.vocab_size}"

    def describe(self) -> dict:
        return {"kind": self.kind, "file": self.path.name, "vocab_size": self.vocab_size, "sha256": self.sha256,
                "doc_start_id": self.doc_start_id, "stop_ids": sorted(self.stop_ids)}


class BPETokenizer(TextTokenizer):
    kind = "bpe"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{path}: not a valid tokenizer.json ({first[:120]})") from None
        # text that spells a special token ("<|endoftext|>" in a prompt or a story) is text, never the token:
        # only the toolkit places special tokens, by id (and decode(encode(text)) == text for any text)
        self.tok.encode_special_tokens = True
        self.path = path
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        if END_OF_TEXT in vocab:
            self.doc_start_id = vocab[END_OF_TEXT]
            self.stop_ids = frozenset({vocab[END_OF_TEXT]})
        elif "<s>" in vocab and "</s>" in vocab:
            self.doc_start_id = vocab["<s>"]
            self.stop_ids = frozenset({vocab["<s>"], vocab["</s>"]})
        else:
            raise UserError(f"{path}: the tokenizer has no '<|endoftext|>' or '<s>'/'</s>' token to separate stories")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips character offsets (same ids, ~10% faster); parallel over cores in Rust
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def piece_id(self, word: str, leading_space: bool) -> int | None:
        text = (" " if leading_space else "") + word
        ids = self.tok.encode(("x" if leading_space else "") + text, add_special_tokens=False).ids
        # with a leading "x" the word is mid-sentence; drop the "x" token(s)
        base = self.tok.encode("x", add_special_tokens=False).ids if leading_space else []
        rest = ids[len(base):] if ids[: len(base)] == base else None
        return rest[0] if rest is not None and len(rest) == 1 else None

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(i) or ""


class SentencePieceTokenizer(TextTokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise UserError(f"{path}: not a valid SentencePiece model ({str(e).splitlines()[0][:100]})") from None
        self.path = path
        self.vocab_size = self.sp.vocab_size()
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        if bos < 0:
            raise UserError(f"{path}: the SentencePiece model has no BOS token to start stories")
        self.doc_start_id = bos
        self.stop_ids = frozenset(i for i in (bos, eos) if i >= 0)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=0)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i for i in ids if i not in self.special_ids])

    def piece_id(self, word: str, leading_space: bool) -> int | None:
        # SentencePiece marks a preceding space with "▁"; a word after a newline or quote has no "▁"
        i = self.sp.piece_to_id(("▁" if leading_space else "") + word)
        return None if i == self.sp.unk_id() else i

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)


def sentencepiece_proto(path: str | Path):
    """The SentencePiece model file at `path` parsed as its protobuf (`ModelProto`): the piece types and the
    trainer and normalizer settings that the exports need and `SentencePieceProcessor` does not expose."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def find_tokenizer_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                return p / name
        models = sorted(p.glob("*.model"))
        if models:
            return models[0]
        raise UserError(f"{p}: no tokenizer.json or SentencePiece .model in this directory "
                        "(train one with `tinystories tokenizer train`)")
    if not p.is_file():
        raise UserError(f"{p}: tokenizer not found "
                        "(pass a tokenizer.json, a SentencePiece .model or a directory holding one)")
    return p


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load tokenizer.json (HF tokenizers) or a SentencePiece .model, from a file or a directory."""
    f = find_tokenizer_file(path)
    if f.stat().st_size == 0:
        raise UserError(f"{f}: the tokenizer file is empty")
    data = f.read_bytes()
    _check_recorded_hash(f, data)
    return BPETokenizer(f) if f.suffix == ".json" or data[:1] == b"{" else SentencePieceTokenizer(f)


def _check_recorded_hash(f: Path, data: bytes) -> None:
    """A tokenizer trained here has its SHA-256 recorded beside it (SAMPLE_FILE): a file that changed since is an
    error, not a silently different vocabulary."""
    recorded = (_read_sample(f.parent / SAMPLE_FILE) or {}).get("sha256") if f.name == "tokenizer.json" else None
    if recorded and hashlib.sha256(data).hexdigest() != recorded:
        raise UserError(f"{f}: checksum mismatch: the tokenizer changed after it was trained (a corrupt or "
                        f"replaced file; its SHA-256 is in {SAMPLE_FILE} beside it); retrain it with `tinystories "
                        f"tokenizer train --out {f.parent} --force`, or restore it from a copy")


def train_bpe(docs: Iterable[str], vocab_size: int, out_dir: Path, length: int | None = None,
              sample: dict | None = None) -> Path:
    """Train a byte-level BPE on `docs` and write out_dir/tokenizer.json atomically, and beside it what it was
    trained on (SAMPLE_FILE: stories, bytes, and the `sample` fields given, e.g. source and max_stories)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < BYTE_ALPHABET + 1:
        raise UserError(
            f"--vocab-size {vocab_size} is below the {BYTE_ALPHABET}-byte alphabet plus one special token "
            f"({BYTE_ALPHABET + 1}); use e.g. 4096 or 10000"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counted = _Counter(docs)
    tok.train_from_iterator(counted, trainer=trainer, length=length)
    if counted.n == 0:
        raise UserError("no text to train the tokenizer on (the input has no stories)")
    out_dir.mkdir(parents=True, exist_ok=True)
    text = tok.to_str(pretty=True)  # what tok.save writes
    sample = ({"stories": counted.n, "bytes": counted.bytes} | (sample or {})
              | {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()})
    with atomic_file(out_dir / "tokenizer.json", "w", encoding="utf-8") as f:  # a full disk keeps the old pair
        f.write(text)
        f.flush()  # the tokenizer's bytes are on disk before its hash is recorded
        write_text_atomic(out_dir / SAMPLE_FILE, json.dumps(sample, indent=2))
    return out_dir / "tokenizer.json"


SAMPLE_FILE = "training-sample.json"  # beside tokenizer.json: the stories it was trained on


def training_sample(tok: TextTokenizer) -> dict | None:
    """What a tokenizer trained by `train_bpe` was trained on ({"stories", "bytes", ...}), when recorded."""
    return _read_sample(tok.path.parent / SAMPLE_FILE)


def _read_sample(f: Path) -> dict | None:
    try:
        sample = json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError):
        return None
    return sample if isinstance(sample, dict) else None


def describe_sample(sample: dict | None) -> str:
    if not sample:
        return "not recorded"
    limit = sample.get("max_stories")
    how = (f"the first {sample['stories']:,} stories" if limit and sample["stories"] >= limit
           else f"all {sample['stories']:,} stories")
    return f"{how} ({sample['bytes'] / 1e6:,.1f} MB)" + (f" of {sample['source']}" if sample.get("source") else "")


class _Counter:
    def __init__(self, it: Iterable[str]):
        self.it, self.n, self.bytes = it, 0, 0

    def __iter__(self) -> Iterator[str]:
        for x in self.it:
            self.n += 1
            self.bytes += len(x.encode("utf-8"))
            yield x


def tokenizer_file_name(tok: TextTokenizer) -> str:
    """The file name a tokenizer gets when copied into a checkpoint or run directory."""
    return "tokenizer.json" if tok.kind == "bpe" else "tokenizer.model"


def copy_tokenizer(tok: TextTokenizer, dest_dir: Path) -> Path:
    """Copy the tokenizer file into dest_dir (atomically: a reader never sees half a file)."""
    return copy_file_atomic(tok.path, dest_dir / tokenizer_file_name(tok))


# ------------------------------------------------------------------------------------------------ report


def report(tok: TextTokenizer, docs: list[str]) -> dict:
    """Vocabulary health on held-out stories: bytes/token, article tokens and their share, unused entries."""
    ids_per_doc = tok.encode_batch(docs)
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for ids in ids_per_doc:
        if ids:
            counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=tok.vocab_size)[: tok.vocab_size]
    total = int(counts.sum())
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    articles = []
    for word in ARTICLES:
        for space in (True, False):
            i = tok.piece_id(word, space)
            articles.append({
                "text": (" " if space else "") + word,
                "single_token": i is not None,
                "id": i,
                "share": (float(counts[i]) / total if i is not None and total else None),
            })
    special = tok.special_ids
    unused = sum(1 for i in range(tok.vocab_size) if counts[i] == 0 and i not in special)
    return {
        "tokenizer": str(tok.path),
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "trained_on": describe_sample(training_sample(tok)) if tok.kind == "bpe" else "not recorded",
        "stories": len(docs),
        "tokens": total,
        "bytes": n_bytes,
        "bytes_per_token": n_bytes / total if total else 0.0,
        "articles": articles,
        "article_token_share": sum(a["share"] or 0.0 for a in articles),
        "unused_vocab": unused,
        "unused_vocab_share": unused / tok.vocab_size,
    }


def format_report(rep: dict) -> str:
    lines = [
        f"tokenizer        {rep['tokenizer']} ({rep['kind']})",
        f"vocab size       {rep['vocab_size']:,}",
        f"trained on       {rep['trained_on']}",
        f"held-out text    {rep['stories']:,} stories, {rep['bytes']:,} bytes, {rep['tokens']:,} tokens",
        f"bytes per token  {rep['bytes_per_token']:.2f}",
        f"unused entries   {rep['unused_vocab']:,} of {rep['vocab_size']:,} ({rep['unused_vocab_share']:.1%}) "
        "never occur in this text",
        "articles         text     one token   share of all tokens",
    ]
    for a in rep["articles"]:
        share = f"{a['share']:.2%}" if a["share"] is not None else "-"
        mark = "yes" if a["single_token"] else "NO (split)"
        lines.append(f"                 {a['text']!r:8} {mark:11} {share}")
    lines.append(f"article tokens   {rep['article_token_share']:.2%} of all tokens")
    return "\n".join(lines)


def format_reports_side_by_side(reps: list[dict]) -> str:
    """Several reports as one table, a column per tokenizer (same held-out text)."""
    from pathlib import Path as _P

    names = [(_P(r["tokenizer"]).parent.name if _P(r["tokenizer"]).stem == "tokenizer"
              else _P(r["tokenizer"]).name)[-24:]
             for r in reps]
    width = max(16, *(len(n) for n in names))
    rows = [("", names),
            ("kind", [r["kind"] for r in reps]),
            ("vocab size", [f"{r['vocab_size']:,}" for r in reps]),
            ("bytes per token", [f"{r['bytes_per_token']:.2f}" for r in reps]),
            ("unused entries", [f"{r['unused_vocab']:,} ({r['unused_vocab_share']:.0%})" for r in reps])]
    for i, a in enumerate(reps[0]["articles"]):
        cells = []
        for r in reps:
            b = r["articles"][i]
            cells.append(f"1 token, {b['share']:.2%}" if b["single_token"] else "split")
        rows.append((f"{a['text']!r}", cells))
    rows.append(("all article tokens", [f"{r['article_token_share']:.2%}" for r in reps]))
    head = f"held-out text: {reps[0]['stories']:,} stories, {reps[0]['bytes']:,} bytes"
    return head + "\n" + "\n".join(f"{label:20} " + " ".join(f"{c:>{width}}" for c in cells) for label, cells in rows)
