"""Shared machinery of every pixel-map method (IKD-MIL, Max-Min, CAM/MIL baselines, U-Net).

Data convention: see :mod:`milkit.data.seg_synthetic` — an image is a Bag with
``instances`` ``(1, 3, H, W)``, image ``label``, truth mask ``meta["mask"]`` (scoring only).

Pieces:

* :class:`SegBatch` / :func:`seg_loader` — image batches ``(B, 3, H, W)``. Training
  loaders are built with ``with_masks=False`` so a training step cannot see a mask.
* A *segmentation net* is any ``nn.Module`` with
  ``segment(images) -> (image_prob (B,) | None, pixel_prob (B, H, W))`` in [0, 1].
  When ``image_prob`` is None the image probability is the max of the (blurred) map.
* :class:`SegLabeler` — net + post-processing (optional Gaussian blur, IKD §4.2 σ = 3)
  + pixel threshold: image batch → image probability (B,) and pixel probability map (B, H, W).
* :class:`SegModule` — one LightningModule per stage given ``loss_fn(model, batch)``;
  validation logs ``val/f1`` (IKD F1), ``val/f1_pos``, ``val/f1_neg``, ``val/dice_mean``
  (mean of F1+ and F1−), ``val/iou``, ``val/image_auroc`` (= ``val/bag_auroc``),
  ``val/classification_error`` — mask-based entries only when the val split has masks.
* :class:`SegMethod` — Method base with ``choose_thresholds`` / ``evaluate`` / ``label``
  for pixel maps; subclasses implement ``fit`` and ``load`` (and ``fit_seg_stage`` helps).
"""

from __future__ import annotations

import csv
import io as _io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from milkit import io
from milkit.config import TrainerConfig
from milkit.data.bag import Bag, BagDataset
from milkit.data.base import DataSplits
from milkit.engine import fit_stage, restore
from milkit.methods.base import Labeler, LossModule, Method
from milkit.metrics.pixel import PixelMetricAccumulator, summarize
from milkit.report import ScoreSet
from milkit.run_dir import RunDir

# ----------------------------------------------------------------------------- batches


