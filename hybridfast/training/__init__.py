"""The native trainer of `hybridfast train`, one concern per module (docs/architecture.md):

config      TrainConfig: every setting, its help text and its check (the CLI is generated from it)
batches     sampler tuples -> tokenised queries / passages / loss groups
steps       plain and GradCache steps; the update (all-reduce, clip, non-finite check)
checkpoint  atomic checkpoints with a manifest; pruning; verified resume
rundir      the output folder's ownership record and lock
log         train_log.jsonl and TensorBoard
distributed torchrun process group and gradient averaging
loop        train(): the loop itself
"""
from hybridfast.training.batches import Collator, batch_kind, prefetch
from hybridfast.training.checkpoint import CheckpointError, list_checkpoints
from hybridfast.training.config import TrainConfig
from hybridfast.training.loop import prepare, train
from hybridfast.training.rundir import OutputFolderError, run_status
from hybridfast.training.steps import TrainingDiverged, gradcache_step, plain_step

__all__ = ["TrainConfig", "train", "prepare", "Collator", "batch_kind", "prefetch", "plain_step", "gradcache_step",
           "list_checkpoints", "run_status", "CheckpointError", "OutputFolderError", "TrainingDiverged"]
