"""Distill-to-Label (Thiagarajan et al.): VAT-MIL teacher, then bag- and instance-level
distillation into a student that labels single instances.

Stages (each kept in the run directory):
- ``abmil``   (optional, ``baseline: true``) plain gated-attention MIL, instance scores =
  attention logits — the "MIL [11]" column of Tables I–II;
- ``teacher`` gated-attention MIL trained with Eq. 3 (VAT-MIL);
- ``student`` same architecture, fresh weights, trained with Eq. 5 against the frozen
  teacher; instance scores = the student's probability for each instance as a bag of
  size one (§III-C). The teacher's instance scores are its own single-instance bags.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from milkit.config import StrictModel
from milkit.data.bag import BagBatch, BagDataset
from milkit.data.base import DataSplits
from milkit.engine import fit_stage, restore_submodule
from milkit.losses.distillation import student_terms
from milkit.losses.vat_mil import vat_mil_terms
from milkit.methods.base import BagModule, Labeler, Method, bag_loader
from milkit.methods.mil import freeze, mil_loss
from milkit.models.base import EmbeddingMILModel, MILModel, bag_and_instance_logits
from milkit.models.factory import ModelSection, build_mil_model, model_config
from milkit.nn.encoders import EncoderConfig


class TeacherConfig(StrictModel):
    """Eq. 3. λ defaults: colon setting, §IV-A (breast: 0.8, 0.8, 0.3, 0.3)."""

    lambda_c: float = Field(1.0, ge=0, description="λc, §IV-A (colon)")
    lambda_n: float = Field(0.5, ge=0, description="λn, §IV-A (colon)")
    lambda_delta: float = Field(0.3, ge=0, description="λδ, §IV-A (colon)")
    lambda_e: float = Field(0.3, ge=0, description="λe, §IV-A (colon)")
    use_noise: bool = Field(True, description="term Ln on/off (Fig. 2 'without VAT' = all three off)")
    use_perturbation: bool = True
    use_entropy: bool = True
    noise_fraction: float = Field(0.2, gt=0, description="K_n − K = max(1, round(0.2·K)); paper silent, NOTES.md")
    perturbation: Literal["adversarial", "random"] = Field(
        "adversarial",
        description="direction of X_δ. Default adversarial: the method is 'virtual adversarial' training (Miyato et "
        "al.; NOTES.md); §III-B's 'random perturbation within the norm ball' = perturbation random + radius ball",
    )
    radius: Literal["sphere", "ball"] = Field(
        "sphere", description="sphere: ‖Δx_k‖ = δ (VAT, default with adversarial); ball: ‖Δx_k‖ ~ U(0, δ) (§III-B reading)"
    )
    delta: float = Field(
        1.0, gt=0, description="norm-ball radius δ per instance, in input units; paper silent, NOTES.md default 1.0 "
        "(28×28 digits in [0,1] have ‖x‖ ≈ 9, so δ = 1 is ~10 % of an instance's norm)"
    )
    xi: float = Field(
        1e-3, gt=0, description="power-iteration step ξ relative to each instance's norm (probe at x + ξ‖x‖d); "
        "Miyato et al.'s absolute 1e-6 underflows in float32 (x + ξd == x)"
    )
    power_iterations: int = Field(1, ge=1)
    subbag_fraction: float = Field(0.5, gt=0, le=1, description="|X̄| = half the bag; paper silent, NOTES.md")
    subbag_realisations: int = Field(1, ge=1, description="R; breast uses 5, §IV-A")
    epochs: int | None = Field(None, ge=1, description="default: trainer.max_epochs")


class StudentConfig(StrictModel):
    """Eq. 5. γ defaults §IV-A; τ paper silent, NOTES.md default 2.0."""

    gamma_c: float = Field(0.3, ge=0, description="γc, §IV-A")
    gamma_b: float = Field(0.5, ge=0, description="γb, §IV-A")
    gamma_i: float = Field(0.5, ge=0, description="γi, §IV-A")
    gamma_e: float = Field(0.1, ge=0, description="γe, §IV-A")
    temperature: float = Field(2.0, gt=0, description="τ of Eq. 4; paper silent, NOTES.md")
    instance_reduction: Literal["sum", "mean"] = Field("sum", description="Σ_k as in Eq. 5")
    init: Literal["fresh", "teacher"] = Field("fresh", description="NOTES.md: fresh weights (option: teacher's)")
    epochs: int | None = Field(None, ge=1, description="default: trainer.max_epochs")


class DistillToLabel(Method):
    primary_stage = "student"

    class Config(StrictModel):
        name: Literal["distill_to_label"] = "distill_to_label"
        encoder: EncoderConfig = Field(default_factory=EncoderConfig)
        model: ModelSection = Field(
            default_factory=lambda: model_config({"name": "abmil", "gated": True}),
            description="gated-attention MIL, Eq. 1–2",
        )
        teacher: TeacherConfig = Field(default_factory=TeacherConfig)
        student: StudentConfig = Field(default_factory=StudentConfig)
        baseline: bool = Field(True, description="also train plain ABMIL (Tables I–II 'MIL [11]')")
        train_student: bool = Field(True, description="false: stop after the teacher (Fig. 2 runs)")
        baseline_epochs: int | None = Field(None, ge=1)

    def build_model(self) -> MILModel:
        return build_mil_model(self.cfg.model, self.cfg.encoder)

    def stages(self) -> list[str]:
        return (["abmil"] if self.cfg.baseline else []) + ["teacher"] + (["student"] if self.cfg.train_student else [])

    # -- stages ---------------------------------------------------------------------
    def _teacher_loss(self, data_range: tuple[float, float]):
        t = self.cfg.teacher
        use = {"noise": t.use_noise and t.lambda_n > 0, "perturbation": t.use_perturbation and t.lambda_delta > 0,
               "entropy": t.use_entropy and t.lambda_e > 0}
        weights = {"classification": t.lambda_c, "noise": t.lambda_n, "perturbation": t.lambda_delta, "entropy": t.lambda_e}

        def loss_fn(model: MILModel, batch: BagBatch) -> tuple[Tensor, dict[str, Tensor]]:
            encode, head = split_model(model)
            terms = vat_mil_terms(
                encode,
                head,
                batch.instances,
                batch.mask,
                batch.labels,
                noise_fraction=t.noise_fraction,
                data_range=data_range,
                delta=t.delta,
                perturbation=t.perturbation,
                xi=t.xi,
                power_iterations=t.power_iterations,
                subbag_fraction=t.subbag_fraction,
                subbag_realisations=t.subbag_realisations,
                use=use,
                radius=t.radius,
                adj=batch.adj,
            )
            loss = sum(weights[k] * v for k, v in terms.items())
            return loss, {k: v.detach() for k, v in terms.items()}

        return loss_fn

    def fit(self, splits: DataSplits, run) -> dict[str, Labeler]:
        tr, seed = self.exp.trainer, self.exp.seed
        train = bag_loader(splits.train, tr, shuffle=True, seed=seed)
        val = bag_loader(splits.val, tr, shuffle=False)
        labelers: dict[str, Labeler] = {}
        if self.cfg.baseline:
            base = self.build_model()
            fit_stage(BagModule(base, mil_loss, tr), train, val, run.stage_dir("abmil"), tr, seed,
                      max_epochs=self.cfg.baseline_epochs)
            labelers["abmil"] = Labeler(base, "model")
        teacher = self.build_model()
        fit_stage(BagModule(teacher, self._teacher_loss(data_range(splits.train)), tr), train, val,
                  run.stage_dir("teacher"), tr, seed, max_epochs=self.cfg.teacher.epochs)
        labelers["teacher"] = Labeler(singleton_view(teacher), "singleton")
        if not self.cfg.train_student:
            return labelers
        student = copy.deepcopy(teacher) if self.cfg.student.init == "teacher" else self.build_model()
        fit_stage(StudentModule(student, freeze(copy.deepcopy(teacher)), self.cfg.student, tr), train, val,
                  run.stage_dir("student"), tr, seed, max_epochs=self.cfg.student.epochs)
        labelers["student"] = Labeler(singleton_view(student), "singleton")
        return labelers

    def load(self, run) -> dict[str, Labeler]:
        modes = {"abmil": "model", "teacher": "singleton", "student": "singleton"}
        out = {}
        for stage in self.stages():
            model = restore_submodule(self.build_model(), run.model_path(stage))
            model = singleton_view(model) if modes[stage] == "singleton" else model
            out[stage] = Labeler(model, modes[stage], run.read_threshold(stage).get("threshold"))
        return out


def split_model(model: MILModel):
    """(encode, head(h, mask, adj)) of a model: its own split when it has one, else identity + whole model
    (which then gets the bag graphs, e.g. SmAP)."""
    if isinstance(model, EmbeddingMILModel):
        return model.encode, lambda h, m, adj=None: model.head(h, m).bag_logits
    return (lambda x, m: x), (lambda x, m, adj=None: model(x, m, adj).bag_logits)


class SingletonView(MILModel):
    """A MIL model that scores each instance as a bag of size one (§III-C) by running the
    whole model on B·N one-instance bags (each with a one-node graph, no edge), for
    models without their own ``instance_logits`` (DSMIL, CLAM, TransMIL, DTFD, SmAP …)."""

    def __init__(self, model: MILModel):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, mask: Tensor | None = None, adj: object | None = None):  # noqa: D102
        return self.model(x, mask, adj)

    def instance_logits(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        from milkit.data.graph import BagGraph
        from milkit.models.base import full_mask

        mask = full_mask(x, mask)
        b, n = mask.shape
        real = x[mask].unsqueeze(1)  # (M, 1, ...)
        one = BagGraph(1, torch.zeros(2, 0, dtype=torch.long, device=x.device), torch.zeros(0, device=x.device))
        logits = []
        for chunk in real.split(256):
            logits.append(self.model(chunk, None, [one] * chunk.shape[0]).bag_logits)
        out = x.new_zeros(b, n)
        out[mask] = torch.cat(logits).to(out.dtype) if logits else out.new_zeros(0)
        return out


def singleton_view(model: MILModel) -> MILModel:
    """``model`` itself when it scores single instances, else a :class:`SingletonView` of it."""
    if isinstance(model, EmbeddingMILModel) or type(model).instance_logits is not MILModel.instance_logits:
        return model
    return SingletonView(model)


def data_range(ds: BagDataset) -> tuple[float, float]:
    """(min, max) over every training instance: the range noise instances are drawn from (§III-B)."""
    lo = min(float(b.instances.min()) for b in ds)
    hi = max(float(b.instances.max()) for b in ds)
    return lo, hi


class StudentModule(BagModule):
    """Student stage: Eq. 5 against a frozen teacher held alongside (never optimised)."""

    def __init__(self, student: MILModel, teacher: MILModel, cfg: StudentConfig, trainer_cfg):
        super().__init__(student, self._loss, trainer_cfg)
        self.teacher = teacher
        self.scfg = cfg

    def on_train_epoch_start(self) -> None:
        self.teacher.eval()

    def _loss(self, model: MILModel, batch: BagBatch) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.scfg
        with torch.no_grad():
            t_out, t_inst = bag_and_instance_logits(singleton_view(self.teacher), batch.instances, batch.mask, batch.adj)
        s_out, s_inst = bag_and_instance_logits(singleton_view(model), batch.instances, batch.mask, batch.adj)
        t_bag, s_bag = t_out.bag_logits, s_out.bag_logits
        terms = student_terms(s_bag, t_bag, s_inst, t_inst, batch.labels, batch.mask, c.temperature,
                              c.instance_reduction)
        w = {"classification": c.gamma_c, "bag_kd": c.gamma_b, "instance_kd": c.gamma_i, "instance_entropy": c.gamma_e}
        return sum(w[k] * v for k, v in terms.items()), {k: v.detach() for k, v in terms.items()}

