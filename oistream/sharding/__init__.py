"""The write side of oistream, in the order the data flows.

``catalog`` (class lists and the streaming segmentation CSV) -> ``plan`` (the seeded, deterministic
selection cut into shards) -> ``locate`` (each mask's member in its remote zip) -> ``fetch``
(async HTTP with retries) and ``remotezip`` (members read by range requests) -> ``shardjob`` (one
shard: fetch its images and masks, write it) -> ``writer`` (reproducible tars, atomic publish,
progress records) -> ``executors`` (local processes or Dask) -> ``run`` (the ``oistream shard``
command: plan, claim the output, run the jobs, write the manifest).
"""
