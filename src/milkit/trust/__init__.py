"""Trust in patch labels (issue 11 §3–5): calibrated probabilities (:mod:`.calibration`),
seed ensembles (:mod:`.ensemble`), the per-stage verdict and its rules (:mod:`.verdict`,
:mod:`.assess`) and the review regions of the most uncertain patches (:mod:`.review`)."""
