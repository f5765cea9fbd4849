"""An independent OCI distribution client (the standard library only), so that Kiln's push and
pull are checked against the wire format, not only against each other.

  oci_client.py push REGISTRY REPO TAG FILE [SIGNATURE]  pushes FILE as a WebAssembly artifact,
                                                         prints its manifest digest
  oci_client.py check REGISTRY REPO DIGEST FILE          checks the artifact at DIGEST is FILE in
                                                         the CNCF wasm layout (as wkg reads it)

Credentials from $OCI_USER / $OCI_PASSWORD (basic auth), the CA from $OCI_CA."""

import base64
import hashlib
import json
import os
import ssl
import sys
import urllib.error
import urllib.request

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.wasm.config.v0+json"
LAYER = "application/wasm"


def request(method, url, body=None, headers=None):
    headers = dict(headers or {})
    token = base64.b64encode(f"{os.environ['OCI_USER']}:{os.environ['OCI_PASSWORD']}".encode()).decode()
    headers["Authorization"] = f"Basic {token}"
    context = ssl.create_default_context(cafile=os.environ["OCI_CA"])
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    with urllib.request.urlopen(req, context=context) as response:
        return response.status, dict(response.headers), response.read()


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob(base, repo, data):
    d = digest(data)
    status, headers, _ = request("POST", f"{base}/v2/{repo}/blobs/uploads/")
    assert status == 202, status
    location = headers["Location"]
    if location.startswith("/"):
        location = base + location
    sep = "&" if "?" in location else "?"
    status, _, _ = request("PUT", f"{location}{sep}digest={d}", data, {"Content-Type": "application/octet-stream"})
    assert status == 201, status
    return d


def push(registry, repo, tag, path, signature=None):
    base = f"https://{registry}"
    component = open(path, "rb").read()
    layer = push_blob(base, repo, component)
    config = json.dumps({"created": "2026-12-06T00:00:00Z", "author": "oci_client.py", "architecture": "wasm",
                         "os": "wasip2", "layerDigests": [layer],
                         "component": {"exports": [], "imports": [], "target": None}}).encode()
    config_digest = push_blob(base, repo, config)
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST,
                "config": {"mediaType": CONFIG, "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": LAYER, "digest": layer, "size": len(component)}]}
    if signature:
        manifest["annotations"] = {"dev.kiln.signature": open(signature).read().strip()}
    body = json.dumps(manifest, separators=(",", ":")).encode()
    status, _, _ = request("PUT", f"{base}/v2/{repo}/manifests/{tag}", body, {"Content-Type": MANIFEST})
    assert status == 201, status
    print(digest(body))


def check(registry, repo, manifest_digest, path):
    base = f"https://{registry}"
    component = open(path, "rb").read()
    _, headers, body = request("GET", f"{base}/v2/{repo}/manifests/{manifest_digest}", headers={"Accept": MANIFEST})
    assert digest(body) == manifest_digest, "the manifest's bytes are not its digest"
    manifest = json.loads(body)
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == MANIFEST, manifest
    assert manifest["config"]["mediaType"] == CONFIG, manifest["config"]
    layers = manifest["layers"]
    assert [l["mediaType"] for l in layers] == [LAYER], layers
    assert layers[0]["digest"] == digest(component) and layers[0]["size"] == len(component), layers
    _, _, config_bytes = request("GET", f"{base}/v2/{repo}/blobs/{manifest['config']['digest']}")
    assert digest(config_bytes) == manifest["config"]["digest"]
    config = json.loads(config_bytes)
    assert config["architecture"] == "wasm" and config["os"] == "wasip2", config
    assert config["layerDigests"] == [layers[0]["digest"]], config
    exports, imports = config["component"]["exports"], config["component"]["imports"]
    assert any(e.startswith("wasi:http/incoming-handler@") for e in exports), exports
    assert any(i.startswith("wasi:nn/") for i in imports), imports
    _, _, blob = request("GET", f"{base}/v2/{repo}/blobs/{layers[0]['digest']}")
    assert blob == component, "the layer is not the component"
    print("oci_client: all checks passed")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    try:
        {"push": push, "check": check}[command](*args)
    except urllib.error.HTTPError as e:
        sys.exit(f"{e.code} {e.reason}: {e.read()[:300]!r}")
