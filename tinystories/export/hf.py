"""Hugging Face transformers export: a folder that `AutoModelForCausalLM` and `AutoTokenizer` load offline
(config.json, model.safetensors, generation_config.json, the tokenizer as tokenizer.json, a model card README.md).

    tinystories export --format hf --checkpoint CK --out DIR

Our model rotates interleaved pairs like llama2.c; Hugging Face's Llama rotates halves, so the export permutes the
rows of wq and wk (as HF's convert_llama_weights_to_hf does). A SentencePiece tokenizer is rebuilt as a
`tokenizers` tokenizer that encodes and decodes like it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tinystories.core.atomic import atomic_dir
from tinystories.core.errors import UserError
from tinystories.data.tokenizer import sentencepiece_proto
from tinystories.export.outputs import prepare_out_dir

# ------------------------------------------------------------------------------------------------ weights


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from interleaved-pair rotary layout to HF's rotate-half layout (convert_llama_weights_to_hf)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        s, d = f"layers.{i}.", f"model.layers.{i}."
        out[d + "self_attn.q_proj.weight"] = permute_to_hf(sd[s + "attention.wq.weight"], cfg.n_heads)
        out[d + "self_attn.k_proj.weight"] = permute_to_hf(sd[s + "attention.wk.weight"], cfg.kv_heads)
        out[d + "self_attn.v_proj.weight"] = sd[s + "attention.wv.weight"]
        out[d + "self_attn.o_proj.weight"] = sd[s + "attention.wo.weight"]
        out[d + "mlp.gate_proj.weight"] = sd[s + "feed_forward.w1.weight"]
        out[d + "mlp.up_proj.weight"] = sd[s + "feed_forward.w3.weight"]
        out[d + "mlp.down_proj.weight"] = sd[s + "feed_forward.w2.weight"]
        out[d + "input_layernorm.weight"] = sd[s + "attention_norm.weight"]
        out[d + "post_attention_layernorm.weight"] = sd[s + "ffn_norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ tokenizer


def _hf_token_ids(tok) -> tuple[int, list[int]]:
    """(bos, eos list) for HF: eos are our stop ids, the primary one first (EOS for SentencePiece)."""
    bos = tok.doc_start_id
    stops = sorted(tok.stop_ids)
    if tok.kind == "sentencepiece":
        eos = tok.sp.eos_id()
        if eos >= 0:
            stops = [eos] + [s for s in stops if s != eos]
    return bos, stops


def _sentencepiece_model(path, proto, pieces: list[tuple[str, float, int]]):
    """The `tokenizers` model of a SentencePiece BPE (merges ordered by the merged piece's score) or unigram."""
    from tokenizers import models

    spec, normal = proto.trainer_spec, proto.SentencePiece.NORMAL
    unk = spec.unk_piece if spec.unk_id >= 0 else None
    if spec.model_type == spec.BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        mergeable = {piece for piece, _, kind in pieces if kind == normal}  # not control/byte/unk
        merges = []
        for piece, score, kind in pieces:
            if kind != normal:
                continue
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in mergeable and right in mergeable:
                    merges.append((-score, vocab[left], vocab[right], left, right))
        merges = [(m[3], m[4]) for m in sorted(merges)]
        return models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback)
    if spec.model_type == spec.UNIGRAM:
        return models.Unigram([(piece, score) for piece, score, _ in pieces], spec.unk_id if unk else None,
                              spec.byte_fallback)
    raise UserError(f"{path}: only BPE and unigram SentencePiece models can be exported to Hugging Face")


