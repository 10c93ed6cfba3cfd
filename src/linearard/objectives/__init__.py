"""Training objectives: each consumes a `Batch` and a `TeacherStudent` and returns a scalar loss plus
float metrics; `ObjectiveSpec` is an objective as validated data (terms, weights, options) that
says what it reads and trains, and `build_objective` makes weighted combinations from one.

========== ======================================================================== ===============
name       loss                                                                     forwards
========== ======================================================================== ===============
ard        KL of the Q/Q, K/K, V/V relation rows, per layer (LinearARD; default)    teacher+student
cpt        next-token cross-entropy                                                 student
logits     KL of the next-token distributions                                       teacher+student
hidden     1 − cosine of hidden states at a few depths (LongReD-style)              teacher+student
attention  KL of the attention-map rows softmax(Q·Kᵀ·scale)                         teacher+student
========== ======================================================================== ===============

Example:
    >>> from linearard.objectives import build_objective
    >>> objective = build_objective("ard+cpt", weights={"cpt": 0.5}, relations={"q": 1, "k": 1})
    >>> loss, metrics = objective(ts, {"input_ids": ids, "attention_mask": mask})  # doctest: +SKIP
    >>> loss.backward()  # doctest: +SKIP
"""

from linearard.objectives.attention import AttentionDistillation, RelationDistillation
from linearard.objectives.base import Batch, Objective, Step, run_steps, select_layers
from linearard.objectives.combine import WeightedSum, build_objective
from linearard.objectives.hidden import HiddenDistillation
from linearard.objectives.language import LogitDistillation, NextToken
from linearard.objectives.spec import DEFAULT_OBJECTIVE, OBJECTIVES, ObjectiveSpec, Reads, Term

__all__ = [
    "DEFAULT_OBJECTIVE",
    "OBJECTIVES",
    "AttentionDistillation",
    "Batch",
    "HiddenDistillation",
    "LogitDistillation",
    "NextToken",
    "Objective",
    "ObjectiveSpec",
    "Reads",
    "RelationDistillation",
    "Step",
    "Term",
    "WeightedSum",
    "build_objective",
    "run_steps",
    "select_layers",
]
