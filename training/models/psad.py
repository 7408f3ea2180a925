"""PSAD: UPN + semi-autoregressive teacher (PSAD-G) + scoring student (PSAD-S), trained jointly.

One forward pass computes the three losses of online distillation:
  perm     = the teacher's current greedy permutation (no gradient)
  teacher  = pointer loss of each slot given the prefix of perm: pick any remaining clicked item,
             or (teacher_target "shown") the click model of the displayed order inputs[SHOWN]
  student  = label loss of the student's scores (listwise softmax CE or BCE)
  distill  = student vs perm
  loss     = teacher + student + distill_weight * distill (+ the sid anchor, sid.py)
Online only UPN + student run (serving_module); the teacher stays for offline evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from export.contract.schema import FeatureSchema, ModelInputs
from training.models import losses
from training.models.config import ModelConfig
from training.models.reranker import Reranker
from training.models.sid import with_anchor
from training.models.student import Student
from training.models.teacher import Teacher, decode_steps
from training.models.upn import UPN

SHOWN = "shown_order"  # training batches only: [B,L] candidate index at each displayed rank (train.py)


class StudentScorer(nn.Module):
    """UPN + student: the model inputs, positionally in ModelInputs order -> scores [B,L].

    This is what export writes to ONNX. It shares the parameters of PSAD, plus a snapshot of the
    served item lookup (ItemEmbedding.served(), taken here: build the scorer after training): the item
    table, so the served graph makes one gather per item instead of one per side table, or the sid
    token lookup.
    """

    def __init__(self, upn: UPN, student: Student):
        super().__init__()
        self.upn = upn
        self.student = student
        self.items = upn.items.served()

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        x, u = self.upn(*tensors, served=self.items)
        return self.student(x, u, ModelInputs(*tensors).cand_mask)


class PSAD(Reranker):
    def __init__(self, cfg: ModelConfig, schema: FeatureSchema, item_cat: torch.Tensor, item_num: torch.Tensor):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.max_label = schema.max_label
        self.upn = UPN(cfg, schema, item_cat, item_num)
        self.teacher = Teacher(cfg, schema.max_list)
        self.student = Student(cfg)

    def _represent(
        self, inputs: dict[str, torch.Tensor], served: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.upn(*ModelInputs.from_batch(inputs), served=served)

    def forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        cfg, mask = self.cfg, inputs["cand_mask"]
        x, u = self._represent(inputs)
        scores = self.student(x, u, mask)
        enc = self.teacher.encode(x, mask)
        perm = self.teacher.decode(enc, u, mask)  # no_grad: the teacher's current greedy list
        if cfg.teacher_target == "shown":
            if SHOWN not in inputs:
                raise ValueError(
                    f'model.teacher_target = "shown" trains on inputs[{SHOWN!r}], the displayed order '
                    '(ListData.shown_order; `psad train` adds it): pass it, or train with teacher_target = "own"'
                )
            teacher = self.teacher.click_loss(enc, u, mask, labels, inputs[SHOWN])
        else:
            teacher = self.teacher.loss(enc, u, mask, labels, perm)
        if cfg.student_loss == "listwise":
            student = losses.listwise_softmax_loss(scores, labels, mask)
        else:
            student = losses.bce_loss(scores, labels / self.max_label, mask)
        if cfg.distill == "none":
            distill = scores.new_zeros(())
        elif cfg.distill == "listwise":
            distill = losses.listwise_distill_loss(scores, perm, mask, cfg.distill_top_k)
        else:
            mu = cfg.rd_mu if cfg.rd_dynamic and step >= cfg.rd_warmup_steps else None
            weights = losses.rd_weights(scores, perm, mask, cfg.rd_k, cfg.rd_lambda, mu)
            distill = losses.rd_distill_loss(scores, perm, weights, cfg.rd_alpha)
        total = teacher + student + cfg.distill_weight * distill
        return with_anchor(self, inputs, {"loss": total, "teacher": teacher, "student": student, "distill": distill})

    def rank_scores(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The student's scores [B,L], higher first; padded slots get student.PAD_SCORE."""
        return self.student(*self._represent(inputs), inputs["cand_mask"])

    @torch.no_grad()
    def teacher_decode(self, inputs: dict[str, torch.Tensor], served: nn.Module | None = None) -> torch.Tensor:
        """The teacher's greedy permutation [B,L]: perm[b, r] = candidate index at rank r. served: the
        item lookup (ItemEmbedding.served()) when the inputs hold what a bundle serves (shadow
        evaluation re-decodes recorded lists), None for data-set indices."""
        mask = inputs["cand_mask"]
        x, u = self._represent(inputs, served)
        return self.teacher.decode(self.teacher.encode(x, mask), u, mask)

    def decode_steps(self, list_length: int) -> int:
        return decode_steps(list_length, self.cfg.block_size)

    def serving_module(self) -> nn.Module:
        return StudentScorer(self.upn, self.student)
