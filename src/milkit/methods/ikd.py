"""IKD-MIL (He, Li & Zemp): MIL pseudo-masks refined by iterative fusion-knowledge distillation.

Stages (each trained through ``engine.fit_stage``, every checkpoint kept in the run dir):

1. ``teacher_r0`` — side-output net trained on image labels with Dice on every side
   output and the fusion, inverted for negative images (§3.1, Eq. 1), for a fixed
   ``teacher_epochs`` (§4.2: 30); its last epoch is kept (``teacher_monitor``).
2. ``student_r0``, ``student_r1``, … — one stage per round of ``check_every`` epochs
   (§4.2: 30): the student learns the frozen teacher's fused map by fusion KD (Eq. 2)
   plus a·weighted CE with soft targets (Eq. 3–4, a = 0.25); the best validation
   epoch of the round is kept (Fig. 5/7 report the best of each 30 epochs). At the end of a round
   (the check) the student's validation score is compared with the teacher's; only
   when the student wins are the roles swapped (§3.2 "Dynamic teacher-student switch"):
   the student becomes the teacher and the old teacher becomes the next student.
3. ``final`` — a copy of the current teacher after the last check (the best validated
   model of the chain); ``history.json`` in its folder records every check.

Masks: Gaussian blur σ = 3 of the fused map, threshold 0.5 (§4.2).

Eq. 3's cross-entropy is two-class by default (``wce_form: binary``, the authors' code
and OEEM [34]); ``wce_form: positive`` is the one-sided −t log s as printed. Its
softmax(−ce) weights carry no gradient (see :func:`milkit.losses.ikd.weighted_ce`).
Option beyond the paper (off by default): ``student_target: mask`` distils the
teacher's blurred, thresholded pseudo-mask instead of its soft map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from milkit import io
from milkit.config import StrictModel
from milkit.data.base import DataSplits
from milkit.losses.ikd import DEFAULT_A, student_loss, teacher_loss
from milkit.methods.base import Labeler
from milkit.methods.seg_base import SegBatch, SegMethod, evaluate_seg, gaussian_blur, has_masks
from milkit.models.sideout import SideOutputNet
from milkit.run_dir import RunDir


class IKDConfig(StrictModel):
    """``method:`` section of IKD-MIL; defaults from the paper (section in each description)."""

    name: Literal["ikd"] = "ikd"
    backbone: Literal["vgg16", "resnet18", "vgg_small"] = Field(
        "vgg16", description="§3 Fig. 3: first 3 VGG16 blocks; Table 2: ResNet; vgg_small for CPU runs"
    )
    width: int = Field(16, ge=1, description="channels of vgg_small's first block (CPU runs only)")
    pretrained_path: str | None = Field(
        None, description="ImageNet weights: a torchvision state dict file, 'imagenet' = torchvision download "
        "(internet), None = random init (CPU/test configs only; the paper configs name a file)")
    learn_fusion: bool = Field(True, description="§3.1: fusion weights w are learnable")
    fusion_init: tuple[float, float, float] = Field((0.3, 0.3, 0.4), description="released code's fixed w (NOTES.md)")
    teacher_epochs: int = Field(30, ge=1, description="§4.2: stage 1 trains the teacher for 30 epochs")
    check_every: int = Field(30, ge=1, description="§4.2: teacher/student check (and switch) every 30 epochs")
    rounds: int = Field(3, ge=1, description="distillation rounds (checks); §4.4 runs up to 450 epochs = 15")
    a: float = Field(DEFAULT_A, ge=0, description="§3.2 Eq. 4 / Table 4: weight of L_wce, 0.25")
    wce_form: Literal["positive", "binary"] = Field(
        "binary", description="Eq. 3's CE: binary = two-class −t log s − (1−t) log(1−s) (authors' code, OEEM [34]); "
        "positive = −t log s as printed (pushes every pixel to foreground)"
    )
    student_target: Literal["soft", "mask"] = Field(
        "soft", description="§3.2: the teacher's soft fused map; 'mask' = its blurred, thresholded pseudo-mask"
    )
    dice_smooth: float = Field(1.0, gt=0, description="+s of the soft Dice (implementation choice)")
    blur_sigma: float = Field(3.0, ge=0, description="§4.2 / NOTES.md: Gaussian blur σ = 3 before thresholding")
    pixel_threshold: float = Field(0.5, gt=0, lt=1, description="§4.2: threshold 0.5")
    switch_metric: Literal["f1", "f1_pos", "f1_neg", "iou", "dice_mean"] = Field(
        "f1", description="validation metric compared at each check (IKD §4.2 F1)"
    )
    monitor: str = Field("val/f1", description="best checkpoint within a stage (validation F1)")
    teacher_monitor: str | None = Field(
        "val/epoch",
        description="teacher_r0's checkpoint: 'val/epoch' = its last epoch (§4.2: a fixed 30 epochs of MIL, "
        "no mask-based selection); None = use monitor",
    )
    monitor_mode: Literal["max", "min"] = "max"


def make_net(cfg: IKDConfig) -> SideOutputNet:
    return SideOutputNet(
        backbone=cfg.backbone,
        width=cfg.width,
        pretrained_path=cfg.pretrained_path,
        fusion_init=cfg.fusion_init,
        learn_fusion=cfg.learn_fusion,
    )


def teacher_loss_fn(smooth: float) -> Callable[[nn.Module, SegBatch], tuple[Tensor, dict[str, Tensor]]]:
    """Eq. 1 on a batch (image labels only)."""

    def fn(net: nn.Module, batch: SegBatch) -> tuple[Tensor, dict[str, Tensor]]:
        out = net(batch.images)
        loss = teacher_loss(out.sides, out.fused, batch.labels, smooth)
        return loss, {"dice": loss.detach()}

    return fn


class StudentLoss:
    """Eq. 4 against a frozen teacher (eval mode, no gradients), moved to the batch's device."""

    def __init__(self, teacher: nn.Module, a: float, smooth: float, wce_form: str = "binary",
                 target: str = "soft", blur_sigma: float = 0.0, threshold: float = 0.5):
        self.teacher = freeze(teacher)
        self.target = target
        self.blur_sigma = blur_sigma
        self.threshold = threshold
        self.a = a
        self.smooth = smooth
        self.wce_form = wce_form

    def __call__(self, net: nn.Module, batch: SegBatch) -> tuple[Tensor, dict[str, Tensor]]:
        self.teacher.to(batch.images.device).eval()
        with torch.no_grad():
            t = self.teacher(batch.images).fused
            if self.target == "mask":
                t = (gaussian_blur(t, self.blur_sigma) >= self.threshold).to(t.dtype)
        out = net(batch.images)
        return student_loss(out.sides, out.fused, t, batch.labels, a=self.a, smooth=self.smooth, wce_form=self.wce_form)


