"""scripts/bench_peers.py's report on made-up figures (the peers themselves are never run here)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_peers.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample(load, ttft, tps, rss_mb, cold):
    return {"load_s": load, "ttft_s": ttft, "decode_tokens_per_s": tps, "peak_rss_bytes": rss_mb << 20,
            "cold_start_s": cold}


def test_targets_and_table_from_medians():
    b = load_script()
    peers = {
        "ovchat": [sample(1.0, 0.030, 150, 300, 1.5), sample(1.2, 0.040, 140, 310, 1.7), sample(1.1, 0.035, 145, 305, 1.6)],
        "optimum": [sample(1.0, 0.100, 50, 1300, 5.0)],
        "llama-cpp": [sample(0.1, 0.060, 100, 200, 0.4)],
    }
    report = {"model": "m.gguf", "prompt_tokens": 84, "new_tokens": 128, "runs": 3, "date": "today",
              "machine": {"cpu": "cpu", "cores": 2, "memory_gb": 24},
              "load_average": {"before": [0.1, 0, 0], "after": [1.0, 0, 0]},
              "peers": {name: {"samples": s, "summary": b.summarize(s), "install_bytes": size << 20}
                        for (name, s), size in zip(peers.items(), (250, 1400, 130))}}
    report["peers"]["genai-gguf"] = {"skipped": "no GGUF for a Hugging Face checkpoint"}
    assert report["peers"]["ovchat"]["summary"]["decode_tokens_per_s"] == {"median": 145, "min": 140, "max": 150}
    report["targets"] = b.targets(report)
    met = {t["target"]: t["met"] for t in report["targets"]}
    assert met["decode >= 1.8x optimum"] is True  # 145 / 50 = 2.9
    assert met["decode >= 1.2x llama.cpp"] is True  # 1.45
    assert met["TTFT <= 0.5x optimum"] is True and met["TTFT <= 0.5x llama.cpp"] is False  # 35 / 60 ms
    assert met["peak RSS <= 0.3x optimum"] is True and met["peak RSS <= 1.3x llama.cpp"] is False
    assert met["install <= 0.2x optimum"] is True and met["cold start < 2 s"] is True
    text = b.format_report(report)
    assert "145.0 tok/s" in text and "skipped: no GGUF" in text and "MISSED" in text
    assert "vs optimum" in text and "2.90x" in text


def test_llama_cpp_quantizations_are_peers_of_their_own_with_the_phi3_size_targets():
    b = load_script()
    peers = {"ovchat": [sample(4.0, 0.5, 18, 2000, 5.0)], "llama-cpp:Q4_K_M": [sample(3.0, 0.6, 20, 4000, 6.0)],
             "llama-cpp:Q4_0": [sample(2.5, 0.5, 24, 4200, 5.5)]}
    report = {"model": "phi3", "prompt_tokens": 84, "new_tokens": 64, "runs": 1, "date": "today",
              "machine": {"cpu": "cpu", "cores": 2, "memory_gb": 24},
              "load_average": {"before": [0.1, 0, 0], "after": [1.0, 0, 0]},
              "peers": {name: {"samples": s, "summary": b.summarize(s)} for name, s in peers.items()}}
    report["targets"] = b.targets(report)
    met = {t["target"]: (t["met"], t["ratio"]) for t in report["targets"]}
    assert met == {"cold start <= 1.0x llama.cpp Q4_K_M": (True, 0.833), "decode >= 0.8x llama.cpp Q4_K_M": (True, 0.9),
                   "TTFT <= 0.8x llama.cpp Q4_K_M": (False, 0.833), "peak RSS <= 0.7x llama.cpp Q4_K_M": (True, 0.5)}
    assert b.base("llama-cpp:Q4_0") == "llama-cpp"
    assert "vs llama-cpp:Q4_0" in b.format_report(report)
