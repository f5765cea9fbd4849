"""Drives Kiln's gRPC Open Inference Protocol with the official `tritonclient[grpc]`: health,
metadata, inference on digits and MiniLM (raw and typed contents) checked against a direct
TorchScript forward, the errors, and the repository calls. Usage:
KILN_KEY=... KILN_ADMIN_KEY=... grpc_client.py HOST:PORT DIGITS_PT MINILM_PT MODELS_DIR"""

import json
import os
import sys

import grpc
import numpy as np
import torch
from precision import close_to_fp32
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"grpc: FAILED: {what}")
    print(f"grpc: ok: {what}")


def refused(call, code: str, *words: str) -> None:
    """`call` fails with gRPC status `code` and a message naming every one of `words`."""
    try:
        call()
    except InferenceServerException as e:
        message = e.message() or ""
        check(e.status() == f"StatusCode.{code}" and all(w in message for w in words),
              f"refused with {code} naming {words}: {e.status()} {message}")
        return
    raise SystemExit(f"grpc: FAILED: expected {code} naming {words}")


def main(url: str, digits_pt: str, minilm_pt: str, models: str) -> None:
    key, admin_key = os.environ["KILN_KEY"], os.environ["KILN_ADMIN_KEY"]
    tenant = {"authorization": f"Bearer {key}"}
    admin = {"authorization": f"Bearer {admin_key}"}
    client = grpcclient.InferenceServerClient(url=url)

    check(client.is_server_live(), "server is live")
    check(client.is_server_ready(), "server is ready")
    check(client.get_server_metadata(as_json=True)["name"] == "kiln", "server metadata")
    check(client.is_model_ready("digits", headers=tenant), "digits is ready")
    check(client.is_model_ready("digits", "1", headers=tenant), "digits version 1 is ready")
    refused(lambda: client.is_model_ready("no-such-model", headers=tenant), "NOT_FOUND", "no-such-model", "not found")

    meta = client.get_model_metadata("digits", headers=tenant, as_json=True)
    check(meta["name"] == "digits" and meta["versions"] == ["1"] and meta["platform"] == "pytorch_libtorch",
          f"digits metadata {meta}")
    check(meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}],
          f"digits input metadata {meta['inputs']}")
    check(meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}],
          f"digits output metadata {meta['outputs']}")

    rng = np.random.default_rng(5)
    images = rng.random((5, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        expected = torch.jit.load(digits_pt)(torch.from_numpy(images)).numpy()

    def digits_input() -> grpcclient.InferInput:
        inp = grpcclient.InferInput("image", list(images.shape), "FP32")
        inp.set_data_from_numpy(images)
        return inp

    # The client sends raw_input_contents; the answer comes as raw_output_contents.
    result = client.infer("digits", [digits_input()], outputs=[grpcclient.InferRequestedOutput("logits")],
                          request_id="r-7", headers=tenant)
    got = result.as_numpy("logits")
    check(got is not None and got.shape == (5, 10) and np.allclose(got, expected, rtol=1e-5, atol=1e-5),
          "digits over gRPC (raw contents) matches TorchScript")
    check(result.get_response().id == "r-7", "the request id comes back")
    got = client.infer("digits", [digits_input()], model_version="1", headers=tenant).as_numpy("logits")
    check(got is not None and np.allclose(got, expected, rtol=1e-5, atol=1e-5), "digits by version 1, all outputs")

    # Typed contents, with the protocol's own stub from the same package.
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(url))
    metadata = [("authorization", f"Bearer {key}")]
    request = service_pb2.ModelInferRequest(model_name="digits", inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(
            name="image", datatype="FP32", shape=list(images.shape),
            contents=service_pb2.InferTensorContents(fp32_contents=images.ravel().tolist()))])
    response, call = stub.ModelInfer.with_call(request, metadata=metadata)
    got = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(list(response.outputs[0].shape))
    check(np.allclose(got, expected, rtol=1e-5, atol=1e-5), "digits over gRPC (typed contents) matches TorchScript")
    check(any(k == "kiln-request-id" and v for k, v in call.initial_metadata()), "the answer carries a kiln-request-id")

    ids = np.array([[101, 7592, 2088, 102, 0], [101, 2204, 2851, 2000, 102]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        hidden = torch.jit.load(minilm_pt)(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    a = grpcclient.InferInput("input_ids", list(ids.shape), "INT64")
    a.set_data_from_numpy(ids)
    b = grpcclient.InferInput("attention_mask", list(mask.shape), "INT64")
    b.set_data_from_numpy(mask)
    got = client.infer("minilm", [a, b], headers=tenant).as_numpy("last_hidden_state")
    check(got is not None and got.shape == hidden.shape and close_to_fp32(got, hidden),
          "minilm over gRPC (raw contents) matches TorchScript")
    request = service_pb2.ModelInferRequest(model_name="minilm", inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(
            name=name, datatype="INT64", shape=list(t.shape),
            contents=service_pb2.InferTensorContents(int64_contents=t.ravel().tolist()))
        for name, t in (("input_ids", ids), ("attention_mask", mask))])
    response = stub.ModelInfer(request, metadata=metadata)
    got = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(list(response.outputs[0].shape))
    check(close_to_fp32(got, hidden), "minilm over gRPC (typed contents) matches TorchScript")

    # The errors: the HTTP API's messages, under the nearest gRPC codes.
    near_miss = key[:-1] + ("A" if key[-1] != "A" else "B")
    refused(lambda: client.infer("digits", [digits_input()], headers={"authorization": f"Bearer {near_miss}"}),
            "UNAUTHENTICATED", "invalid API key")
    refused(lambda: client.infer("digits", [digits_input()]), "UNAUTHENTICATED", "API key")
    refused(lambda: client.infer("no-such-model", [digits_input()], headers=tenant), "NOT_FOUND", "no-such-model")
    refused(lambda: client.infer("digits", [digits_input()], model_version="2", headers=tenant),
            "NOT_FOUND", "has no version '2'")
    flat = grpcclient.InferInput("image", [5, 64], "FP32")
    flat.set_data_from_numpy(images.reshape(5, 64))
    refused(lambda: client.infer("digits", [flat], headers=tenant), "INVALID_ARGUMENT", "image", "shape")
    wrong = grpcclient.InferInput("pixels", list(images.shape), "FP32")
    wrong.set_data_from_numpy(images)
    refused(lambda: client.infer("digits", [wrong], headers=tenant), "INVALID_ARGUMENT", "pixels")
    refused(lambda: client.infer("digits", [digits_input()], outputs=[grpcclient.InferRequestedOutput("nope")],
                                 headers=tenant), "INVALID_ARGUMENT", "nope")
    refused(lambda: client.infer("digits", [digits_input()], headers=admin), "PERMISSION_DENIED", "admin keys")

    # The repository calls take an admin key: load a model with a config, use it, unload it.
    refused(lambda: client.get_model_repository_index(headers=tenant), "PERMISSION_DENIED", "admin key")
    index = {m["name"]: m for m in client.get_model_repository_index(headers=admin, as_json=True)["models"]}
    check(index.get("digits", {}).get("state") == "READY", f"the index lists digits ready: {index.get('digits')}")
    config = json.dumps({"path": f"{models}/offset-1.pt", "inputs": [{"name": "x", "dtype": "FP32", "shape": [-1, 4]}],
                         "outputs": [{"name": "y"}], "tenants": ["demo"]})
    client.load_model("grpc-offset", config=config, headers=admin)
    check(client.is_model_ready("grpc-offset", headers=tenant), "a model loaded over gRPC is ready for its tenant")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    inp = grpcclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    got = client.infer("grpc-offset", [inp], headers=tenant).as_numpy("y")
    check(got is not None and np.array_equal(got, x + 1), "the loaded model answers")
    client.unload_model("grpc-offset", headers=admin)
    index = {m["name"]: m for m in client.get_model_repository_index(headers=admin, as_json=True)["models"]}
    check(index.get("grpc-offset", {}).get("state") == "UNAVAILABLE", f"unloaded: {index.get('grpc-offset')}")
    refused(lambda: client.load_model("nope", headers=admin), "NOT_FOUND", "nope")
    print("grpc: all checks passed")


if __name__ == "__main__":
    main(*sys.argv[1:5])
