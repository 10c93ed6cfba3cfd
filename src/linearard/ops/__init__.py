"""The relation-KL operator: KL(teacher ‖ student) between row-wise softmaxed relation matrices."""

from linearard.ops.functional import attention_kl, relation_kl, relation_operand

__all__ = ["attention_kl", "relation_kl", "relation_operand"]
