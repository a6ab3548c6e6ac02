"""Text in and out on SmolLM2: stop strings, incremental detokenization, chat, the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from infinite_llm import SamplingParams
from infinite_llm.cli import build_parser

GREEDY = dict(temperature=0, ignore_eos=True)


def test_stop_string_cuts_the_text_before_it(smollm2_llm):
    prompt = "Count: 1, 2, 3, 4,"
    full = smollm2_llm.generate([prompt], SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)[0]
    text = full.outputs[0].text
    assert " 7," in text, text
    out = smollm2_llm.generate([prompt], SamplingParams(max_tokens=24, stop=[" 7,", "zzz"], **GREEDY),
                               use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(" 7,")]
    assert out.finish_reason == "stop" and out.stop_reason == " 7,"
    assert len(out.token_ids) < len(full.outputs[0].token_ids)
    smollm2_llm.engine.check_integrity()


def test_incremental_text_equals_a_full_decode_for_unicode(smollm2_llm):
    tokenizer = smollm2_llm.get_tokenizer()
    text = "naïve café — 日本語 😀 \n\tdone"
    ids = tokenizer.encode(text)
    from infinite_llm.engine.detokenizer import Detokenizer

    detokenizer = Detokenizer(tokenizer, (), skip_special_tokens=True)
    for token in ids:
        detokenizer.push(token)
    assert detokenizer.text == tokenizer.decode(ids) == text


def test_chat_applies_the_template(smollm2_llm):
    out = smollm2_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(max_tokens=20, temperature=0), use_tqdm=False)[0]
    assert out.prompt.startswith("<|im_start|>system") and out.prompt.endswith("<|im_start|>assistant\n")
    assert "Paris" in out.outputs[0].text


def test_string_prompt_equals_its_token_ids(smollm2_llm):
    prompt = "The three laws of robotics are"
    ids = smollm2_llm.get_tokenizer().encode(prompt)
    a, b = smollm2_llm.generate([prompt, ids], SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)
    assert a.prompt == prompt and b.prompt is None
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and a.outputs[0].text == b.outputs[0].text


def test_cli_help_documents_every_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    for flag in ("--model", "--chat", "--dtype", "--kv-cache-memory", "--max-tokens", "--temperature",
                 "--top-p", "--top-k", "--stop", "--ignore-eos", "--max-model-len", "--block-size"):
        assert flag in help_text
    for action in build_parser()._subparsers._group_actions[0].choices["generate"]._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_cli_generate_streams_the_greedy_text(smollm2_llm, smollm2_path):
    expected = smollm2_llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, **GREEDY),
                                    use_tqdm=False)[0].outputs[0].text
    result = subprocess.run(
        [sys.executable, "-m", "infinite_llm.cli", "generate", "--model", "smollm2", "--max-tokens", "8",
         "--ignore-eos", "--kv-cache-memory", "64MiB", "The capital of France is"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert result.stdout == expected + "\n"


def test_cli_reports_bad_arguments_clearly():
    result = subprocess.run(
        [sys.executable, "-m", "infinite_llm.cli", "generate", "--model", "no-such-model", "hi"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "no-such-model" in result.stderr


@pytest.mark.parametrize("size", ["lots", "0"])
def test_cli_bad_memory_size(size):
    result = subprocess.run(
        [sys.executable, "-m", "infinite_llm.cli", "generate", "--kv-cache-memory", size, "hi"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "memory size" in result.stderr
