"""Training: the compiled update (train), and distillation to fewer steps through it.

``train`` (loss + one compiled update), ``objective`` (the diffusion loss and its
gradient in any dtype), ``parallel`` (a step's gradient over several CPU processes),
``losses`` (the distillation papers' math),
``student`` (a student trained on a distillation loss), ``stages`` (quality gates and
rollback), ``quality_gate`` (what a gate scores), ``progressive`` and ``consistency``
(the two methods), ``distill`` (the entry point ``diffnas distill`` calls).
"""
