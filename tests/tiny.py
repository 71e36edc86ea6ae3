"""Tiny random models and a tiny tokenizer, written as real Hugging Face folders (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? paris is the capital of france.",
    "to be or not to be, that is the question",
    "a language model predicts the next token from the ones before it",
    "hello, how are you today? i am fine, thank you.",
] * 20


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with ChatML special tokens and a pad token distinct from EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


ARCHS = {
    # intermediate 88 / hidden 48: out_features not multiples of 32 (the bitsandbytes repack trap).
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2"),  # biases on q/k/v
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True),
    "gemma": dict(model_type="gemma", head_dim=16, tie_word_embeddings=True),  # (1 + w) norms, scaled embeddings
    "gemma2": dict(model_type="gemma2", head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                   tie_word_embeddings=True),
    "granite": dict(model_type="granite", logits_scaling=4.0, embedding_multiplier=2.0,
                    residual_multiplier=0.5, attention_multiplier=0.25),
    "qwen3": dict(model_type="qwen3", head_dim=16),  # q_norm / k_norm per head
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                        tie_word_embeddings=True),
    "phi3": dict(model_type="phi3"),  # fused qkv_proj and gate_up_proj
    "olmo2": dict(model_type="olmo2"),  # norms after attention and MLP, q/k norms over all heads
    # Llama 3.1's rope scaling, with a short original context so all three frequency bands occur
    "llama3-rope": dict(model_type="llama", rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    # Mixtures of experts: 4 experts, top-2; expert widths 88 / 56 are not multiples of 32 either.
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=56,
                      shared_expert_intermediate_size=88, decoder_sparse_step=1, norm_topk_prob=False),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=56,
                      decoder_sparse_step=1, norm_topk_prob=True, head_dim=16),
}


def make_config(arch: str = "llama", hidden: int = 64, intermediate: int = 88, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, vocab: int = 320):
    from transformers import AutoConfig

    spec = dict(ARCHS[arch])
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(
        model_type, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=256, tie_word_embeddings=spec.pop("tie_word_embeddings", False),
        bos_token_id=1, eos_token_id=2, pad_token_id=3, **spec)


def make_model_dir(out: Path, arch: str = "llama", seed: int = 0, dtype=torch.bfloat16, **shape) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(arch, **shape)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # larger weights than the default init, so 4-bit error and LoRA effects show
        for p in model.parameters():
            if p.dim() in (2, 3):  # 3: fused expert weights of MoE models
                p.normal_(0, 0.1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    make_tokenizer(config.vocab_size).save_pretrained(out)
    return out


def make_sentencepiece_tokenizer(out: Path, kind: str = "llama", vocab_size: int = 320) -> Path:
    """A SentencePiece BPE tokenizer trained on the tiny corpus, saved as tokenizer.model beside the
    transformers tokenizer that wraps it (LlamaTokenizer, or GemmaTokenizer with Gemma's turn tokens
    and no dummy prefix), as Llama 2 / Mistral / Gemma folders carry both. Ids: <unk> 0, <s> 1, </s> 2,
    <pad> 3, as the tiny configs say."""
    import io

    import sentencepiece as spm
    from transformers import GemmaTokenizer, LlamaTokenizer

    gemma = kind == "gemma"
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama 2's and Gemma's
        add_dummy_prefix=not gemma, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"] if gemma else [],
        minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize())}
    # BPE merges in SentencePiece's order: the merged piece's score, highest first
    pieces = [(p, i) for p, i in vocab.items() if not (sp.IsUnknown(i) or sp.IsControl(i) or sp.IsByte(i))]
    merges = sorted(((sp.GetScore(i), vocab[p[:k]], vocab[p[k:]], (p[:k], p[k:])) for p, i in pieces
                     for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab),
                    key=lambda m: (-m[0], m[1], m[2]))
    cls = GemmaTokenizer if gemma else LlamaTokenizer
    template = (("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                 "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}") if gemma else
                "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    tok = cls(vocab=vocab, merges=[m[3] for m in merges], unk_token="<unk>", bos_token="<s>", eos_token="</s>",
              pad_token="<pad>", add_bos_token=True, chat_template=template)
    if gemma:  # the turn markers are added (special) tokens in Gemma's tokenizer files
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.save_pretrained(out)
    return out