@dataclass
class SegBatch:
    """A batch of images. ``masks`` is None in training batches (never seen by a loss)."""

    images: Tensor  # (B, 3, H, W) float in [0, 1]
    labels: Tensor  # (B,) float
    bag_ids: list[str]
    masks: Tensor | None = None  # (B, H, W) uint8, scoring only

    def to(self, device: torch.device | str) -> "SegBatch":
        return SegBatch(
            images=self.images.to(device),
            labels=self.labels.to(device),
            bag_ids=self.bag_ids,
            masks=None if self.masks is None else self.masks.to(device),
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def image_of(bag: Bag) -> Tensor:
    """The ``(3, H, W)`` image of a segmentation bag; a clear error for other bags."""
    x = bag.instances
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(
            f"bag {bag.bag_id!r}: a segmentation sample needs instances of shape (1, C, H, W), got {tuple(x.shape)}"
        )
    return x[0]


def mask_of(bag: Bag) -> Tensor | None:
    """The truth mask ``(H, W)`` uint8 of a bag, or None when it has none."""
    m = bag.meta.get("mask") if bag.meta else None
    if m is None:
        return None
    return torch.as_tensor(np.asarray(m)).to(torch.uint8)


def has_masks(ds: BagDataset) -> bool:
    """True when every image of ``ds`` carries a truth mask (and there is at least one)."""
    return len(ds) > 0 and all(mask_of(ds[i]) is not None for i in range(len(ds)))


def collate_seg(bags: list[Bag], with_masks: bool = True) -> SegBatch:
    """Stack images of equal size; masks only when ``with_masks`` and every bag has one."""
    if not bags:
        raise ValueError("collate_seg needs at least one image")
    imgs = [image_of(b) for b in bags]
    shape = imgs[0].shape
    for b, im in zip(bags, imgs):
        if im.shape != shape:
            raise ValueError(
                f"image {b.bag_id!r} has shape {tuple(im.shape)}, expected {tuple(shape)}; "
                "resize images to one size (data.image_size) to batch them"
            )
    masks = None
    if with_masks:
        ms = [mask_of(b) for b in bags]
        if all(m is not None for m in ms):
            masks = torch.stack(ms)  # type: ignore[arg-type]
    return SegBatch(
        images=torch.stack(imgs).float(),
        labels=torch.tensor([float(b.label) for b in bags]),
        bag_ids=[b.bag_id for b in bags],
        masks=masks,
    )


def _collate_train(bags: list[Bag]) -> SegBatch:
    return collate_seg(bags, with_masks=False)


def _collate_eval(bags: list[Bag]) -> SegBatch:
    return collate_seg(bags, with_masks=True)


def seg_loader(ds: BagDataset, cfg: TrainerConfig, shuffle: bool, seed: int = 0, with_masks: bool = False) -> DataLoader:
    """Image batches of ``cfg.batch_size``; training loaders keep ``with_masks=False``."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        collate_fn=_collate_eval if with_masks else _collate_train,
        num_workers=cfg.num_workers,
        generator=g if shuffle else None,
    )


# ----------------------------------------------------------------------------- labeler


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Blur (B, H, W) maps with a Gaussian of std ``sigma`` px (kernel ±3σ, reflect padding)."""
    if sigma <= 0:
        return maps
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    k = 2 * int(math.ceil(3 * sigma)) + 1
    h, w = maps.shape[-2:]
    # reflect padding needs kernel//2 < side; shrink the kernel on tiny images
    k = min(k, 2 * (min(h, w) - 1) - 1 if min(h, w) > 2 else 1)
    if k < 3:
        return maps
    k = k if k % 2 == 1 else k - 1
    return tv_blur(maps.unsqueeze(1), kernel_size=[k, k], sigma=[sigma, sigma]).squeeze(1)


class SegLabeler(Labeler):
    """Image batch → (image probability (B,), pixel probability map (B, H, W)).

    ``threshold`` is the pixel threshold (IKD §4.2: 0.5 after a σ = 3 blur);
    ``blur_sigma`` the Gaussian blur applied to the map before thresholding.
    """

    score_kind = "probability"  # type: ignore[assignment]

    def __init__(self, model: nn.Module, threshold: float | None = 0.5, blur_sigma: float = 0.0):
        if not hasattr(model, "segment"):
            raise TypeError(f"{type(model).__name__} has no segment(images) method; it cannot be a segmentation net")
        self.model = model.eval()
        self.instance_mode = "model"
        self.threshold = threshold
        self.blur_sigma = float(blur_sigma)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if images.ndim == 5 and images.shape[1] == 1:  # a BagBatch-style (B, 1, 3, H, W) tensor
            images = images[:, 0]
        if images.ndim != 4:
            raise ValueError(f"SegLabeler takes images (B, 3, H, W), got shape {tuple(images.shape)}")
        dev = next((t.device for t in [*self.model.parameters(), *self.model.buffers()]), images.device)
        image_prob, pixel_prob = self.model.segment(images.to(dev))
        pixel_prob = gaussian_blur(pixel_prob.float(), self.blur_sigma).clamp(0, 1)
        if image_prob is None:
            image_prob = pixel_prob.flatten(1).amax(1)
        return image_prob.float().to(images.device), pixel_prob.to(images.device)

    def mask(self, pixel_prob: Tensor) -> Tensor:
        """Binary mask (B, H, W) uint8 at the labeler's threshold (0.5 when unset)."""
        thr = 0.5 if self.threshold is None else self.threshold
        return (pixel_prob >= thr).to(torch.uint8)

    @torch.no_grad()
    def predict_dataset(self, ds: BagDataset, batch_size: int = 8):  # type: ignore[override]
        """Yield per image: bag_id, label, image_prob, prob (H, W) and mask (H, W) numpy, truth or None."""
        for start in range(0, len(ds), batch_size):
            bags = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
            batch = collate_seg(bags, with_masks=False)
            p_img, p_pix = self(batch.images)
            masks = self.mask(p_pix)
            for k, bag in enumerate(bags):
                truth = mask_of(bag)
                yield {
                    "bag_id": bag.bag_id,
                    "label": int(bag.label),
                    "image_prob": float(p_img[k]),
                    "prob": p_pix[k].cpu().numpy(),
                    "mask": masks[k].cpu().numpy(),
                    "truth": None if truth is None else truth.numpy(),
                    "image": batch.images[k].cpu().numpy(),
                }


def evaluate_seg(labeler: SegLabeler, ds: BagDataset, scores: ScoreSet | None = None) -> dict:
    """Pixel metrics (per image, averaged) + image classification error / AUROC of one split.
    Fills ``scores`` (image labels and probabilities, for the report) when given."""
    acc = PixelMetricAccumulator()
    labels, probs = [], []
    for r in labeler.predict_dataset(ds):
        labels.append(r["label"])
        probs.append(r["image_prob"])
        if r["truth"] is None:
            acc.add_image(r["label"], r["image_prob"])
        else:
            acc.add(r["mask"], r["truth"], r["label"], r["image_prob"])
    if scores is not None:
        scores.bag_true, scores.bag_prob = np.asarray(labels), np.asarray(probs, dtype=float)
        scores.threshold, scores.instance_name = labeler.threshold, "pixel"
    out = acc.summary()
    out["bag_auroc"] = out.get("image_auroc")  # the key workflow.print_table shows
    out["pixel_threshold"] = labeler.threshold
    out["blur_sigma"] = labeler.blur_sigma
    if not acc.rows:
        out["pixel"] = "not computable: this dataset has no masks"
    return out


# ----------------------------------------------------------------------------- training stage


class SegModule(LossModule):
    """LightningModule of one segmentation stage: ``loss_fn(model, batch) -> (loss, logs)``.

    Validation scores the net through a :class:`SegLabeler` (same blur/threshold as
    inference) and logs the metrics listed in the module docstring.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, SegBatch], tuple[Tensor, dict[str, Tensor]]],
        trainer_cfg: TrainerConfig,
        params: Callable[[], object] | None = None,
        blur_sigma: float = 0.0,
        threshold: float = 0.5,
    ):
        super().__init__(model, loss_fn, trainer_cfg, params)
        self.blur_sigma = blur_sigma
        self.threshold = threshold
        self._acc = PixelMetricAccumulator()

    def validation_step(self, batch: SegBatch, batch_idx: int) -> None:
        was_training = self.model.training
        lab = SegLabeler(self.model, self.threshold, self.blur_sigma)
        p_img, p_pix = lab(batch.images)
        self.model.train(was_training)
        pred = lab.mask(p_pix).cpu().numpy()
        for k in range(len(batch)):
            if batch.masks is None:
                self._acc.add_image(int(batch.labels[k]), float(p_img[k]))
            else:
                self._acc.add(pred[k], batch.masks[k].cpu().numpy(), int(batch.labels[k]), float(p_img[k]))

    def on_validation_epoch_end(self) -> None:
        s = self._acc.summary()
        self._acc = PixelMetricAccumulator()
        a = s.get("image_auroc")
        a = 0.5 if a is None else a
        self.log("val/epoch", float(self.current_epoch))  # monitor it (max) to keep the last epoch
        self.log("val/image_auroc", a)
        self.log("val/bag_auroc", a)
        if s.get("classification_error") is not None:
            self.log("val/classification_error", s["classification_error"])
        for k in ("f1", "f1_pos", "f1_neg", "iou"):
            if s.get(k) is not None:
                self.log(f"val/{k}", s[k])
        if s.get("f1_pos") is not None:
            self.log("val/dice_mean", 0.5 * (s["f1_pos"] + s["f1_neg"]))


# ----------------------------------------------------------------------------- outputs


def _to_uint8_image(img: np.ndarray) -> np.ndarray:
    """(3, H, W) float in [0, 1] → (H, W, 3) uint8."""
    return (np.clip(np.transpose(img, (1, 2, 0)), 0, 1) * 255).round().astype(np.uint8)


def _save_png(path: Path, arr: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        Image.fromarray(arr).save(tmp, format="PNG")

    io.write_with(path, write)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8 image with predicted foreground tinted red."""
    out = image.astype(np.float64).copy()
    red = np.array([255.0, 0.0, 0.0])
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * red
    return out.round().astype(np.uint8)


def side_by_side(path: Path, image: np.ndarray, truth: np.ndarray | None, prob: np.ndarray, mask: np.ndarray, title: str) -> None:
    """Figure: image | truth | probability map | prediction (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("image", image, None), ("truth", truth, "gray"), ("probability", prob, "viridis"), ("prediction", mask, "gray")]
    fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
    for ax, (name, arr, cmap) in zip(axes, panels):
        ax.axis("off")
        ax.set_title(name, fontsize=9)
        if arr is None:
            ax.text(0.5, 0.5, "no mask", ha="center", va="center")
            continue
        ax.imshow(arr, cmap=cmap, vmin=0, vmax=1 if cmap else None, interpolation="nearest")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=80)

    io.write_with(path, write)
    plt.close(fig)


def examples_figure(path: Path, rows: list[dict], title: str) -> None:
    """One figure, one row per image: image | truth | probability map | prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2.0 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        panels = [(_to_uint8_image(r["image"]), None), (r["truth"], "gray"), (r["prob"], "viridis"), (r["mask"], "gray")]
        for j, (arr, cmap) in enumerate(panels):
            ax = axes[i, j]
            ax.axis("off")
            if i == 0:
                ax.set_title(["image", "truth", "probability", "prediction"][j], fontsize=9)
            if arr is None:
                ax.text(0.5, 0.5, "no mask", ha="center", va="center")
            else:
                ax.imshow(arr, cmap=cmap, vmin=0, vmax=1 if cmap else None, interpolation="nearest")
        axes[i, 0].text(0, -1, f"{r['bag_id']} y={r['label']} p={r['image_prob']:.2f}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=70)

    io.write_with(path, write)
    plt.close(fig)


def _example_rows(labeler: "SegLabeler", ds: BagDataset, n_pos: int = 4, n_neg: int = 2) -> list[dict]:
    pos = [i for i in range(len(ds)) if ds[i].label == 1][:n_pos]
    neg = [i for i in range(len(ds)) if ds[i].label == 0][:n_neg]
    return list(labeler.predict_dataset(BagDataset([ds[i] for i in pos + neg])))


def _safe_name(bag_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in bag_id)


# ----------------------------------------------------------------------------- method base


class SegMethod(Method):
    """Method base for pixel-map outputs. Subclasses implement ``fit`` and ``load``.

    Subclass configs should carry ``pixel_threshold`` and ``blur_sigma`` (used by
    :meth:`make_labeler`); ``choose_thresholds`` records the pixel threshold per stage.
    """

    primary_stage: ClassVar[str] = "seg"

    # -- helpers for subclasses -------------------------------------------------------
    def seed(self, offset: int = 0) -> None:
        """Seed every RNG before building a net, so that initial weights follow ``exp.seed``."""
        from milkit.engine import seed_everything

        seed_everything(self.exp.seed + offset)

    def make_labeler(self, model: nn.Module) -> SegLabeler:
        thr = getattr(self.cfg, "pixel_threshold", 0.5)
        sigma = getattr(self.cfg, "blur_sigma", 0.0)
        return SegLabeler(model, thr, sigma)

    def fit_seg_stage(
        self,
        name: str,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, SegBatch], tuple[Tensor, dict[str, Tensor]]],
        splits: DataSplits,
        run: RunDir,
        max_epochs: int | None = None,
        monitor: str | None = None,
        monitor_mode: str | None = None,
        params: Callable[[], object] | None = None,
        seed_offset: int = 0,
        train_with_masks: bool = False,
    ) -> nn.Module:
        """Train one stage through ``engine.fit_stage``; returns the model with its best weights.

        ``train_with_masks`` puts truth masks in training batches: fully supervised
        upper bounds only (U-Net). The monitor falls back to ``val/image_auroc`` when
        the validation split has no masks.
        """
        cfg = self.exp.trainer
        module = SegModule(
            model, loss_fn, cfg, params=params,
            blur_sigma=getattr(self.cfg, "blur_sigma", 0.0), threshold=getattr(self.cfg, "pixel_threshold", 0.5),
        )
        seed = self.exp.seed + seed_offset
        monitor = monitor or getattr(self.cfg, "monitor", None)
        if not has_masks(splits.val):
            monitor, monitor_mode = "val/image_auroc", "max"
        fit_stage(
            module,
            seg_loader(splits.train, cfg, shuffle=True, seed=seed, with_masks=train_with_masks),
            seg_loader(splits.val, cfg, shuffle=False, with_masks=True),
            run.stage_dir(name),
            cfg,
            seed=seed,
            max_epochs=max_epochs,
            monitor=monitor,
            monitor_mode=monitor_mode or getattr(self.cfg, "monitor_mode", None),
        )
        # model.pt holds the SegModule's state ("model." prefix); keep a bare copy too
        io.save_state_dict(run.stage_dir(name) / "net.pt", {k: v.detach().cpu() for k, v in model.state_dict().items()})
        return model.cpu().eval()

    @staticmethod
    def load_net(model: nn.Module, run: RunDir, stage: str) -> nn.Module:
        """Load a stage's weights (``net.pt``) into a freshly built net."""
        return restore(model, run.stage_dir(stage) / "net.pt").eval()

    # -- Method API --------------------------------------------------------------------
    def choose_thresholds(self, labelers: dict[str, Labeler], splits: DataSplits, run: RunDir) -> None:
        """Pixel threshold per stage: the configured value (IKD §4.2: 0.5 after blur)."""
        for name, lab in labelers.items():
            thr = getattr(self.cfg, "pixel_threshold", 0.5)
            lab.threshold = thr
            run.write_threshold(name, {"threshold": thr, "source": "config:pixel_threshold",
                                       "blur_sigma": getattr(lab, "blur_sigma", 0.0)})

    def evaluate(self, labelers: dict[str, Labeler], splits: DataSplits, run: RunDir,
                 scores: dict[str, dict[str, ScoreSet]] | None = None) -> dict:
        """Per stage and split: F1+, F1−, IKD F1, IoU, HD^Pos, confusion, classification error, AUROC;
        plus ``figures/<stage>_test.png`` (image | truth | map | prediction for a few test images)."""
        out: dict = {}
        for name, lab in labelers.items():
            thr = run.read_threshold(name)
            if thr.get("threshold") is not None:
                lab.threshold = thr["threshold"]
            out[name] = {"threshold": thr}
            for split in ("val", "test"):
                sc = ScoreSet(np.zeros(0), np.zeros(0))
                out[name][split] = evaluate_seg(lab, splits.get(split), sc)  # type: ignore[arg-type]
                if scores is not None:
                    scores.setdefault(name, {})[split] = sc
            if len(splits.test) and isinstance(lab, SegLabeler):
                fig = run.path / "figures" / f"{name}_test.png"
                examples_figure(fig, _example_rows(lab, splits.test), f"{name}: test examples")
                out[name]["figure"] = str(fig.relative_to(run.path))
        return out

    def label(self, labeler: Labeler, ds: BagDataset, out_dir: Path, stage: str) -> list[Path]:
        """Per image: ``masks/<id>.png`` (0/255), ``prob/<id>.png`` (16-bit, p·65535),
        ``overlay/<id>.png``, ``figures/<id>.png`` (image | truth | map | mask), and
        ``image_predictions_<stage>.csv``; every file written atomically."""
        if not isinstance(labeler, SegLabeler):
            raise TypeError(f"stage {stage!r}: label needs a SegLabeler, got {type(labeler).__name__}")
        root = Path(out_dir) / stage
        written: list[Path] = []
        buf = _io.StringIO()
        w = csv.writer(buf)
        w.writerow(["image_id", "label", "image_prob", "predicted_fraction", "f1_pos", "f1_neg"])
        from milkit.metrics.pixel import image_metrics

        for r in labeler.predict_dataset(ds):
            name = _safe_name(r["bag_id"])
            img = _to_uint8_image(r["image"])
            mask = r["mask"].astype(np.uint8)
            paths = {
                "masks": root / "masks" / f"{name}.png",
                "prob": root / "prob" / f"{name}.png",
                "overlay": root / "overlay" / f"{name}.png",
                "figures": root / "figures" / f"{name}.png",
            }
            _save_png(paths["masks"], mask * 255)
            _save_png(paths["prob"], (np.clip(r["prob"], 0, 1) * 65535).round().astype(np.uint16))
            _save_png(paths["overlay"], overlay(img, mask))
            side_by_side(paths["figures"], img, r["truth"], r["prob"], mask, f"{r['bag_id']}  p={r['image_prob']:.3f}")
            written += list(paths.values())
            f1p = f1n = ""
            if r["truth"] is not None:
                m = image_metrics(mask, r["truth"])
                f1p, f1n = f"{m['f1_pos']:.4f}", f"{m['f1_neg']:.4f}"
            w.writerow([r["bag_id"], r["label"], f"{r['image_prob']:.6g}", f"{mask.mean():.6g}", f1p, f1n])
        csv_path = Path(out_dir) / f"image_predictions_{stage}.csv"
        io.write_text(csv_path, buf.getvalue())
        return [csv_path] + written


__all__ = [
    "SegBatch",
    "SegLabeler",
    "SegMethod",
    "SegModule",
    "collate_seg",
    "evaluate_seg",
    "gaussian_blur",
    "image_of",
    "mask_of",
    "seg_loader",
    "summarize",
]
