"""Drives the embeddings handler's OpenAI-compatible route with the official `openai` client and
checks it against the handler's own route (the same model and pooling). Usage:
KILN_KEY=... openai_client.py BASE_URL   (BASE_URL: http://HOST:PORT/v1/handlers/embeddings)"""

import base64
import os
import sys

import numpy as np
import json
import urllib.request

import openai


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"openai: FAILED: {what}")
    print(f"openai: ok: {what}")


def post(url: str, body: dict, headers: dict) -> dict:
    """The handler's own routes, with the standard library."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def main(base: str) -> None:
    key = os.environ["KILN_KEY"]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    headers = {"Authorization": f"Bearer {key}"}
    sentences = ["A man is eating food.", "A woman plays the violin.", "The weather is lovely today."]
    own = post(f"{base}/", {"sentences": sentences}, headers)["embeddings"]
    reference = np.array(own, dtype=np.float32)

    # One string; the client asks for base64 by default and decodes it.
    one = client.embeddings.create(model="all-MiniLM-L6-v2", input=sentences[0])
    check(one.object == "list" and len(one.data) == 1 and one.data[0].index == 0, "one input, one embedding")
    check(len(one.data[0].embedding) == 384, "384 dimensions")
    check(np.allclose(one.data[0].embedding, reference[0], atol=1e-6), "matches the handler's own route")
    check(one.model == "all-MiniLM-L6-v2", "the model is echoed")
    check(one.usage.prompt_tokens > 2 and one.usage.total_tokens == one.usage.prompt_tokens, f"usage {one.usage}")

    # A batch, as floats.
    batch = client.embeddings.create(model="all-MiniLM-L6-v2", input=sentences, encoding_format="float")
    check([d.index for d in batch.data] == [0, 1, 2], "a batch answers in order")
    got = np.array([d.embedding for d in batch.data], dtype=np.float32)
    check(np.allclose(got, reference, atol=1e-6), "a batch matches the handler's own route")

    # base64 asked for explicitly: the client hands the string back as is.
    raw = client.embeddings.create(model="all-MiniLM-L6-v2", input=sentences[1], encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(raw.data[0].embedding), dtype="<f4")
    check(np.allclose(decoded, reference[1], atol=1e-6), "base64 is little-endian float32")

    # Token ids, as the tokenizer makes them, give the text's embedding.
    ids = post(f"{base}/tokenize", {"sentences": sentences[:2]}, headers)["input_ids"]
    by_ids = client.embeddings.create(model="all-MiniLM-L6-v2", input=ids, encoding_format="float")
    got = np.array([d.embedding for d in by_ids.data], dtype=np.float32)
    check(np.allclose(got, reference[:2], atol=1e-6), "token-id input matches text input")
    single = client.embeddings.create(model="all-MiniLM-L6-v2", input=ids[0], encoding_format="float")
    check(np.allclose(single.data[0].embedding, reference[0], atol=1e-6), "one list of token ids")
    check(single.usage.prompt_tokens == len(ids[0]), "usage counts the ids sent")

    # Refusals, in OpenAI's error shape, raised as the client's own exceptions.
    try:
        client.embeddings.create(model="all-MiniLM-L6-v2", input="word " * 600)
        check(False, "an over-long input is refused")
    except openai.BadRequestError as e:
        check("maximum context length is 256 tokens" in e.message and e.body.get("param") == "input",
              f"an over-long input is refused, not cut: {e.message}")
    try:
        client.embeddings.create(model="text-embedding-3-small", input="hi")
        check(False, "an unknown model is refused")
    except openai.NotFoundError as e:
        check(e.code == "model_not_found", f"an unknown model is model_not_found: {e.message}")
    try:
        client.embeddings.create(model="all-MiniLM-L6-v2", input="hi", dimensions=128)
        check(False, "other dimensions are refused")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "dimensions", f"other dimensions are refused: {e.message}")
    try:
        client.embeddings.create(model="all-MiniLM-L6-v2", input=[[99999999]], encoding_format="float")
        check(False, "an id outside the vocabulary is refused")
    except openai.BadRequestError as e:
        check("not a token id" in e.message, f"an id outside the vocabulary is refused: {e.message}")
    wrong_key = openai.OpenAI(base_url=f"{base}/v1", api_key="kiln_wrong", max_retries=0)
    try:
        wrong_key.embeddings.create(model="all-MiniLM-L6-v2", input="hi")
        check(False, "a wrong key is refused")
    except openai.AuthenticationError:
        check(True, "a wrong key is refused (401)")
    models = client.models.list()
    check([m.id for m in models.data] == ["all-MiniLM-L6-v2"], "the model list names the model")
    print("openai: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
