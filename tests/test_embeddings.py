"""Sentence encoders converted without torch, and their embeddings.

Tiny random BERT, MPNet and nomic-bert checkpoints (Hugging Face, in both of nomic-bert's
spellings, and llama.cpp GGUFs of them) are converted by ovchat and compared with an independent
float64 numpy forward pass (tests/encoder_reference.py); the real all-mpnet-base-v2, pulled from
its packages on the package index, is compared with the same reference on its own safetensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from encoder_reference import EncoderReference

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_encoder import write_encoder, write_encoder_gguf  # noqa: E402

from ovchat.convert import convert  # noqa: E402
from ovchat.embeddings import Embedder  # noqa: E402
from ovchat.errors import InputError  # noqa: E402

TEXTS = ["the sun is up", "a dog and a cat", "where is the water", "two old men walked home after the long day",
         "it was a good day", "x"]
CASES = {
    "bert": dict(arch="bert", pooling="cls"),
    "mpnet": dict(arch="mpnet", pooling="mean"),
    "nomic_bert": dict(arch="nomic_bert", pooling="mean"),
    "nomic_bert-original": dict(arch="nomic_bert-original", pooling="mean"),
}


def tokenized(directory: Path, texts):
    """Ids and mask from the `tokenizers` library itself (not ovchat's tokenizer IR), padded right."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    rows = [tok.encode(t).ids for t in texts]
    width = max(map(len, rows))
    pad = json.loads((directory / "config.json").read_text()).get("pad_token_id", 0)
    ids = np.full((len(rows), width), pad, np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    made = {}

    def get(case: str):
        if case not in made:
            spec = dict(CASES[case])
            source = write_encoder(root / case, spec.pop("arch"), seed=2, dtype="f16", **spec)
            made[case] = (source, convert(source, root / f"{case}-ov", receipt=False))
        return made[case]
    return get


@pytest.mark.parametrize("case", list(CASES))
def test_every_tokens_state_matches_the_reference(case, encoders):
    source, out = encoders(case)
    manifest = json.loads((out / "ovchat.json").read_text())
    assert manifest["kind"] == "embedding" and manifest["recipe"]["weight_format"] == "fp16"
    assert manifest["embedding"]["mode"] == CASES[case]["pooling"] and manifest["embedding"]["normalize"]
    ids, mask = tokenized(source, TEXTS)
    compiled = ov.Core().compile_model(str(out / "openvino_model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    feed = {"input_ids": ids, "attention_mask": mask}
    if any("token_type_ids" in i.get_names() for i in compiled.inputs):
        feed["token_type_ids"] = np.zeros_like(ids)
    got = np.asarray(compiled.create_infer_request().infer(feed)[0])
    want = EncoderReference(source).hidden(ids, mask)
    real = mask.astype(bool)  # padding positions are not compared: nothing reads them
    assert np.abs(got[real] - want[real]).max() / np.abs(want[real]).max() <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_embeddings_and_token_ids_match_the_reference(case, encoders):
    source, out = encoders(case)
    embedder = Embedder(out, device="CPU")
    ids, mask = tokenized(source, TEXTS)
    for text, row, m in zip(TEXTS, ids, mask):  # ovchat's tokenizer IR gives the tokenizers library's ids
        assert embedder.tokenizer.encode(text).input_ids.data[0].tolist() == row[:m.sum()].tolist()
    got = embedder.encode(TEXTS)
    want = EncoderReference(source).embed(ids, mask, CASES[case]["pooling"])
    assert got.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert (got * want).sum(1).min() >= 0.99999


@pytest.mark.parametrize("case", ["bert", "nomic_bert-original"])
def test_llama_cpp_ggufs_of_the_same_weights(case, encoders, tmp_path):
    source, _ = encoders(case)
    pooling = {"mean": 1, "cls": 2}[CASES[case]["pooling"]]
    gguf_path = write_encoder_gguf(tmp_path / "m.gguf", source, pooling=pooling)
    out = convert(gguf_path, tmp_path / "ov", receipt=False)
    manifest = json.loads((out / "ovchat.json").read_text())
    assert manifest["embedding"]["mode"] == CASES[case]["pooling"]
    ids, mask = tokenized(source, TEXTS)
    got = Embedder(out, device="CPU").encode(TEXTS)
    want = EncoderReference(source).embed(ids, mask, CASES[case]["pooling"])
    assert (got * want).sum(1).min() >= 0.99999


def test_genai_text_embedding_pipeline_loads_the_ir_and_agrees(encoders):
    import openvino_genai

    _, out = encoders("mpnet")
    config = openvino_genai.TextEmbeddingPipeline.Config()
    config.pooling_type = openvino_genai.TextEmbeddingPipeline.PoolingType.MEAN
    config.normalize = True
    pipeline = openvino_genai.TextEmbeddingPipeline(str(out), "CPU", config, INFERENCE_PRECISION_HINT="f32")
    theirs = np.asarray(pipeline.embed_documents(TEXTS))
    ours = Embedder(out, device="CPU").encode(TEXTS)
    assert (theirs * ours).sum(1).min() >= 0.99999


def test_truncation_is_reported_and_limits_hold(encoders, tmp_path):
    source = write_encoder(tmp_path / "short", "bert", seed=3, max_seq_length=8)
    out = convert(source, tmp_path / "short-ov", receipt=False)
    embedder = Embedder(out, device="CPU")
    result = embedder.embed(["the sun is up", "two old men walked home after the long day and then some more"])
    assert result.truncated == [False, True] and result.tokens[1] == 8
    by_ids = embedder.embed([embedder.tokenizer.encode("the sun is up").input_ids.data[0].tolist()])
    assert np.allclose(by_ids.vectors[0], result.vectors[0], atol=1e-6)
    short = embedder.embed(["the sun is up"], dimensions=16).vectors
    assert short.shape == (1, 16) and abs(np.linalg.norm(short) - 1) < 1e-5
    with pytest.raises(InputError, match="dimensions"):
        embedder.embed(["x"], dimensions=65)
    with pytest.raises(InputError, match="at most"):
        embedder.embed(["x"] * 10_000)
    with pytest.raises(InputError, match="token ids"):
        embedder.embed([[10 ** 9]])


def test_a_chat_model_is_not_an_embedder(demo_model):
    with pytest.raises(InputError, match="is a chat model, not an embedding model"):
        Embedder(demo_model, device="CPU")


# -- the real all-mpnet-base-v2 --------------------------------------------------------------------

SENTENCES = [
    "The cat sits on the mat.", "A dog is playing in the garden.", "The weather is lovely today.",
    "How do I reset my router?", "The train to Berlin leaves at eight.", "I would like a cup of tea, please.",
    "Le chat dort sur le canapé.", "Il pleut beaucoup à Paris en novembre.", "Où est la gare, s'il vous plaît ?",
    "Der Zug nach München hat Verspätung.", "Ich lese gern Bücher über Geschichte.",
    "El mercado abre a las siete de la mañana.", "Mi hermana vive en Barcelona.",
    "La pizza napoletana è la mia preferita.", "Сегодня очень холодно на улице.", "Я люблю читать книги.",
    "今天天气很好。", "我们明天去公园散步。", "東京は日本の首都です。", "서울은 한국의 수도입니다.",
    "Turn off the kitchen lights at midnight.", "The thermostat is set to twenty degrees.",
    "Photosynthesis turns light into chemical energy.", "The stock market fell sharply on Monday.",
    "def add(a, b): return a + b", "SELECT name FROM users WHERE age > 30;",
    "Water boils at one hundred degrees Celsius at sea level.", "She won the chess tournament last year.",
    "The museum is closed on Mondays.", "Please charge the car overnight.",
]
DOCUMENTS = ["The washing machine finished its cycle.", "The front door is locked.",
             "The living room lamp is switched on.", "The garden sprinkler runs every morning at six.",
             "The fridge temperature is four degrees.", "The router was restarted an hour ago."]
QUERIES = {"Is the house secure?": 1, "When is the lawn watered?": 3, "Is the internet working?": 5,
           "Is the light on in the lounge?": 2}


@pytest.fixture(scope="module")
def mpnet(ovchat_home):
    from ovchat.store import pull

    return pull("all-mpnet-base-v2", receipt=False).path


@pytest.fixture(scope="module")
def mpnet_source(mpnet, ovchat_home):
    return ovchat_home / "downloads" / "all-mpnet-base-v2"


@pytest.mark.slow
def test_all_mpnet_base_v2_against_the_numpy_reference(mpnet, mpnet_source):
    manifest = json.loads((mpnet / "ovchat.json").read_text())
    assert manifest["embedding"] == {"mode": "mean", "normalize": True, "max_length": 384, "dimensions": 768}
    embedder = Embedder(mpnet, device="CPU")
    ids, mask = tokenized(mpnet_source, SENTENCES)
    for text, row, m in zip(SENTENCES, ids, mask):  # the same ids as the tokenizers library
        assert embedder.tokenizer.encode(text).input_ids.data[0].tolist() == row[:m.sum()].tolist(), text
    got = embedder.encode(SENTENCES)
    want = EncoderReference(mpnet_source).embed(ids, mask, "mean")
    cosines = (got * want).sum(1)
    assert cosines.min() >= 0.999, dict(zip(SENTENCES, cosines.round(5)))
    # Retrieval: every query finds its document first, and the rankings agree with the reference.
    docs = embedder.encode(DOCUMENTS)
    doc_ids, doc_mask = tokenized(mpnet_source, DOCUMENTS)
    reference = EncoderReference(mpnet_source)
    want_docs = reference.embed(doc_ids, doc_mask, "mean")
    for query, best in QUERIES.items():
        q = embedder.encode([query])[0]
        q_ids, q_mask = tokenized(mpnet_source, [query])
        want_q = reference.embed(q_ids, q_mask, "mean")[0]
        assert np.argsort(-(docs @ q)).tolist() == np.argsort(-(want_docs @ want_q)).tolist(), query
        assert int(np.argmax(docs @ q)) == best, query


@pytest.fixture(scope="module")
def embed_server(mpnet, demo_model):
    from server_helpers import start_server

    s = start_server(None, "--keep-alive", "30s")
    yield s
    s.proc.kill()


@pytest.mark.slow
def test_embeddings_through_both_apis_and_the_wrong_kind_refused(embed_server, mpnet, demo_model):
    import base64

    import ollama

    local = Embedder(mpnet, device="CPU").encode(SENTENCES[:3])
    client = embed_server.client()
    floats = client.embeddings.create(model=mpnet.name, input=SENTENCES[:3], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.usage.prompt_tokens > 10
    assert np.allclose([d.embedding for d in floats.data], local, atol=1e-5)
    packed = embed_server.post("/v1/embeddings", {"model": mpnet.name, "input": SENTENCES[0], "encoding_format": "base64",
                                                  "dimensions": 64}, key=None).json()
    vector = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), "<f4")
    assert vector.shape == (64,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    ids = Embedder(mpnet, device="CPU").tokenizer.encode(SENTENCES[1]).input_ids.data[0].tolist()
    by_ids = client.embeddings.create(model=mpnet.name, input=[ids], encoding_format="float")
    assert np.allclose(by_ids.data[0].embedding, local[1], atol=1e-5)
    long = client.embeddings.create(model=mpnet.name, input=["word " * 1000], encoding_format="float")
    assert long.data[0].model_extra["truncated"] is True and long.usage.prompt_tokens == 384

    ol = ollama.Client(host=embed_server.url)
    both = ol.embed(model=mpnet.name, input=SENTENCES[:2])
    assert np.allclose(both.embeddings, local[:2], atol=1e-5) and both.prompt_eval_count > 5
    assert np.allclose(ol.embeddings(model=mpnet.name, prompt=SENTENCES[0]).embedding, local[0], atol=1e-5)
    with pytest.raises(ollama.ResponseError, match="longer than the model's window"):
        ol.embed(model=mpnet.name, input="word " * 1000, truncate=False)

    refused = embed_server.post("/v1/embeddings", {"model": demo_model.name, "input": "hi"}, key=None)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "not_embedding_model"
    refused = embed_server.post("/v1/chat/completions", {"model": mpnet.name, "messages": [
        {"role": "user", "content": "hi"}]}, key=None)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "not_chat_model"
    too_many = embed_server.post("/v1/embeddings", {"model": mpnet.name, "input": ["x"] * 10_000}, key=None)
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_inputs"
    empty = embed_server.post("/v1/embeddings", {"model": mpnet.name, "input": ["ok", ""]}, key=None)
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "input[1]"
    # The embedding model is one of the pool's: listed, loaded, and unloadable like the others.
    assert mpnet.name in [m.model.removesuffix(":latest") for m in ol.ps().models]
    assert "embedding" in ol.show(mpnet.name).capabilities
    unloaded = embed_server.post("/api/generate", {"model": mpnet.name, "keep_alive": 0}, key=None)
    assert unloaded.status_code == 200 and mpnet.name not in [m.model.removesuffix(":latest") for m in ol.ps().models]


@pytest.mark.slow
def test_embed_command_prints_vectors_and_ranks(mpnet):
    from conftest import run_ovchat

    done = run_ovchat("embed", "-m", mpnet.name, SENTENCES[0], SENTENCES[6])
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert len(rows) == 2 and len(rows[0]) == 768
    piped = run_ovchat("embed", "-m", mpnet.name, "--json", input="\n".join(SENTENCES[:3]).encode())
    data = json.loads(piped.stdout)["data"]
    assert [d["index"] for d in data] == [0, 1, 2] and np.allclose(data[0]["embedding"], rows[0], atol=1e-6)
    ranked = run_ovchat("embed", "-m", mpnet.name, "--query", "Is the internet working?", "--top", "2", *DOCUMENTS)
    lines = ranked.stdout.decode().splitlines()
    assert len(lines) == 2 and lines[0].endswith("The router was restarted an hour ago.")
    assert float(lines[0].split("\t")[0]) > float(lines[1].split("\t")[0])
    bad = run_ovchat("embed", "-m", mpnet.name, input=b"caf\xe9\n")
    assert bad.returncode == 1 and b"not valid UTF-8" in bad.stderr and b"Traceback" not in bad.stderr
    chat = run_ovchat("embed", "-m", "smollm2-135m", "hello")
    assert chat.returncode == 1 and b"is a chat model, not an embedding model" in chat.stderr
