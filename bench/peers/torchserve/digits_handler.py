"""TorchServe handler doing the work of Kiln's digits guest (examples/digits), for bench_peers.py.

Body: a PNG or JPEG of one digit. Decode, grey, average down to 8x8 (PIL's BOX filter is the
guest's area average), scale to [0, 1], flip dark-on-light images to the training polarity; one
forward per TorchServe batch; softmax. Answer: {"digit": d, "probabilities": [10 floats]}, or 400
for a body that is not an image (the rest of the batch is still answered).
"""
import io
import os

import numpy as np
import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

SIDE = 8
Image.MAX_IMAGE_PIXELS = 4096 * 4096


def body_of(row):
    body = row.get("data") or row.get("body") if isinstance(row, dict) else row
    return body.encode("latin-1") if isinstance(body, str) else bytes(body)


def to_grid(data):
    image = Image.open(io.BytesIO(data)).convert("L").resize((SIDE, SIDE), Image.BOX)
    grid = np.asarray(image, dtype=np.float32) / 255.0
    border = np.concatenate([grid[0], grid[-1], grid[1:-1, 0], grid[1:-1, -1]])
    return 1.0 - grid if border.mean() > 0.5 else grid


class DigitsHandler(BaseHandler):
    def initialize(self, context):
        if os.environ.get("PEER_TORCH_THREADS"):
            torch.set_num_threads(int(os.environ["PEER_TORCH_THREADS"]))
        super().initialize(context)
        # PEER_PRECISION=bf16: the model's floating weights in bf16, inputs cast to match (the
        # same precision Kiln's `precision = "bf16"` serves in).
        self.dtype = torch.bfloat16 if os.environ.get("PEER_PRECISION") == "bf16" else torch.float32
        self.model = self.model.to(self.dtype)

    def preprocess(self, data):
        grids, self.bad = [], {}
        for i, row in enumerate(data):
            try:
                grids.append(to_grid(body_of(row)))
            except Exception as e:  # this request gets a 400; its neighbours still get answers
                self.bad[i] = f"the body is not a PNG or JPEG image: {e}"
                grids.append(np.zeros((SIDE, SIDE), dtype=np.float32))
        return torch.from_numpy(np.stack(grids)).unsqueeze(1)

    def inference(self, batch, *args, **kwargs):
        with torch.inference_mode():
            return self.model(batch.to(self.dtype)).float()

    def postprocess(self, logits):
        answers = []
        for i, p in enumerate(torch.softmax(logits.float(), dim=1).tolist()):
            if i in self.bad:
                self.context.set_response_status(400, self.bad[i], idx=i)
                answers.append({"error": self.bad[i]})
            else:
                answers.append({"digit": int(np.argmax(p)), "probabilities": p})
        return answers
