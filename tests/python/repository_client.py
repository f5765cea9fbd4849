"""Drives Kiln's model repository with the official tritonclient: load (with a config and
again from the repository), list, unload, and the errors. Usage:
KILN_ADMIN_KEY=... KILN_KEY=... repository_client.py ADMIN_HOST:PORT HOST:PORT MODELS_DIR"""

import json
import os
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from oip_client import Bearer, check


def offset_config(models: str, version: int) -> str:
    return json.dumps({
        "path": f"{models}/offset-{version}.pt",
        "inputs": [{"name": "x", "dtype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y"}],
        "tenants": ["demo"],
    })


def states(admin) -> dict:
    return {m["name"]: (m["state"], m["reason"]) for m in admin.get_model_repository_index()}


def refused(call, *words: str) -> str:
    try:
        call()
    except InferenceServerException as e:
        message = str(e)
        missing = [w for w in words if w not in message]
        check(not missing, f"refused naming {words}: {message}")
        return message
    raise SystemExit(f"repository: FAILED: expected an error naming {words}")


def main(admin_url: str, url: str, models: str) -> None:
    admin = httpclient.InferenceServerClient(url=admin_url)
    admin.register_plugin(Bearer(os.environ["KILN_ADMIN_KEY"]))
    client = httpclient.InferenceServerClient(url=url)
    client.register_plugin(Bearer(os.environ["KILN_KEY"]))

    x = np.arange(8, dtype=np.float32).reshape(2, 4)

    def infer() -> np.ndarray:
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("offset", [inp]).as_numpy("y")

    index = states(admin)
    check(index.get("digits") == ("READY", "") and index.get("minilm") == ("READY", ""),
          f"the index lists the config's models ready: {index}")
    check("offset" not in index, "offset is not in the repository yet")

    admin.load_model("offset", config=offset_config(models, 1))
    check(states(admin).get("offset") == ("READY", ""), "load_model with a config: offset is ready")
    check(client.is_model_ready("offset"), "the tenant sees offset ready")
    check(np.array_equal(infer(), x + 1), "offset answers with version 1's weights")

    admin.load_model("offset", config=offset_config(models, 2))
    check(np.array_equal(infer(), x + 2), "a load with a new config replaces it: version 2 answers")

    admin.unload_model("offset")
    check(states(admin).get("offset") == ("UNAVAILABLE", "unloaded"), "unload_model: offset unavailable, unloaded")
    check(not client.is_model_ready("offset"), "the tenant no longer sees offset ready")

    admin.load_model("offset")
    check(np.array_equal(infer(), x + 2), "load_model without a config loads it again from the repository")

    refused(lambda: admin.load_model("broken", config=json.dumps({"path": "x.pt", "outputs": [{"name": "y"}]})),
            "inputs")
    refused(lambda: admin.load_model("missing", config=offset_config(models, 9)), "did not load", "offset-9.pt")
    state, reason = states(admin).get("missing", ("", ""))
    check(state == "UNAVAILABLE" and "offset-9.pt" in reason, f"a failed load is listed with its reason: {reason}")
    refused(lambda: admin.load_model("digits", config=offset_config(models, 1)), "defined in the config file")
    refused(lambda: admin.load_model("nope"), "not found")
    refused(lambda: admin.load_model("bad name", config=offset_config(models, 1)), "not a valid name")

    admin.unload_model("digits")
    check(states(admin).get("digits") == ("UNAVAILABLE", "unloaded"), "a config model can be unloaded")
    check(client.is_server_ready(), "the server stays ready with a config model unloaded on purpose")
    admin.load_model("digits")
    check(states(admin).get("digits") == ("READY", ""), "and loaded again from the config")

    tenant_on_admin = httpclient.InferenceServerClient(url=admin_url)
    tenant_on_admin.register_plugin(Bearer(os.environ["KILN_KEY"]))
    refused(lambda: tenant_on_admin.load_model("offset"), "admin key")
    print("repository: all checks passed")


if __name__ == "__main__":
    main(*sys.argv[1:4])
