from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slapcli import proxy
from slapcli.io.layouts import Example, Turn
from slapcli.models import load_causal_lm, load_tokenizer, resolve_model
from slapcli.proxy import (
    IGNORE_INDEX,
    EncodedExample,
    collate,
    compute_losses,
    encode_example,
    encode_examples,
    response_loss_sum,
    response_losses,
)
from slapcli.proxy import loss as proxy_loss


def _alpaca(prompt: str, answer: str) -> Example:
    return Example((Turn("user", prompt), Turn("assistant", answer)))


EXAMPLES = [
    _alpaca("Give three tips for staying healthy.", "Eat well, exercise and sleep."),
    _alpaca("What are the three primary colors?", "Red, blue, and yellow."),
    Example((Turn("system", "You are helpful."), Turn("user", "Solve for x: 2x + 3 = 11."),
             Turn("assistant", "x = 4."), Turn("user", "And 2x = 8?"), Turn("assistant", "Also x = 4."))),
    _alpaca("Write a function that returns the sum of a list of numbers in Python.",
            "def total(numbers):\n    return sum(numbers)"),
    Example((Turn("assistant", "The cat sleeps on the warm window sill."),)),
    _alpaca("Translate: the cat", "Le chat " * 12),
    _alpaca("Hi", "Hello!"),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path) -> Any:
    return load_tokenizer(resolve_model(str(tiny_tokenizer_dir)))


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A byte-level tokenizer without ChatML tokens, to exercise the plain fallback format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", "<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["User: Assistant: hello world the cat sleeps"] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>")


@pytest.fixture(scope="module")
def proxy_model(tiny_proxy_dir: Path) -> Any:
    _, model = load_causal_lm(resolve_model(str(tiny_proxy_dir)), torch.device("cpu"), torch.float32)
    return model


def _masked_runs(enc: EncodedExample) -> list[list[int]]:
    runs: list[list[int]] = []
    prev = False
    for tid, m in zip(enc.input_ids, enc.response_mask, strict=True):
        if m and not prev:
            runs.append([])
        if m:
            runs[-1].append(tid)
        prev = m
    return runs


def test_chatml_mask_decodes_to_response_and_end_token(tokenizer: Any) -> None:
    ex = EXAMPLES[0]
    enc = encode_example(tokenizer, ex, 512)
    masked = [t for t, m in zip(enc.input_ids, enc.response_mask, strict=True) if m]
    assert tokenizer.decode(masked) == "Eat well, exercise and sleep.<|im_end|>"
    assert tokenizer.decode(enc.input_ids) == (
        "<|im_start|>user\nGive three tips for staying healthy.<|im_end|>\n"
        "<|im_start|>assistant\nEat well, exercise and sleep.<|im_end|>\n")
    assert enc.n_response_tokens == len(masked)
    assert enc.n_prompt_tokens + enc.n_response_tokens == len(enc.input_ids)
    assert not enc.truncated


def test_multi_turn_counts_every_assistant_turn(tokenizer: Any) -> None:
    enc = encode_example(tokenizer, EXAMPLES[2], 512)
    runs = [tokenizer.decode(r) for r in _masked_runs(enc)]
    assert runs == ["x = 4.<|im_end|>", "Also x = 4.<|im_end|>"]


def test_text_layout_is_all_response(tokenizer: Any) -> None:
    enc = encode_example(tokenizer, EXAMPLES[4], 512)
    assert [tokenizer.decode(r) for r in _masked_runs(enc)] == ["The cat sleeps on the warm window sill.<|im_end|>"]


def test_literal_special_token_in_text_cannot_forge_turns(tokenizer: Any) -> None:
    enc = encode_example(tokenizer, _alpaca("say <|im_end|>", "ok"), 512)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert enc.input_ids.count(end_id) == 2  # the two real turn ends only


def test_plain_fallback_format(plain_tokenizer: Any) -> None:
    enc = encode_example(plain_tokenizer, _alpaca("hello", "the cat"), 512)
    assert plain_tokenizer.decode(enc.input_ids) == "<s>User: hello\nAssistant: the cat</s>\n"
    masked = [t for t, m in zip(enc.input_ids, enc.response_mask, strict=True) if m]
    assert plain_tokenizer.decode(masked) == "the cat</s>"


def test_batch_encoding_equals_single(tokenizer: Any) -> None:
    batch = encode_examples(tokenizer, EXAMPLES, 64)
    assert batch == [encode_example(tokenizer, e, 64) for e in EXAMPLES]
    assert encode_examples(tokenizer, [], 64) == []


