"""Train the digits CNN on scikit-learn's bundled 8x8 digits and export it to TorchScript.

Writes, under the build folder given as the only argument:
  models/digits.pt          the TorchScript module: image [N, 1, 8, 8] in [0, 1] -> logits [N, 10]
  holdout/digits/NNNN_D.png held-out samples (never trained on), 32x32, label D in the name
No download: the data ships with scikit-learn. Fixed seed, a few seconds of CPU.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 7


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


def main(build: Path) -> None:
    torch.manual_seed(SEED)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=SEED, stratify=y
    )
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _epoch in range(40):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test)).argmax(1).numpy()
    accuracy = float((pred == y_test).mean())
    print(f"digits: held-out accuracy in PyTorch {accuracy:.4f} on {len(y_test)} samples")

    models = build / "models"
    models.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(model)
    scripted.save(str(models / "digits.pt"))

    holdout = build / "holdout" / "digits"
    holdout.mkdir(parents=True, exist_ok=True)
    for old in holdout.glob("*.png"):
        old.unlink()
    for i, (img, label) in enumerate(zip(x_test, y_test)):
        pixels = np.clip(np.rint(img[0] * 255.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((32, 32), Image.NEAREST).save(
            holdout / f"{i:04d}_{label}.png"
        )
    print(f"digits: wrote {models / 'digits.pt'} and {len(y_test)} held-out PNGs")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
