"""Two tenants over gRPC at once, sharing MiniLM and digits: the attacker sends inputs that make a
merged forward pass fail (ids outside the vocabulary, a sequence longer than the model's
positions) and big batches that keep the replica busy, from several channels, while the victim
sends its own calls. Every victim call must answer what it answers alone. Uses the official
`tritonclient[grpc]`. Usage:
VICTIM_KEY=... ATTACKER_KEY=... grpc_neighbours.py HOST:PORT"""

import collections
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def minilm_inputs(rows):
    ids = np.array(rows, dtype=np.int64)
    tensors = []
    for name, data in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
        tensor = grpcclient.InferInput(name, list(data.shape), "INT64")
        tensor.set_data_from_numpy(data)
        tensors.append(tensor)
    return tensors


def digits_inputs(seed):
    pixels = np.random.default_rng(seed).random((1, 1, 8, 8), dtype=np.float32)
    tensor = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(pixels)
    return [tensor]


def main(url: str) -> None:
    victim = {"authorization": f"Bearer {os.environ['VICTIM_KEY']}"}
    attacker = {"authorization": f"Bearer {os.environ['ATTACKER_KEY']}"}

    # The victim's calls, and what each answers when nothing else runs.
    sentences = [[101] + [1000 + (i * 37 + j * 11) % 20000 for j in range(4 + 3 * i)] + [102] for i in range(8)]
    calls = [("minilm", minilm_inputs([s]), "last_hidden_state") for s in sentences]
    calls += [("digits", digits_inputs(seed), "logits") for seed in range(8)]
    quiet = grpcclient.InferenceServerClient(url)
    alone = [quiet.infer(model, inputs, headers=victim).as_numpy(output) for model, inputs, output in calls]

    stop = threading.Event()
    attacks = collections.Counter()
    lock = threading.Lock()

    def attack(rows):
        client = grpcclient.InferenceServerClient(url)
        while not stop.is_set():
            try:
                client.infer("minilm", minilm_inputs(rows), headers=attacker)
                outcome = "ok"
            except InferenceServerException as e:
                outcome = str(e.status())
            with lock:
                attacks[(len(rows), len(rows[0]), outcome)] += 1

    # Four rows of 128: a pass long enough to queue the others behind it, with an answer within
    # the attacker's max_response_bytes.
    busy = [[1000 + (r * 7 + i) % 20000 for i in range(128)] for r in range(4)]
    attackers = [threading.Thread(target=attack, args=(rows,)) for rows in
                 ([[101, 40000, 102]], [[1000] * 600], busy, [[101, 40000, 102]], [[1000] * 600])]
    for thread in attackers:
        thread.start()

    clients = threading.local()

    def victim_call(index):
        if not hasattr(clients, "client"):
            clients.client = grpcclient.InferenceServerClient(url)
        model, inputs, output = calls[index]
        got = clients.client.infer(model, inputs, headers=victim).as_numpy(output)
        return index, float(np.max(np.abs(got - alone[index])))

    failures = []
    answered = 0
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in range(6):
                for future in [pool.submit(victim_call, i) for i in range(len(calls))]:
                    try:
                        index, off = future.result()
                    except InferenceServerException as e:
                        failures.append(f"{e.status()}: {e.message()}")
                        continue
                    answered += 1
                    if off > 1e-4:
                        failures.append(f"call {index} ({calls[index][0]}) is off by {off:.2e}")
    finally:
        stop.set()
        for thread in attackers:
            thread.join()

    print(f"grpc neighbours: attacker outcomes {dict(attacks)}")
    busy_ok = attacks.get((len(busy), len(busy[0]), "ok"), 0)
    if busy_ok == 0:
        raise SystemExit("grpc neighbours: FAILED: the attacker's busy batches were never answered")
    failed_passes = sum(n for (rows, width, outcome), n in attacks.items() if width in (3, 600) and outcome != "ok")
    if failed_passes == 0:
        raise SystemExit("grpc neighbours: FAILED: the attacker's bad inputs never reached the model")
    wrongly_ok = sum(n for (rows, width, outcome), n in attacks.items() if width in (3, 600) and outcome == "ok")
    if wrongly_ok:
        raise SystemExit(f"grpc neighbours: FAILED: {wrongly_ok} bad attacker calls were answered")
    if failures:
        raise SystemExit(f"grpc neighbours: FAILED: {len(failures)} victim calls: {failures[:5]}")
    print(f"grpc neighbours: all checks passed ({answered} victim calls answered as alone)")


if __name__ == "__main__":
    main(sys.argv[1])
