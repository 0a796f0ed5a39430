"""One job per GPU (`[job] jobs_per_instance = "gpus"`): an instance's GPUs and who holds them.

An instance's GPUs are the indices `nvidia-smi` listed at its last health check
(`InstanceRecord.gpu_indices`) where it answered, else `0 .. num_gpus-1` from the
API, else one GPU (index 0): an instance the API says nothing about still runs one
job. Its slots are `len(gpus) // gpus_per_job`; one with fewer GPUs than
`gpus_per_job` has no slot and gets no job (the dispatcher logs
`instance_too_few_gpus` once).

A job is given its indices when it is assigned (`JobRecord.gpus`, saved before its
upload); they are held while the instance holds the job (running or being collected)
and by an orphaned run of it (`OrphanRun.gpus`) until that run is settled; a job
given none (started before the switch to "gpus") holds them all. So after a
restart the saved assignments, not a new count, say which GPUs are taken, and no two
jobs held by an instance ever share a GPU. With an int `jobs_per_instance` no job
gets indices and nothing is exported: the job sees every GPU, as before.
"""

from __future__ import annotations

from collections.abc import Iterable

from vastd.core.records import InstanceRecord, JobRecord
from vastd.utils.config import JOBS_PER_GPU, JobSettings


def per_gpu(job: JobSettings) -> bool:
    """Whether jobs are placed one per GPU (each given its indices)."""
    return job.jobs_per_instance == JOBS_PER_GPU


def instance_gpus(inst: InstanceRecord) -> list[int]:
    """The instance's GPU indices: nvidia-smi's where it answered, else the API's count."""
    if inst.gpu_indices:
        return sorted(set(inst.gpu_indices))
    if inst.num_gpus is not None and inst.num_gpus >= 1:
        return list(range(inst.num_gpus))
    return [0]


def slots(job: JobSettings, inst: InstanceRecord) -> int:
    """How many jobs the instance may hold at once."""
    if isinstance(job.jobs_per_instance, int):
        return job.jobs_per_instance
    return len(instance_gpus(inst)) // job.gpus_per_job


def held_gpus(
    inst: InstanceRecord, held: Iterable[JobRecord], orphans: Iterable[JobRecord]
) -> set[int]:
    """GPU indices taken on the instance: by the jobs it holds (`held`: running there or
    being collected) and by the orphaned runs left on it (`orphans`)."""
    every = instance_gpus(inst)
    taken: set[int] = set()
    for job in held:
        if job.instance == inst.id:
            # given no indices (assigned before jobs_per_instance became "gpus"): it
            # sees every GPU, so it holds them all
            taken.update(job.gpus or every)
    for job in orphans:
        orphan = job.orphan_on(inst.id)
        if orphan is not None:
            taken.update(orphan.gpus or every)
    return taken


def pick_gpus(job: JobSettings, inst: InstanceRecord, taken: set[int]) -> list[int] | None:
    """The lowest `gpus_per_job` free indices of the instance, or None when too few are free."""
    free = [g for g in instance_gpus(inst) if g not in taken]
    if len(free) < job.gpus_per_job:
        return None
    return free[: job.gpus_per_job]


def gpu_list(gpus: Iterable[int]) -> str:
    """Indices as CUDA_VISIBLE_DEVICES and `{gpus}` write them: "0,1"."""
    return ",".join(str(g) for g in gpus)
