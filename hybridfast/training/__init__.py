"""The native trainer of `hybridfast train`, one concern per module (docs/training.md):

config      TrainConfig: every setting, its help text and its check (the CLI is generated from it)
batches     sampler tuples -> tokenised queries / passages / loss groups
steps       plain and GradCache steps; the update (all-reduce, clip, non-finite check)
checkpoint  atomic checkpoints with a manifest; pruning; verified resume
rundir      the output folder's ownership record and lock
resume      strict resume: the settings a checkpoint was made with, compared with this run
periodic_eval  evaluation at checkpoints and at the end, leaving training's RNG streams alone
signals     SIGINT / SIGTERM: finish the step, save a checkpoint, stop (Interrupted)
log         train_log.jsonl and TensorBoard
distributed torchrun process group and gradient averaging
loop        train(): prepare, check, load, lock, loop, finish
"""
from hybridfast.training.batches import Collator, batch_kind, prefetch
from hybridfast.training.checkpoint import CheckpointError, list_checkpoints
from hybridfast.training.config import TrainConfig
from hybridfast.training.loop import prepare, train
from hybridfast.training.rundir import OutputFolderError, RunFolder, run_status
from hybridfast.training.signals import Interrupted
from hybridfast.training.steps import TrainingDiverged, gradcache_step, plain_step

__all__ = ["TrainConfig", "train", "prepare", "Collator", "batch_kind", "prefetch", "plain_step", "gradcache_step",
           "list_checkpoints", "run_status", "RunFolder", "CheckpointError", "OutputFolderError", "TrainingDiverged", "Interrupted"]