def freeze(net: nn.Module) -> nn.Module:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def unfreeze(net: nn.Module, learn_fusion: bool = True) -> nn.Module:
    for name, p in net.named_parameters():
        p.requires_grad_(learn_fusion or name != "fusion_logits")
    return net.train()


@dataclass
class Check:
    """One teacher/student comparison at the end of a round."""

    round: int
    student_stage: str
    teacher_stage: str
    student_score: float
    teacher_score: float
    switched: bool


def run_rounds(
    teacher: nn.Module,
    student: nn.Module,
    teacher_stage: str,
    teacher_score: float,
    rounds: int,
    train_student: Callable[[nn.Module, nn.Module, str, int], nn.Module],
    score: Callable[[nn.Module], float],
) -> tuple[nn.Module, str, list[Check]]:
    """The iterative distillation loop (§3.2). Roles switch only when the student's
    validation score is strictly higher than the teacher's.

    ``train_student(student, frozen_teacher, stage_name, round) -> trained student``;
    ``score(net) -> validation score``. Returns the final teacher, its stage, the checks.
    """
    history: list[Check] = []
    for r in range(rounds):
        stage = f"student_r{r}"
        student = train_student(student, teacher, stage, r)
        s = float(score(student))
        switched = s > teacher_score
        history.append(Check(r, stage, teacher_stage, s, float(teacher_score), switched))
        if switched:
            teacher, student = student, teacher
            teacher_stage, teacher_score = stage, s
    return teacher, teacher_stage, history


class IKDMethod(SegMethod):
    """Teacher (Eq. 1) → rounds of frozen-teacher fusion KD (Eq. 2–4) with role switch."""

    Config: ClassVar[type[StrictModel]] = IKDConfig
    primary_stage: ClassVar[str] = "final"

    def _score(self, net: nn.Module, splits: DataSplits) -> float:
        metrics = evaluate_seg(self.make_labeler(net.cpu()), splits.val)
        key = self.cfg.switch_metric if has_masks(splits.val) else "image_auroc"
        v = metrics.get(key)
        return float("-inf") if v is None else float(v)

    def fit(self, splits: DataSplits, run: RunDir) -> dict[str, Labeler]:
        cfg: IKDConfig = self.cfg
        self.seed()
        teacher = self.fit_seg_stage(
            "teacher_r0", make_net(cfg), teacher_loss_fn(cfg.dice_smooth), splits, run, max_epochs=cfg.teacher_epochs,
            monitor=cfg.teacher_monitor, monitor_mode="max" if cfg.teacher_monitor == "val/epoch" else None,
        )
        t_score = self._score(teacher, splits)
        # the round-0 student is a second net (its own init, seed offset 1): the paper's
        # student shares the backbone design but not the teacher's weights
        self.seed(1)
        student0 = make_net(cfg)

        def train_student(student: nn.Module, frozen: nn.Module, stage: str, r: int) -> nn.Module:
            loss = StudentLoss(frozen, cfg.a, cfg.dice_smooth, cfg.wce_form, cfg.student_target, cfg.blur_sigma,
                               cfg.pixel_threshold)
            unfreeze(student, cfg.learn_fusion)
            return self.fit_seg_stage(stage, student, loss, splits, run, max_epochs=cfg.check_every, seed_offset=r + 1)

        final, final_stage, history = run_rounds(
            teacher, student0, "teacher_r0", t_score, cfg.rounds, train_student, lambda n: self._score(n, splits)
        )
        freeze(final)
        io.save_state_dict(run.stage_dir("final") / "net.pt", {k: v.detach().cpu() for k, v in final.state_dict().items()})
        io.write_json(
            run.stage_dir("final") / "history.json",
            {"final_from": final_stage, "switch_metric": cfg.switch_metric, "teacher_r0_score": t_score,
             "checks": [c.__dict__ for c in history], "n_switches": sum(c.switched for c in history)},
        )
        return self.load(run)

    def stage_names(self) -> list[str]:
        return ["teacher_r0"] + [f"student_r{r}" for r in range(self.cfg.rounds)] + ["final"]

    def load(self, run: RunDir) -> dict[str, Labeler]:
        out: dict[str, Labeler] = {}
        for name in self.stage_names():
            if (run.stage_dir(name) / "net.pt").is_file():
                out[name] = self.make_labeler(self.load_net(make_net(self.cfg), run, name))
        if "final" not in out:
            raise FileNotFoundError(f"{run.path}: IKD run has no stages/final/net.pt (training did not finish)")
        return out


__all__ = ["IKDConfig", "IKDMethod", "run_rounds", "Check", "StudentLoss"]
