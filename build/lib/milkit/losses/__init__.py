"""Every loss by its paper's name, one module per paper:

- bernoulli.py     BCE, Bernoulli KL (D2L Eq. 6), entropy
- vat_mil.py       Distill-to-Label teacher, Eq. 3 (VAT-MIL terms)
- distillation.py  Distill-to-Label student, Eq. 5
- dice.py, ikd.py  IKD-MIL Eq. 1–4
- maxmin.py        Max-Min uncertainty Eq. 7, 12, log-barrier
"""
