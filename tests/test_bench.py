"""ovchat bench on the real demo model: the prompt is exact, the result is well formed (no timed
assertions: the figures depend on the machine)."""

import json
import math

import pytest

from ovchat.errors import InputError
from conftest import run_ovchat

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    import openvino_genai

    return openvino_genai.Tokenizer(str(demo_model))


@pytest.mark.parametrize("n", [40, 84, 300])
def test_prompt_is_the_templated_text_cut_or_padded_to_n_tokens(tokenizer, n):
    from ovchat.bench import PROMPT_TEXT, prompt_ids

    ids = prompt_ids(tokenizer, n)
    assert len(ids) == n
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    assert PROMPT_TEXT.split()[0] in text
    warmup = prompt_ids(tokenizer, n, offset=7)
    assert len(warmup) == n and warmup != ids
    assert prompt_ids(tokenizer, n) == ids  # deterministic: every peer gets the same ids


def test_prompt_shorter_than_the_template_is_refused(tokenizer):
    from ovchat.bench import prompt_ids

    with pytest.raises(InputError, match="at least"):
        prompt_ids(tokenizer, 5)


def test_run_benchmark_returns_runs_and_summary(demo_model):
    from ovchat.bench import METRICS, run_benchmark
    from ovchat.render import format_bench

    result = run_benchmark(str(demo_model), prompt_tokens=40, new_tokens=6, runs=2, device="CPU")
    assert result.device == "CPU" and len(result.runs) == 2
    for sample in [result.warmup, *result.runs]:
        assert sample.prompt_tokens == 40 and sample.generated_tokens == 6  # forced length
        assert sample.load_s > 0 and sample.ttft_s > 0 and sample.decode_tokens_per_s > 0
        assert sample.peak_rss_bytes > 50 * 2 ** 20
        assert sample.cold_start_s > sample.load_s  # includes interpreter start and imports
    for name in METRICS:
        stat = result.summary[name]
        assert stat.min <= stat.median <= stat.max and math.isfinite(stat.median)
    assert result.versions["openvino-genai"] != "absent"
    assert json.loads(json.dumps(result.as_dict()))["summary"]["ttft_s"]["median"] > 0
    table = format_bench(result)
    for label in ("load time", "time to first token", "decode speed", "peak RSS", "cold start"):
        assert label in table


def test_bench_command_json_and_bad_options(demo_model):
    done = run_ovchat("bench", "-m", str(demo_model), "--runs", "1", "--prompt-tokens", "40",
                      "--new-tokens", "4", "--device", "CPU", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert len(data["runs"]) == 1 and data["runs"][0]["generated_tokens"] == 4
    assert set(data["summary"]) >= {"load_s", "ttft_s", "decode_tokens_per_s", "peak_rss_bytes", "cold_start_s"}
    bad = run_ovchat("bench", "-m", str(demo_model), "--runs", "0")
    assert bad.returncode == 2 and b"--runs" in bad.stderr
    short = run_ovchat("bench", "-m", str(demo_model), "--prompt-tokens", "3", "--runs", "1")
    assert short.returncode == 1
    assert short.stderr.decode().strip().splitlines()[-1].startswith("Error: the chat template alone takes")
