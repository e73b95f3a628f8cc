"""Cohort checkpoints: every peer's whole training state, saved atomically, and a manifest that
marks a step complete only once every peer of the cohort has its file in place.

Layout under the run folder (files are keyed by the peer's name, never by RANK)::

    checkpoints/step-000000120/<peer>.pt          torch.save of one peer's state
    checkpoints/step-000000120/<peer>.pt.sha256   its digest (`sha256sum -c` reads it)
    checkpoints/step-000000120/manifest.json      the cohort's: position, every peer's digest

Saving: each process writes its peers' files (temporary file, fsync, rename), the cohort confirms
over the control channel (dml_cluster.control) that every file is in place (the digests travel
with the confirmation, as bytes in a self-checking message), then every process writes the same
manifest and prunes to the newest `keep` complete steps. A step without a manifest is torn (a
peer died while saving) and is never loaded.

Resuming: every process lists the steps it has its peers' files for and the steps it sees a
manifest for; the cohort agrees on the newest step that every process has files for and some
process has a manifest for (on a shared folder all see the same manifests; on per-node disks a
process killed between the confirmation and its own manifest still has its file). Every process
then verifies its files of that step (each against its digest and the manifest, then
`torch.load`) and the cohort all-gathers the verdicts: if any process's file or manifest is
corrupt, truncated or unreadable, every process drops the step and tries the next older complete
one. Once one verifies everywhere, every peer loads it (its model, optimizer, schedule, extra
modules, loss scaler and random stream), the reporting process prints a warning line per skipped
step naming its bad file, and the steps after the loaded one are deleted (a later save writes
them again). A checkpoint of another run (config, cohort size, format) stops the cohort at once;
so does a folder where no complete step verifies, and then nothing is changed. These are our own
files on local disk, read with `torch.load(weights_only=True)`: tensors and plain types only.

The modules, one responsibility each:

- `files`: the files themselves: names, a peer's state and its format, writing a peer's file with
  its digest, reading and verifying files and manifests, loading a state into a peer.
- `process_rng`: the process's global RNGs (Python's, numpy's, torch's), saved with every file.
- `agreement`: the records the cohort exchanges to agree on a save and on a resume.
- `pruning`: which step folders exist and are complete; removing steps.
- `store`: `CohortCheckpoints`, which saves and restores a process's peers with the cohort.
"""

from dml_cluster.checkpoint.files import FORMAT, MANIFEST, Position
from dml_cluster.checkpoint.store import CohortCheckpoints, Restored

__all__ = ["FORMAT", "MANIFEST", "CohortCheckpoints", "Position", "Restored"]