def test_truncation_keeps_beginning_when_response_survives(tokenizer: Any) -> None:
    full = encode_example(tokenizer, EXAMPLES[5], 10_000)
    first = full.response_mask.index(True)
    cut = encode_example(tokenizer, EXAMPLES[5], first + 3)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[:first + 3]
    assert cut.n_response_tokens == 3 and cut.n_prompt_tokens == first


def test_truncation_cuts_prompt_from_left_when_no_response_would_remain(tokenizer: Any) -> None:
    ex = _alpaca("Describe the structure of an atom. " * 20, "An atom has a nucleus and electrons.")
    full = encode_example(tokenizer, ex, 10_000)
    first = full.response_mask.index(True)
    max_tokens = 16
    assert first > max_tokens
    cut = encode_example(tokenizer, ex, max_tokens)
    assert cut.truncated and len(cut.input_ids) == max_tokens
    assert cut.n_response_tokens == max_tokens // 2  # the response gets up to half the budget
    start = first + max_tokens // 2 - max_tokens
    assert cut.input_ids == full.input_ids[start:start + max_tokens]
    assert cut.response_mask[:max_tokens // 2] == [False] * (max_tokens // 2)
    # a short response is kept whole, and the rest of the budget goes to the end of the prompt
    short_ex = _alpaca("Describe the structure of an atom. " * 20, "Hi")
    short_full = encode_example(tokenizer, short_ex, 10_000)
    short = encode_example(tokenizer, short_ex, max_tokens)
    assert short.input_ids == short_full.input_ids[-max_tokens:]
    assert short.n_response_tokens == short_full.n_response_tokens
    one = encode_example(tokenizer, ex, 1)
    assert one.input_ids == [full.input_ids[first]] and one.response_mask == [True]
    with pytest.raises(ValueError):
        encode_example(tokenizer, ex, 0)


def test_collate_pads_right_and_masks_labels() -> None:
    a = EncodedExample([5, 6, 7], [False, True, True], 1, 2, False)
    b = EncodedExample([8, 9], [True, False], 1, 1, False)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError):
        collate([], 0)


def _naive_losses(model: Any, encoded: list[EncodedExample]) -> list[float]:
    """Each row alone, no padding, full logits: the reference the batched path must match."""
    return [mean for mean, _, _ in _naive_terms(model, encoded)]


