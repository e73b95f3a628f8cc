"""Search to Distill (AKD, Liu et al. CVPR 2020): the student architecture that distils best
from a given teacher, searched with the cohort as the evaluation engine.

Modules: space (the factorised search space, torch-free), settings (the `search:` config section,
torch-free), controller (LSTM policy: PPO, REINFORCE, random), reward, measure (latency, FLOPs,
parameters), evaluate (a round of candidates as one cohort), engine (the resumable loop), report
(search.jsonl -> Pareto plot, report.md, best.yaml), retrain.

Nothing is imported here: `dml_cluster.models.searched` imports the space without the engine.
"""
