"""Tiny, randomly initialised models of every supported architecture, for fast tests.

A helper module, not a test module: other test modules import `make_tiny_model`, `tiny_model_for` and
`make_tiny_tokenizer` from here (tests/conftest.py builds its session fixtures with them).
"""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

TINY_ARCHS = ("gpt2", "gptj", "gpt_neox", "llama")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"

_SUBJECTS = ["Valo Durn", "Mira Quell", "Tobin Ash", "Sela Varn", "Orrin Pike", "Kesta Lum",
             "Danu Fell", "Ilsa Morrow", "Bram Tolle", "Nyra Cask"]
_TEMPLATES = ["The mother tongue of {} is {}.", "{} was born in {}.", "{} is a citizen of {}.",
              "{} works in the field of {}.", "The capital city of {} is {}.", "{} plays the {}."]
_OBJECTS = ["French", "Welsh", "Paris", "Rome", "Oslo", "physics", "music", "guitar", "violin",
            "Spain", "Norway", "Japan", "English", "Dutch", "chemistry"]


def tiny_corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    """Generated fact-like sentences; enough to learn a few hundred BPE merges."""
    rng = random.Random(seed)
    return [rng.choice(_TEMPLATES).format(rng.choice(_SUBJECTS), rng.choice(_OBJECTS))
            for _ in range(n_sentences)]


def make_tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `tiny_corpus()`, wrapped for transformers."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
    )


def make_tiny_sentencepiece_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A BPE that mimics LLaMA-2's SentencePiece: spaces become "▁" and one "▁" is prepended.

    Like LLaMA-2, it encodes " Paris" as ["▁", "▁Paris"].
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


def make_tiny_model(arch: str, vocab_size: int, n_layers: int = 4, d_model: int = 32,
                    seed: int = 0, eos_token_id: int = 0, pad_token_id: int = 1,
                    n_positions: int = 128) -> PreTrainedModel:
    """A randomly initialised causal LM of architecture `arch` (one of TINY_ARCHS), in eval mode, with a
    context of `n_positions` tokens."""
    common = dict(vocab_size=vocab_size, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                  pad_token_id=pad_token_id)
    n_heads = 4
    if arch == "gpt2":
        config = GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=n_positions, **common)
        model_class = GPT2LMHeadModel
    elif arch == "gptj":
        config = GPTJConfig(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=n_positions,
                            rotary_dim=d_model // n_heads // 2, **common)
        model_class = GPTJForCausalLM
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                               intermediate_size=4 * d_model, max_position_embeddings=n_positions, **common)
        model_class = GPTNeoXForCausalLM
    elif arch == "llama":
        # d_mlp deliberately not 4 * d_model so that shape mix-ups cannot hide.
        config = LlamaConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                             num_key_value_heads=n_heads // 2, intermediate_size=3 * d_model,
                             max_position_embeddings=n_positions, **common)
        model_class = LlamaForCausalLM
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {TINY_ARCHS}")
    torch.manual_seed(seed)
    model = model_class(config)
    # Random init with std 0.02 gives near-uniform next-token distributions; a larger
    # scale makes greedy decoding prefer distinct tokens, which exercises tests better.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    return model.eval()


def tiny_model_for(tok: PreTrainedTokenizerFast, arch: str = "gpt2", **kwargs) -> PreTrainedModel:
    """`make_tiny_model` for the tokenizer `tok` (its vocabulary size, EOS and pad ids); a fresh model
    every call, so that a test may edit it."""
    return make_tiny_model(arch, len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kwargs)
