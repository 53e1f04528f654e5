"""Shared fixtures: tiny, deterministic models built in well under a second, and an isolated cache.

The tiny models stand in for the real defaults (MiniLM, SmolLM2) so that every stage can be tested offline
and fast; the real ones are exercised only by tests marked `integration`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from slapcli.models import quiet_transformers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[PAD]", "[UNK]", "[CLS]", "[SEP]"]

# A few hundred words covering instructions, answers and code, so the BPE learns useful merges.
_CORPUS = """
Give three tips for staying healthy. Eat a balanced diet and make sure to include plenty of fruits and
vegetables. Exercise regularly to keep your body active and strong. Get enough sleep and maintain a consistent
sleep schedule. What are the three primary colors? The three primary colors are red, blue, and yellow.
Describe the structure of an atom. An atom is made up of a nucleus, which contains protons and neutrons,
surrounded by electrons that travel in orbits around the nucleus. How can we reduce air pollution? There are
a number of ways to reduce air pollution, such as shifting to renewable energy sources, encouraging the use of
public transportation, prohibiting the burning of fossil fuels, and planting more trees.
Write a function that returns the sum of a list of numbers in Python.
def total(numbers):
    result = 0
    for n in numbers:
        result += n
    return result
Translate the sentence into French: the cat sleeps on the warm window sill. Le chat dort sur le rebord.
Summarize the following paragraph in one sentence. The committee met on Monday to discuss the budget for the
coming year and agreed to increase spending on education while reducing administrative costs.
Classify the following animals as mammals or birds: dog, eagle, whale, sparrow. Mammals: dog, whale.
Birds: eagle, sparrow. Solve for x: 2x + 3 = 11. Subtract 3 from both sides to get 2x = 8, so x = 4.
Rewrite the text in a formal tone. Hey, can you send me the report by tomorrow? Could you please send me the
report by tomorrow? Generate a list of five creative names for a coffee shop. The Daily Grind, Bean There,
Brew Haven, The Roasted Bean, Espresso Yourself. Explain why the sky is blue. Sunlight is scattered by the
molecules of the atmosphere, and blue light is scattered more than other colors because it travels as shorter,
smaller waves. Who wrote the novel about a white whale? Herman Melville wrote Moby Dick in 1851.
SELECT name, age FROM users WHERE age > 30 ORDER BY name;
for (int i = 0; i < 10; i++) { printf("%d\\n", i); }
The user asked a question and the assistant gave a helpful, honest and short answer.
system user assistant instruction input output response prompt completion question answer
0 1 2 3 4 5 6 7 8 9 10 100 1000 ! ? . , ; : ' " ( ) [ ] { } < > = + - * / % # @ & | _
"""


def _build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE like GPT-2/SmolLM2: every string is encodable (no unknown tokens) and decoding is exact.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.save_pretrained(out)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (~600 tokens) with the ChatML special tokens, as a transformers folder."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    _build_tokenizer(out)
    return out


def _vocab_size(tokenizer_dir: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A random tiny BertModel (hidden 32, 2 layers, 2 heads) plus the tiny tokenizer, saved as safetensors."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_encoder")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512,
                        pad_token_id=tokenizer.convert_tokens_to_ids("[PAD]"))
    torch.manual_seed(1234)
    with quiet_transformers():
        BertModel(config).eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_proxy_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A random tiny LlamaForCausalLM (hidden 32, 2 layers, 2 heads, 1 kv head) plus the tiny tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_proxy")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(1234)
    with quiet_transformers():
        LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def slap_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own SLAP_CACHE_DIR, and the hub is off: tests never touch ~/.cache or the network."""
    cache = tmp_path / "slap-cache"
    monkeypatch.setenv("SLAP_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # huggingface_hub reads the variable once at import, so the module constant is what actually counts.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield cache


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> Iterator[None]:
    """The test models are tiny: with 2 intra-op threads on a busy 2-core machine they run 10-80x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
