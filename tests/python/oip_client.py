"""Drives Kiln's OIP endpoints with the official tritonclient and checks results against a
direct TorchScript forward in Python. Usage: KILN_KEY=... oip_client.py HOST:PORT DIGITS_PT MINILM_PT"""

import os
import sys

import numpy as np
import torch
from precision import close_to_fp32
import tritonclient.http as httpclient
from tritonclient._plugin import InferenceServerClientPlugin


class Bearer(InferenceServerClientPlugin):
    """Sends the tenant's API key with every request."""

    def __init__(self, key: str) -> None:
        self._key = key

    def __call__(self, request) -> None:
        request.headers["Authorization"] = f"Bearer {self._key}"


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"oip: FAILED: {what}")
    print(f"oip: ok: {what}")


def main(url: str, digits_pt: str, minilm_pt: str) -> None:
    client = httpclient.InferenceServerClient(url=url)
    client.register_plugin(Bearer(os.environ["KILN_KEY"]))
    check(client.is_server_live(), "server is live")
    check(client.is_server_ready(), "server is ready")
    check(client.is_model_ready("digits"), "digits is ready")
    check(not client.is_model_ready("no-such-model"), "an unknown model is not ready")

    meta = client.get_model_metadata("digits")
    check(meta["name"] == "digits", "metadata names the model")
    check(meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
          f"digits input metadata {meta['inputs']}")
    check(meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
          f"digits output metadata {meta['outputs']}")
    check(client.get_server_metadata()["name"] == "kiln", "server metadata")

    rng = np.random.default_rng(3)
    images = rng.random((5, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        expected = torch.jit.load(digits_pt)(torch.from_numpy(images)).numpy()

    for binary_in in (True, False):
        for binary_out in (True, False):
            inp = httpclient.InferInput("image", list(images.shape), "FP32")
            inp.set_data_from_numpy(images, binary_data=binary_in)
            out = httpclient.InferRequestedOutput("logits", binary_data=binary_out)
            result = client.infer("digits", [inp], outputs=[out])
            got = result.as_numpy("logits")
            check(got is not None and got.shape == (5, 10),
                  f"digits infer shape (binary in={binary_in}, out={binary_out})")
            check(np.allclose(got, expected, rtol=1e-5, atol=1e-5),
                  f"digits infer matches TorchScript (binary in={binary_in}, out={binary_out})")

    # Version "1" by name, on every route that takes one; another version is not there.
    check(client.is_model_ready("digits", "1"), "digits version 1 is ready")
    check(not client.is_model_ready("digits", "2"), "digits has no version 2")
    check(client.get_model_metadata("digits", "1")["versions"] == ["1"], "version 1's metadata")
    inp = httpclient.InferInput("image", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    got = client.infer("digits", [inp], model_version="1").as_numpy("logits")
    check(got is not None and np.allclose(got, expected, rtol=1e-5, atol=1e-5), "digits infer by version 1")

    # Without requested outputs, every output comes back.
    inp = httpclient.InferInput("image", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    got = client.infer("digits", [inp]).as_numpy("logits")
    check(got is not None and np.allclose(got, expected, rtol=1e-5, atol=1e-5),
          "digits infer with default outputs")

    ids = np.array([[101, 7592, 2088, 102, 0], [101, 2204, 2851, 2000, 102]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        hidden = torch.jit.load(minilm_pt)(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    a = httpclient.InferInput("input_ids", list(ids.shape), "INT64")
    a.set_data_from_numpy(ids)
    b = httpclient.InferInput("attention_mask", list(mask.shape), "INT64")
    b.set_data_from_numpy(mask)
    got = client.infer("minilm", [a, b]).as_numpy("last_hidden_state")
    check(got is not None and got.shape == hidden.shape, "minilm infer shape")
    check(close_to_fp32(got, hidden), "minilm infer matches TorchScript")
    print("oip: all checks passed")


if __name__ == "__main__":
    main(*sys.argv[1:4])
