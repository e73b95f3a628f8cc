"""Moving probability vectors between peers. Knows nothing of models, losses, metrics or
checkpoints (the cohort agrees on those over dml_cluster.control).

Transports: `local` (all peers in one process), `zmq` (pyzmq sockets, discovery through the
torch.distributed store), `torch` (collectives over the default process group).
"""

from dml_cluster.bus.base import EVAL_ROUND, Bus, BusStats, StepKey

__all__ = ["EVAL_ROUND", "Bus", "BusStats", "StepKey"]