@pytest.mark.parametrize("fast_path", [True, False])
def test_response_losses_match_naive_loop(tokenizer: Any, proxy_model: Any, fast_path: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if not fast_path:
        monkeypatch.setattr(proxy_loss, "_head_split", lambda model: None)
    encoded = encode_examples(tokenizer, EXAMPLES, 48)
    batch = collate(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        got = response_losses(proxy_model, batch)
    assert got.dtype == torch.float32 and got.shape == (len(EXAMPLES),)
    np.testing.assert_allclose(got.numpy(), _naive_losses(proxy_model, encoded), rtol=1e-5, atol=1e-5)


def _naive_terms(model: Any, encoded: list[EncodedExample]) -> list[tuple[float, float, float]]:
    """Per row alone: (mean response loss, loss of its last response token, mean loss of its second half)."""
    out = []
    with torch.no_grad():
        for e in encoded:
            ids = torch.tensor([e.input_ids])
            logits = model(input_ids=ids).logits[0].float()
            m = torch.tensor(e.response_mask)[1:]
            per_token = F.cross_entropy(logits[:-1][m], ids[0, 1:][m], reduction="none")
            tail = per_token[len(per_token) // 2:]
            out.append((per_token.mean().item(), per_token[-1].item(), tail.mean().item()))
    return out


@pytest.mark.parametrize("fast_path", [True, False])
def test_response_loss_terms_match_naive_loop(tokenizer: Any, proxy_model: Any, fast_path: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if not fast_path:
        monkeypatch.setattr(proxy_loss, "_head_split", lambda model: None)
    encoded = encode_examples(tokenizer, EXAMPLES, 48)
    with torch.no_grad():
        got = torch.stack(proxy.response_loss_terms(proxy_model, collate(encoded, tokenizer.pad_token_id)), 1)
    assert got.shape == (len(EXAMPLES), len(proxy.LOSS_TERMS))
    np.testing.assert_allclose(got.numpy(), _naive_terms(proxy_model, encoded), rtol=1e-5, atol=1e-5)
    terms = proxy.compute_loss_terms(proxy_model, tokenizer, EXAMPLES, 48, batch_size=2, device=torch.device("cpu"))
    np.testing.assert_allclose(terms, _naive_terms(proxy_model, encoded), rtol=1e-5, atol=1e-5)


def test_loss_pass_scores_the_head_in_pieces(tokenizer: Any, proxy_model: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Without gradients the LM head runs HEAD_CHUNK_TOKENS response positions at a time (peak memory stays flat
    # whatever the longest batch); the values are the one-piece values, and with gradients it stays one piece.
    encoded = encode_examples(tokenizer, EXAMPLES, 48)
    batch = collate(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        whole = torch.stack(proxy.response_loss_terms(proxy_model, batch), 1)
    n_positions = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    head = proxy_model.get_output_embeddings()
    sizes: list[int] = []
    hook = head.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    monkeypatch.setattr(proxy_loss, "HEAD_CHUNK_TOKENS", 5)
    try:
        with torch.no_grad():
            pieces = torch.stack(proxy.response_loss_terms(proxy_model, batch), 1)
        assert max(sizes) == 5 and sum(sizes) == n_positions
        sizes.clear()
        proxy.response_loss_terms(proxy_model, batch)[0].sum().backward()
        assert sizes == [n_positions]
    finally:
        hook.remove()
        proxy_model.zero_grad()
    np.testing.assert_allclose(pieces.numpy(), whole.numpy(), rtol=1e-6, atol=1e-6)


def test_response_losses_bf16_model_gives_float32(tokenizer: Any, tiny_proxy_dir: Path) -> None:
    _, model = load_causal_lm(resolve_model(str(tiny_proxy_dir)), torch.device("cpu"), torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    encoded = encode_examples(tokenizer, EXAMPLES, 48)
    with torch.no_grad():
        got = response_losses(model, collate(encoded, tokenizer.pad_token_id))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    _, ref_model = load_causal_lm(resolve_model(str(tiny_proxy_dir)), torch.device("cpu"), torch.float32)
    np.testing.assert_allclose(got.numpy(), _naive_losses(ref_model, encoded), rtol=0.02, atol=0.02)


def test_response_loss_sum_gradient_is_sum_of_row_gradients(tokenizer: Any, proxy_model: Any) -> None:
    encoded = encode_examples(tokenizer, EXAMPLES[:3], 48)
    param = proxy_model.model.layers[-1].mlp.down_proj.weight
    proxy_model.zero_grad()
    response_loss_sum(proxy_model, collate(encoded, tokenizer.pad_token_id)).backward()
    together = param.grad.clone()
    separate = torch.zeros_like(together)
    for e in encoded:
        proxy_model.zero_grad()
        response_loss_sum(proxy_model, collate([e], tokenizer.pad_token_id)).backward()
        separate += param.grad
    proxy_model.zero_grad()
    torch.testing.assert_close(together, separate, rtol=1e-4, atol=1e-6)


def test_compute_losses_restores_input_order(tokenizer: Any, proxy_model: Any) -> None:
    done: list[int] = []
    proxy_model.train()
    losses = compute_losses(proxy_model, tokenizer, EXAMPLES, 48, batch_size=3, device=torch.device("cpu"),
                            progress_callback=done.append)
    assert proxy_model.training  # the caller's mode is restored
    proxy_model.eval()
    assert losses.dtype == np.float32 and losses.shape == (len(EXAMPLES),)
    expected = _naive_losses(proxy_model, encode_examples(tokenizer, EXAMPLES, 48))
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-5)
    assert sum(done) == len(EXAMPLES) and len(done) == 3
    assert compute_losses(proxy_model, tokenizer, [], 48, 3, torch.device("cpu")).shape == (0,)


def test_length_sorted_batches_cover_all_rows_once() -> None:
    lengths = [5, 1, 9, 3, 9, 2, 7]
    batches = proxy.length_sorted_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [lengths[i] for b in batches for i in b] == sorted(lengths, reverse=True)


def test_token_budget_batches_respect_both_limits_and_cut_only_when_needed() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(1, 300, size=int(rng.integers(0, 60))).tolist()
        max_rows, max_tokens = int(rng.integers(1, 20)), int(rng.integers(1, 2000))
        batches = proxy.token_budget_batches(lengths, max_rows, max_tokens)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(lengths, reverse=True)
        for k, b in enumerate(batches):
            padded = len(b) * max(lengths[i] for i in b)
            assert len(b) <= max_rows and (padded <= max_tokens or len(b) == 1)
            if k + 1 < len(batches):  # a cut only where one more row would break a limit
                assert len(b) == max_rows or (len(b) + 1) * lengths[b[0]] > max_tokens
    with pytest.raises(ValueError):
        proxy.token_budget_batches([3], 0, 10)
