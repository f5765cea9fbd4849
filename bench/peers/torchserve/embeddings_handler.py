"""TorchServe handler doing the work of Kiln's embeddings guest (examples/embeddings).

Body: {"sentences": ["...", ...]}. Every sentence of every request in a TorchServe batch is
tokenized with the same WordPiece vocabulary as the guest (lower case, at most 256 tokens),
padded to the longest, run through the same traced MiniLM in one forward, mean-pooled over the
attention mask and L2-normalised. Answer: {"embeddings": [[384 floats], ...]}, or 400 for a body
without a non-empty list of sentences.
"""
import json
import os

import torch
import torch.nn.functional as F
from tokenizers import BertWordPieceTokenizer
from ts.torch_handler.base_handler import BaseHandler

MAX_TOKENS = 256


def sentences_of(row):
    body = row.get("data") or row.get("body") if isinstance(row, dict) else row
    if isinstance(body, (bytes, bytearray)):
        body = json.loads(body)
    elif isinstance(body, str):
        body = json.loads(body)
    sentences = body.get("sentences") if isinstance(body, dict) else None
    if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) for s in sentences):
        raise ValueError('send {"sentences": [...]} with at least one string')
    return sentences


class EmbeddingsHandler(BaseHandler):
    def initialize(self, context):
        if os.environ.get("PEER_TORCH_THREADS"):
            torch.set_num_threads(int(os.environ["PEER_TORCH_THREADS"]))
        super().initialize(context)
        # PEER_PRECISION=bf16: the model's floating weights in bf16 (integer buffers stay), its
        # hidden states pooled in FP32 (the same precision Kiln's `precision = "bf16"` serves in).
        if os.environ.get("PEER_PRECISION") == "bf16":
            self.model = self.model.to(torch.bfloat16)
        vocab = os.path.join(context.system_properties["model_dir"], "minilm-vocab.txt")
        self.tokenizer = BertWordPieceTokenizer(vocab, lowercase=True)
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0)

    def preprocess(self, data):
        flat, self.spans, self.bad = [], [], {}
        for i, row in enumerate(data):
            try:
                sentences = sentences_of(row)
            except Exception as e:
                self.bad[i] = f"bad request: {e}"
                sentences = []
            self.spans.append((len(flat), len(flat) + len(sentences)))
            flat.extend(sentences)
        if not flat:
            return None
        encoded = self.tokenizer.encode_batch(flat)
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.int64)
        return ids, mask

    def inference(self, batch, *args, **kwargs):
        if batch is None:
            return None
        ids, mask = batch
        with torch.inference_mode():
            hidden = self.model(ids, mask).float()
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return F.normalize(pooled, p=2, dim=1)

    def postprocess(self, embeddings):
        rows = embeddings.tolist() if embeddings is not None else []
        answers = []
        for i, (start, end) in enumerate(self.spans):
            if i in self.bad:
                self.context.set_response_status(400, self.bad[i], idx=i)
                answers.append({"error": self.bad[i]})
            else:
                answers.append({"embeddings": rows[start:end]})
        return answers
