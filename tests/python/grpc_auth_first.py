"""Kiln checks a gRPC call's key from its metadata before it reads the message, and reads a tenant's
message only up to that tenant's own max_body_bytes. Messages go as raw bytes (grpcio's generic
calls), so one that is not protobuf at all shows whether the server decoded it: refused for its
key or its size it must be, never "failed to decode". Usage:
KILN_KEY=... KILN_TIGHT_KEY=... KILN_ADMIN_KEY=... grpc_auth_first.py HOST:PORT TIGHT_LIMIT SERVER_LIMIT
(`tight` is a tenant whose max_body_bytes is TIGHT_LIMIT, below the server's SERVER_LIMIT)."""

import os
import sys

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

SERVICE = "/inference.GRPCInferenceService/"

# Not protobuf: 0xff starts a field tag whose varint never ends.
GARBAGE = b"\xff" * 64


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"grpc auth first: FAILED: {what}")
    print(f"grpc auth first: ok: {what}")


def call(channel: grpc.Channel, method: str, message: bytes, key: str | None):
    """The raw answer to `message` (bytes, sent as they are), or the grpc.RpcError."""
    metadata = [("authorization", f"Bearer {key}")] if key is not None else []
    stub = channel.unary_unary(SERVICE + method)
    try:
        return stub(message, metadata=metadata, timeout=60)
    except grpc.RpcError as e:
        return e


def metadata_of(error: grpc.RpcError) -> dict:
    # A trailers-only answer carries its metadata as trailers.
    return dict(list(error.initial_metadata() or []) + list(error.trailing_metadata() or []))


def refused(answer, code: grpc.StatusCode, kind: str, *words: str, what: str) -> None:
    """`answer` is a refusal with `code`, `kiln-error-kind: kind`, and every one of `words`."""
    if not isinstance(answer, grpc.RpcError):
        raise SystemExit(f"grpc auth first: FAILED: {what}: answered instead of refused with {code}")
    details = answer.details() or ""
    seen_kind = metadata_of(answer).get("kiln-error-kind")
    check(answer.code() == code and seen_kind == kind and all(w in details for w in words),
          f"{what}: {code.name} ({kind}) naming {words}; got {answer.code().name} ({seen_kind}) {details!r}")


def digits_request(rows: int) -> bytes:
    """A real ModelInferRequest for digits: `rows` 8x8 images as raw contents."""
    images = np.random.default_rng(rows).random((rows, 1, 8, 8), dtype=np.float32)
    request = service_pb2.ModelInferRequest(
        model_name="digits",
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[rows, 1, 8, 8])],
        raw_input_contents=[images.tobytes()])
    return request.SerializeToString()


def logits_rows(answer: bytes) -> int:
    response = service_pb2.ModelInferResponse.FromString(answer)
    return int(response.outputs[0].shape[0])


def main(url: str, tight_limit: int, server_limit: int) -> None:
    key, tight, admin = os.environ["KILN_KEY"], os.environ["KILN_TIGHT_KEY"], os.environ["KILN_ADMIN_KEY"]
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    channel = grpc.insecure_channel(url, options=options)

    # The control: with a valid key the garbage reaches the decoder, which cannot read it.
    answer = call(channel, "ModelInfer", GARBAGE, key)
    details = answer.details() if isinstance(answer, grpc.RpcError) else f"answered {answer!r}"
    check("decode" in (details or ""), f"with a tenant's key the garbage reaches the decoder, which fails: {details}")

    # Without a valid key nothing is decoded: the same garbage is refused for the key.
    refused(call(channel, "ModelInfer", GARBAGE, wrong), grpc.StatusCode.UNAUTHENTICATED, "unauthorized",
            "invalid API key", what="a wrong key with an undecodable message")
    refused(call(channel, "ModelInfer", GARBAGE, None), grpc.StatusCode.UNAUTHENTICATED, "unauthorized",
            "no API key", what="no key with an undecodable message")
    big = b"\xff" * (2 * server_limit)
    refused(call(channel, "ModelInfer", big, wrong), grpc.StatusCode.UNAUTHENTICATED, "unauthorized",
            "invalid API key", what="a wrong key with a message twice the server's limit")
    refused(call(channel, "ModelMetadata", GARBAGE, wrong), grpc.StatusCode.UNAUTHENTICATED, "unauthorized",
            "invalid API key", what="a wrong key on ModelMetadata")
    refused(call(channel, "ModelInfer", GARBAGE, admin), grpc.StatusCode.PERMISSION_DENIED, "forbidden",
            "admin keys", what="the admin key on a model call")
    refused(call(channel, "RepositoryIndex", GARBAGE, key), grpc.StatusCode.PERMISSION_DENIED, "forbidden",
            "admin key", what="a tenant's key on a repository call")
    refused(call(channel, "RepositoryIndex", GARBAGE, wrong), grpc.StatusCode.UNAUTHENTICATED, "unauthorized",
            "invalid API key", what="a wrong key on a repository call")

    # A tenant's message is read only up to its own limit, whatever the server's.
    limit_words = (f"limit of {tight_limit} bytes",)
    over = tight_limit + 1024
    refused(call(channel, "ModelInfer", b"\xff" * over, tight), grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large",
            *limit_words, what=f"an undecodable message over the tenant's {tight_limit} bytes")
    rows = over // 256 + 1
    refused(call(channel, "ModelInfer", digits_request(rows), tight), grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too_large", *limit_words, what=f"a real request of {rows} images over the tenant's limit")
    huge = server_limit // 256 + 16
    refused(call(channel, "ModelInfer", digits_request(huge), tight), grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too_large", *limit_words, what=f"a real request of {huge} images, over the server's limit too")

    # Within the limits the calls are answered as before.
    fits = tight_limit // 256 - 1
    answer = call(channel, "ModelInfer", digits_request(fits), tight)
    check(isinstance(answer, bytes) and logits_rows(answer) == fits,
          f"{fits} images within the tenant's limit are answered")
    answer = call(channel, "ModelInfer", digits_request(rows), key)
    check(isinstance(answer, bytes) and logits_rows(answer) == rows,
          f"{rows} images from a tenant with the default limit are answered")
    live = call(channel, "ServerLive", b"", None)
    check(isinstance(live, bytes) and service_pb2.ServerLiveResponse.FromString(live).live,
          "ServerLive needs no key")
    refused(call(channel, "ServerLive", b"\xff" * 65536, None), grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large",
            "limit of", what="a keyless call's message is held to a small limit")
    print("grpc auth first: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
