"""Continual methods as components: one file each, on the interface of ``base`` (hooks with typed inputs and
outputs), composed by ``hf_r1ewc.continual.ContinualLearner``. A method file imports ``base`` and the layers below
(fisher, penalty, distill, pipeline), never another method."""

from .agem import AGEM
from .base import (
    ContinualMethod,
    Expected,
    ExtraBatch,
    Growth,
    SafetensorsFile,
    StepForward,
    TaskEnd,
    TaskStart,
    Term,
    TrainingSplit,
    check_tensors,
    compile_like_student,
    parameter_parts,
    task_folder_name,
)
from .dark_experience_replay import DarkExperienceReplay
from .ensemble import Ensemble
from .ewc import EWC
from .experience_replay import ExperienceReplay
from .generative_distillation import GenerativeDistillation
from .knowledge_distillation import KnowledgeDistillation
from .l2 import L2
from .lora import LoRA
from .mas import MAS
from .synaptic_intelligence import SynapticIntelligence


__all__ = [
    "AGEM",
    "DarkExperienceReplay",
    "Ensemble",
    "EWC",
    "ExperienceReplay",
    "L2",
    "LoRA",
    "MAS",
    "KnowledgeDistillation",
    "SynapticIntelligence",
    "ContinualMethod",
    "Expected",
    "ExtraBatch",
    "GenerativeDistillation",
    "Growth",
    "SafetensorsFile",
    "StepForward",
    "TaskEnd",
    "TaskStart",
    "Term",
    "TrainingSplit",
    "check_tensors",
    "compile_like_student",
    "parameter_parts",
    "task_folder_name",
]
