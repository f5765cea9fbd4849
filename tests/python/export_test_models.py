"""Small TorchScript models for the scheduler tests. Usage: export_test_models.py BUILD_DIR

tokenwise.pt: ids [N, L] int64 and mask [N, L] int64 ->
    hidden [N, L, 16] float32 (per position; padded positions never affect real ones) and
    pooled [N, 16] float32 (mean over the mask).
    Ids must be below 1000: a larger id makes forward fail, which the tests use on purpose.
"""

import sys
from pathlib import Path

import torch


class Tokenwise(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 16)
        self.mix = torch.nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor):
        hidden = torch.tanh(self.mix(self.embed(ids)))
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        return hidden, pooled


def main(build: Path) -> None:
    torch.manual_seed(11)
    models = build / "models"
    models.mkdir(parents=True, exist_ok=True)
    torch.jit.script(Tokenwise().eval()).save(str(models / "tokenwise.pt"))
    print(f"test models: wrote {models / 'tokenwise.pt'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
