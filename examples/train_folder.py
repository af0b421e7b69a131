"""DINO on your own folder of images: train, save, embed, and (when the folder has one subfolder
per class) measure the features with DINO's k-NN classifier.

    python examples/train_folder.py --data path/to/images --output_dir runs/mine --epochs 20

The same run from the command line is ``dino-rs train --data DIR --output_dir OUT ...`` followed by
``dino-rs embed --checkpoint OUT --data DIR --output feats.npy``. Labels are only used for the
evaluation: the training itself is self-supervised. Images directly in the folder (not in a class
subfolder) are trained on but left out of the k-NN evaluation.

Defaults are sized for a CPU: a ViT with patch 8 on 64 px crops. For photos at the official
resolution use ``--img_size 224 --local_size 96 --patch_size 16 --embed_dim 384 --depth 12
--num_heads 6 --out_dim 65536`` (ViT-S/16) and a GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import dino_rs as dr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder of images (subfolders = classes, optional)")
    ap.add_argument("--output_dir", default="dino_rs_run", help="checkpoints, model and features go here")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--img_size", type=int, default=64, help="global crop and evaluation size")
    ap.add_argument("--local_size", type=int, default=32)
    ap.add_argument("--n_local", type=int, default=4)
    ap.add_argument("--patch_size", type=int, default=8)
    ap.add_argument("--embed_dim", type=int, default=96)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--num_heads", type=int, default=3)
    ap.add_argument("--out_dim", type=int, default=1024)
    ap.add_argument("--teacher_temp", type=float, default=0.04)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval_every", type=int, default=0, help="k-NN every N epochs (needs class subfolders)")
    args = ap.parse_args()

    out = Path(args.output_dir)
    dataset = dr.ImageFolder(args.data)
    labels = np.asarray(dataset.labels)
    print(f"{len(dataset)} images in {args.data}, classes: {dataset.classes or 'none'}")

    # k-NN evaluation needs labelled images: half of each class for the k-NN "memory bank", half to classify.
    eval_data = None
    labelled = np.flatnonzero(labels >= 0)
    if len(dataset.classes) >= 2 and len(labelled) >= 4:
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(labelled)
        bank, query = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])
        paths = dataset.paths
        eval_data = ([paths[i] for i in bank], labels[bank], [paths[i] for i in query], labels[query])

    augmenter = dr.MultiCropAugmenter(global_size=args.img_size, local_size=args.local_size, n_local=args.n_local)
    loader = dr.MultiCropLoader(dataset, augmenter, batch_size=min(args.batch_size, len(dataset)), seed=args.seed)
    checkpoint = out / "checkpoint.safetensors"
    if checkpoint.is_file():
        trainer = dr.Trainer.resume(checkpoint, loader, device=args.device, eval_data=eval_data)
        print(f"resumed from {checkpoint} at epoch {trainer.epoch}")
    else:
        model = dr.DINO(patch_size=args.patch_size, img_size=args.img_size, embed_dim=args.embed_dim, depth=args.depth,
                        num_heads=args.num_heads, out_dim=args.out_dim, hidden_dim=512, bottleneck_dim=128,
                        device=args.device, seed=args.seed)
        trainer = dr.Trainer(model, loader, epochs=args.epochs, lr=args.lr, warmup_epochs=min(2, args.epochs),
                             teacher_temp=args.teacher_temp, warmup_teacher_temp=min(0.04, args.teacher_temp),
                             checkpoint_dir=out, saveckp_freq=10,
                             eval_every=args.eval_every if eval_data is not None else 0, eval_data=eval_data)
    model = trainer.model
    start = time.perf_counter()
    history = trainer.fit()
    print(f"trained {len(history)} epochs in {time.perf_counter() - start:.0f} s; "
          f"losses {[round(h['loss'], 3) for h in trainer.history]}")

    model.save(out / "model.safetensors")
    model.export_backbone(out / "backbone.safetensors")
    features = model.embed(dataset)
    np.save(out / "features.npy", features)
    print(f"wrote {out / 'model.safetensors'}, {out / 'backbone.safetensors'} and {out / 'features.npy'} {features.shape}")

    if eval_data is not None:
        top1, top5 = trainer.evaluate()
        print(f"k-NN (k=20, T=0.07) on {len(eval_data[3])} held-out images: top-1 {top1:.1f}%, top-5 {top5:.1f}%")
    else:
        print("no class subfolders: skipping the k-NN evaluation")


if __name__ == "__main__":
    main()