def sentencepiece_to_hf_tokenizer(tok):
    """A `tokenizers.Tokenizer` that encodes and decodes like the SentencePiece model (BPE or unigram, byte fallback).

    Built the way transformers' LlamaConverter builds Llama's tokenizer.json (legacy normalizer: prepend "▁",
    spaces to "▁"; BPE merges ordered by the merged piece's score), plus SentencePiece's remove_extra_whitespaces
    normalization (drop leading/trailing spaces, collapse runs of spaces), which Llama 2's tokenizer turns off but
    llama2.c's small tokenizers keep on."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers

    proto = sentencepiece_proto(tok.path)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if norm.precompiled_charsmap:
        raise UserError(f"{tok.path}: SentencePiece models with a normalization charsmap (e.g. nfkc) cannot be "
                        "exported to Hugging Face yet")
    if spec.treat_whitespace_as_suffix or not norm.add_dummy_prefix:
        raise UserError(f"{tok.path}: this SentencePiece whitespace setting is not supported by the Hugging Face "
                        "export")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    fast = Tokenizer(_sentencepiece_model(tok.path, proto, pieces))
    special = (proto.SentencePiece.UNKNOWN, proto.SentencePiece.CONTROL)
    fast.add_special_tokens([AddedToken(piece, normalized=False, special=True)
                             for piece, _, kind in pieces if kind in special])
    steps = []
    if norm.remove_extra_whitespaces:
        # spaces only, not newlines
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    steps += [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    fast.normalizer = normalizers.Sequence(steps)
    fast.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(content=" ", left=1, right=0)])
    return fast


def _hf_tokenizer(tok, max_len: int):
    """A transformers fast tokenizer that encodes like ours; `tokenizer(text)` puts the start-of-story token first,
    as the model saw stories in training (add_special_tokens=False gives the bare text tokens)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    if tok.kind == "bpe":
        fast = Tokenizer.from_file(str(tok.path))
        start = tok.id_to_piece(tok.doc_start_id)
        if start == "<|endoftext|>":
            special = {"bos_token": start, "eos_token": start, "unk_token": start, "pad_token": start}
        else:
            special = {"bos_token": start, "eos_token": "</s>", "pad_token": "</s>"}
    else:
        fast = sentencepiece_to_hf_tokenizer(tok)
        sp = tok.sp
        special = {name: sp.id_to_piece(i) for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                                                            ("unk_token", sp.unk_id())) if i >= 0}
        start = special["bos_token"]
    fast.post_processor = processors.TemplateProcessing(
        single=f"{start} $A", pair=f"{start} $A {start} $B:1", special_tokens=[(start, tok.doc_start_id)])
    return PreTrainedTokenizerFast(tokenizer_object=fast, clean_up_tokenization_spaces=False, model_max_length=max_len,
                                   **special)


def _save_tokenizer(tok, max_len: int, folder: Path) -> None:
    """tokenizer.json, tokenizer_config.json (with the class name transformers 4 and 5 both load) and
    special_tokens_map.json."""
    hf_tok = _hf_tokenizer(tok, max_len)
    hf_tok.save_pretrained(str(folder))
    tc_file = folder / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # the portable name (transformers 4 and 5)
    tc_file.write_text(json.dumps(tc, indent=2) + "\n")
    smap = folder / "special_tokens_map.json"
    if not smap.exists():
        smap.write_text(json.dumps({k: v for k, v in hf_tok.special_tokens_map.items()}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ folder


def _config_json(cfg, bos: int, eos: list[int]) -> str:
    """config.json of a LlamaForCausalLM with our model's shape, without the keys a causal LM does not use."""
    from transformers import LlamaConfig

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=bos, eos_token_id=eos[0] if len(eos) == 1 else eos,
        attention_bias=False, mlp_bias=False, architectures=["LlamaForCausalLM"],
    )
    d = hf_cfg.to_dict()
    for k in ("_name_or_path", "id2label", "label2id", "chunk_size_feed_forward", "problem_type",
              "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder"):
        d.pop(k, None)
    d["torch_dtype"] = "float32"
    d["dtype"] = "float32"
    d.setdefault("rope_theta", cfg.rope_theta)
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def export_hf(model, tok, out: Path, force: bool = False, card: str | None = None) -> Path:
    """Write a directory that transformers' AutoModelForCausalLM / AutoTokenizer load offline, with `card` as its
    README.md (the Hub's model card)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    cfg = model.cfg
    prepare_out_dir(out, force, "Hugging Face export")
    bos, eos = _hf_token_ids(tok)
    config_text = _config_json(cfg, bos, eos)
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(config_text)
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        gen = GenerationConfig(bos_token_id=bos, eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=eos[0])
        gen.save_pretrained(str(tmp))
        _save_tokenizer(tok, cfg.max_seq_len, tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
    return out
