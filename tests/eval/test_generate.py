"""Generation never truncates: a prompt over the context is refused by name, a fitted one runs,
and the fitting counter counts exactly the tokens generation feeds the model."""

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from eval.generate import generate, prompt_budget, prompt_token_counter
from eval.prompts import PromptTooLong, as_chat, fit_message, user_message
from eval.rag import default_embedder_path

CONTEXT, NEW = 64, 4  # positions of the toy model, tokens generated per answer


@pytest.fixture(scope="module")
def model_and_tokenizer():
    """A random 1-layer GPT-2 with a 64-position context, and the packaged MiniLM's WordPiece
    tokenizer given a one-line chat template (both local: no download)."""
    tokenizer = AutoTokenizer.from_pretrained(str(default_embedder_path()))
    tokenizer.chat_template = "{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}assistant:"
    tokenizer.eos_token = tokenizer.sep_token
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config), tokenizer


def test_an_over_long_prompt_is_refused_not_cut(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    long = as_chat(user_message("What is it?", ["word " * 200]))
    with pytest.raises(PromptTooLong, match=r"#1 \("):
        generate(model, tokenizer, [as_chat("short"), long], NEW)


def test_a_fitted_prompt_generates_and_is_counted_exactly(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    count = prompt_token_counter(tokenizer)
    budget = prompt_budget(model, NEW)
    assert budget == CONTEXT - NEW
    fitted = fit_message("What is it?", ["alpha " * 80, "beta " * 40], count, budget)
    assert fitted.first_cut and fitted.dropped == 1 and fitted.tokens <= budget
    rendered = tokenizer.apply_chat_template(as_chat(fitted.text), tokenize=False, add_generation_prompt=True)
    assert len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) == fitted.tokens
    [out] = generate(model, tokenizer, [as_chat(fitted.text)], NEW)
    assert 0 < out.new_tokens <= NEW
