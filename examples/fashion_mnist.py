"""DINO on Fashion-MNIST on a CPU: train a small ViT, then compare k-NN accuracy of the teacher's
features with the same model at initialisation and with raw pixels.

    python examples/fashion_mnist.py --train 5000 --epochs 24

Reads Fashion-MNIST where dr.fashion_mnist finds it ($FASHION_MNIST_ROOT, Debian's dataset-fashion-mnist,
or a download of about 30 MB, once, into dr.hub.cache_dir()), or from --root holding the four idx .gz
files. The recipe is docs/recipe.md's for small data: patch 7, dim 64, depth 4, heads 4; head 256/64 ->
256; 2x28 + 4x14 px crops; teacher momentum 0.99; teacher temperature 0.01 (0.02 drifted to the uniform
output here). It is ``python -m dino_rs demo`` on the full Fashion-MNIST files, with the subset sizes
as flags.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import dino_rs as dr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=5000, help="training images")
    ap.add_argument("--test", type=int, default=1000, help="test images for k-NN")
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default=None, help="folder of the four idx .gz files (default: dr.fashion_mnist's search)")
    args = ap.parse_args()

    x, y = dr.fashion_mnist("train", args.root)
    xt, yt = dr.fashion_mnist("test", args.root)
    x, y, xt, yt = x[: args.train], y[: args.train], xt[: args.test], yt[: args.test]

    aug = dr.MultiCropAugmenter(global_size=28, local_size=14, n_local=4)
    loader = dr.MultiCropLoader(dr.ArrayDataset(x, y), aug, batch_size=args.batch_size, seed=args.seed)
    model = dr.DINO(patch_size=7, img_size=28, embed_dim=64, depth=4, num_heads=4, out_dim=256, hidden_dim=256,
                    bottleneck_dim=64, drop_path_rate=0.1, seed=args.seed, device="cpu")

    def knn() -> float:
        return dr.knn_accuracy(model.embed(x), y, model.embed(xt), yt, k=20, temperature=0.07)[0]

    raw = dr.knn_accuracy(x.reshape(len(x), -1).astype(np.float32), y, xt.reshape(len(xt), -1).astype(np.float32), yt)[0]
    init = knn()
    trainer = dr.Trainer(model, loader, epochs=args.epochs, lr=args.lr, warmup_epochs=min(2, args.epochs),
                         teacher_temp=0.01, warmup_teacher_temp=0.01, momentum_teacher=0.99)
    start = time.perf_counter()
    history = trainer.fit()
    seconds = time.perf_counter() - start
    trained = knn()
    print(f"losses per epoch: {[round(h['loss'], 3) for h in history]}")
    print(f"k-NN top-1 (k=20, T=0.07, {len(xt)} test images): raw pixels {raw:.1f}%, "
          f"init {init:.1f}% -> trained {trained:.1f}% after {args.epochs} epochs on {len(x)} images "
          f"({seconds:.0f} s training, ln(out_dim) = {np.log(256):.2f})")


if __name__ == "__main__":
    main()
