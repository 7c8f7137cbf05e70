"""A tiny causal language model built offline in a few seconds, for tests.

A byte-level BPE tokenizer trained on a few sentences and wrapped in
``PreTrainedTokenizerFast`` with a simple chat template, and a randomly initialised
2-layer Llama (hidden size 64). Its embeddings are untied (with tied ones greedy decoding
kept choosing a special token), and its generation config suppresses the special tokens
and every token that does not decode to printable text on its own, so greedy output is
deterministic, visible, and runs to ``max_new_tokens``.
"""

from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "the gateway streams tokens from a model to many clients over websockets",
    "a slow client must not slow down everyone else, so queues stay bounded",
    "heartbeats find clients that went away without saying goodbye",
    "every backend yields typed chunks and the protocol module encodes them",
    "tiny models are random but they are fast and need no downloads at all",
    "Hello, world! How are you today? 0123456789",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tiny_model(path: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(SENTENCES * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)

    special_ids = [fast.convert_tokens_to_ids(token) for token in specials]
    suppress = sorted(
        {*special_ids}
        | {
            index
            for index in range(len(fast))
            if not (text := fast.decode([index])) or "\ufffd" in text or not text.isprintable()
        }
    )
    bos, eos, pad = special_ids
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, suppress_tokens=suppress, do_sample=False
    )
    model.save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys

    print(build_tiny_model(Path(sys.argv[1])))
