"""Small TorchScript models for the scheduler tests. Usage: export_test_models.py BUILD_DIR

tokenwise.pt: ids [N, L] int64 and mask [N, L] int64 ->
    hidden [N, L, 16] float32 (per position; padded positions never affect real ones) and
    pooled [N, 16] float32 (mean over the mask).
    Ids must be below 1000: a larger id makes forward fail, which the tests use on purpose.
positions.pt: ids [N, L] int64 -> hidden [N, L, 16] float32, with learned position embeddings
    looked up through an integer buffer (as transformers' BERT does): reduced precision must
    leave that buffer alone. positions-frozen.pt is the same module frozen (weights as constants).
unmasked.pt: ids [N, L] int64 -> pooled [N, 16] float32, the mean over every position, padding
    included: a model that does not mask padding, which must never be batched across lengths.
normed.pt: x [N, 4] float32 -> y [N, 4] float32 through batch norm with running statistics:
    floating buffers that reduced precision must cast along with the parameters.
offset-1.pt, offset-2.pt, offset-3.pt: x [N, 4] float32 -> y [N, 4] float32 = x + V, three
    versions of one model whose answers say which version gave them (the reload tests).
hang.pt: x [N, 4] float32 -> y [N, 4] float32 after 2^40 tiny additions: a load whose warm-up
    never ends (the load deadline's test). Only pure tensor operators.

Hostile models, which Kiln's load-time check of a model's code (runtime/src/model/graph_check)
must refuse without running them; each is otherwise an ordinary x [N, 4] -> y [N, 4] model:
from-file.pt: forward maps the server's /etc/passwd into a tensor (aten::from_file), two calls
    down (a submodule's forward calls a function that does): the check must follow calls.
odd-op.pt: forward prints (prim::Print): harmless, but it writes to the server's output, and an
    operator outside the allow-list must be refused by name whatever it does.
sort-from-file.pt: forward sorts a list of objects whose class's __lt__ maps /etc/passwd: no call
    node leads there (list.sort() calls __lt__), so only checking every method of every class
    the code uses finds it.
setstate-from-file.pt: __setstate__, which torch.jit.load runs while unpickling, maps the file
    `kiln-setstate-from-file.created` in the loading process's working directory, creating it
    (shared=True): a naive load-then-check would create it before checking anything.
"""

import sys
from pathlib import Path
from typing import List, Tuple

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


class Positions(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 16)
        self.position = torch.nn.Embedding(512, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.register_buffer("position_ids", torch.arange(512).unsqueeze(0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : ids.shape[1]]
        return self.norm(self.embed(ids) + self.position(positions))


class Unmasked(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids).mean(1)


class Normed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.norm.running_mean.uniform_(-1.0, 1.0)
        self.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x))


class Offset(torch.nn.Module):
    def __init__(self, version: int) -> None:
        super().__init__()
        self.register_buffer("offset", torch.full((4,), float(version)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


class Hang(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for _ in range(1 << 40):
            y = y + 1.0
        return y


def leak(path: str) -> torch.Tensor:
    return torch.from_file(path, shared=False, size=4, dtype=torch.uint8)


class Leaker(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + leak("/etc/passwd").to(x.dtype)


class FromFile(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.leaker = Leaker()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.leaker(x)


class OddOp(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("odd-op: forward ran")
        return x * 2.0


@torch.jit.script
class Ranked(object):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __lt__(self, other: "Ranked") -> bool:
        leaked = torch.from_file("/etc/passwd", shared=False, size=1, dtype=torch.uint8)
        return bool(leaked[0] > self.rank)


class SortFromFile(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ranked: List[Ranked] = [Ranked(3), Ranked(1)]
        ranked.sort()
        return x + ranked[0].rank


# Relative: created wherever the process that loads the model runs, so a test can watch a folder
# of its own.
SETSTATE_TARGET = "kiln-setstate-from-file.created"


class SetstateFromFile(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.target = SETSTATE_TARGET
        self.offset = torch.zeros(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return (self.target, self.offset, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.target = state[0]
        self.offset = state[1] + torch.from_file(state[0], shared=True, size=4, dtype=torch.float32)
        self.training = state[2]


class Drift(torch.nn.Module):
    """Exact in FP32 and ruined in bf16, fp16 and under bf16 autocast: x is added to a large
    offset, passed through an identity matrix product and taken off again, and beside 4096 the
    reduced formats keep no bits (bf16) or two (fp16) for x; autocast runs the product in bf16."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = torch.nn.Parameter(torch.tensor(4096.0))
        self.identity = torch.nn.Parameter(torch.eye(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x + self.offset, self.identity) - self.offset


def main(build: Path) -> None:
    torch.manual_seed(11)
    models = build / "models"
    models.mkdir(parents=True, exist_ok=True)
    torch.jit.script(Tokenwise().eval()).save(str(models / "tokenwise.pt"))
    positions = torch.jit.script(Positions().eval())
    positions.save(str(models / "positions.pt"))
    torch.jit.freeze(positions).save(str(models / "positions-frozen.pt"))
    torch.jit.script(Normed().eval()).save(str(models / "normed.pt"))
    torch.jit.script(Unmasked().eval()).save(str(models / "unmasked.pt"))
    for version in (1, 2, 3):
        torch.jit.script(Offset(version).eval()).save(str(models / f"offset-{version}.pt"))
    torch.jit.script(Hang().eval()).save(str(models / "hang.pt"))
    torch.jit.script(FromFile().eval()).save(str(models / "from-file.pt"))
    torch.jit.script(OddOp().eval()).save(str(models / "odd-op.pt"))
    torch.jit.script(SortFromFile().eval()).save(str(models / "sort-from-file.pt"))
    torch.jit.script(SetstateFromFile().eval()).save(str(models / "setstate-from-file.pt"))
    drift = torch.jit.script(Drift().eval())
    drift.save(str(models / "drift.pt"))
    torch.jit.freeze(drift).save(str(models / "drift-frozen.pt"))
    print(f"test models: wrote {models / 'tokenwise.pt'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
