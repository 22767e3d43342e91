"""Tiny real components built in-process: a byte-level BPE tokenizer with a ChatML template, a 2-layer
Llama with random weights, a sae-lens SAE with random weights, and small JSONL sources. Everything a test
needs to run the real pipeline in seconds, with no hub."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# SmolLM2's shape: a default system block when the conversation has none
CHATML_WITH_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    + CHATML
)
CORPUS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have? 3 + 4 = 7. #### 7",
    "The court ruled that the contract was void because one party lacked capacity.",
    "Water boils at 100 degrees Celsius at sea level; salt raises the boiling point.",
    "def add(a, b): return a + b  # a Python function that adds two numbers",
    "The treaty ended the war in 1648 and reshaped the map of Europe.",
]


TOPICS = {  # name -> (prompt, response) patterns of small chat sources: a target and three domains
    "math": ("What is {i} plus {j}?", "{i} + {j} = {k}. #### {k}"),
    "law": ("Is clause {i} of the contract void?", "The court held clause {i} void because it lacked consideration."),
    "chem": ("Which compound boils at {i}0 degrees?", "Compound {j} boils at {i}0 degrees and dissolves in water."),
    "code": ("What does def f{i}(x) return?", "def f{i}(x): return x * {j}  # multiply by {j}"),
}


def chat_sources(tokenizer, n: int = 8, max_length: int = 96) -> dict:
    """TOPICS encoded in the chat template: name -> n `Encoded` examples."""
    from mixopt.encoding import encode_chat

    def fill(pattern: str, i: int) -> str:
        return pattern.format(i=i, j=2 * i + 1, k=3 * i + 1)

    return {
        name: [encode_chat(tokenizer, fill(p, i), fill(r, i), max_length) for i in range(n)]
        for name, (p, r) in TOPICS.items()
    }


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>")
    fast.chat_template = CHATML
    return fast


# the sizes every tiny decoder here shares (Llama, Gemma 3): 32 wide, 4 heads over 2 key-value heads
TINY_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "pad_token_id": 0,
}


def tiny_llama(vocab_size: int, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=layers, **TINY_SIZES)
    return LlamaForCausalLM(config).eval()


def tiny_plain_tokenizer():
    """A base model's tokenizer as Gemma 3's is built: spaces kept as "▁" on the word after them (Metaspace),
    BOS added in front of every text, and no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials)
    tok.train_from_iterator(CORPUS * 4 + ["Answer: A Answer: B Answer: C Answer: D ?.,;:#\n 0123456789"] * 2, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def tiny_gemma3(vocab_size: int, layers: int = 2, sliding_window: int = 16, seed: int = 0):
    """Gemma 3's text architecture (Gemma3ForCausalLM, as the GGUF loads) at toy size: one sliding-window
    layer and one global layer, as the real model interleaves them."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        num_hidden_layers=layers,
        **TINY_SIZES,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=sliding_window,
        layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
        bos_token_id=2,
        eos_token_id=1,
    )
    return Gemma3ForCausalLM(config).eval()


def tiny_gemma_lm(identity: str, fmt=None, seed: int = 0):
    """A LoadedModel of `tiny_gemma3` with `tiny_plain_tokenizer` on the CPU, in `fmt` (default: resolved
    from the tokenizer, i.e. plain text)."""
    from mixopt.encoding import prompt_format
    from mixopt.model import LoadedModel

    tokenizer = tiny_plain_tokenizer()
    model = tiny_gemma3(len(tokenizer), seed=seed)
    fmt = fmt or prompt_format(tokenizer)
    return LoadedModel(model, tokenizer, "tiny-gemma3", identity, torch.device("cpu"), torch.float32, fmt)


def tiny_lm(identity: str, dtype: torch.dtype = torch.float32, layers: int = 2, seed: int = 0):
    """A LoadedModel of `tiny_llama` on the CPU. `identity` keys its cache entries: give each model its own."""
    from mixopt.model import LoadedModel

    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), layers=layers, seed=seed).to(dtype)
    return LoadedModel(model, tokenizer, "tiny", identity, torch.device("cpu"), dtype)


def tiny_sae(d_in: int = 32, d_sae: int = 64, layer: int = 1, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    return sae.eval()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_workspace(root: Path, layer: int = 1) -> Path:
    """Model, SAE, sources and a recipe under `root`; returns the recipe path."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    tiny_sae(layer=layer).save_model(root / "sae")
    data = root / "data"
    data.mkdir()
    write_jsonl(
        data / "math.jsonl",
        [{"q": f"What is {a} plus {a + 3}?", "a": f"{a} + {a + 3} = {2 * a + 3}. #### {2 * a + 3}"} for a in range(40)],
    )
    topics = {
        "law": "The court held that clause {i} of the contract was void.",
        "chem": "Compound {i} boils at {i}0 degrees and dissolves in water.",
        "code": "def f{i}(x): return x * {i}  # multiply by {i}",
    }
    for name, pattern in topics.items():
        write_jsonl(data / f"{name}.jsonl", [{"text": pattern.format(i=i)} for i in range(30)])
    recipe = root / "recipe.yaml"
    domains = "\n".join(f"  - {{name: {n}, source: {{path: data/{n}.jsonl}}, text: '{{text}}'}}" for n in topics)
    recipe.write_text(f"""\
seed: 0
model: {{path: ./model}}
sae: {{path: ./sae, layer: {layer}}}
target:
  name: math
  source: {{path: data/math.jsonl}}
  prompt: "{{q}}"
  response: "{{a}}"
domains:
{domains}
sts: {{top_k: 8, target_tokens: 300, domain_tokens: 200, batch_tokens: 256, bootstrap: 50}}
allocation: {{budget: 60, target_fraction: 0.5, max_epochs: 2, stability: 5}}
output: {{dir: out, formats: [arrow, parquet]}}
""")
    return recipe
