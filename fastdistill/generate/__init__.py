"""Generation: the teacher (or any causal LM, sharded or not) samples continuations of templated prompts.

``sample`` is the one generation function of the recipe (datasets, weak labels, Socratic chains, on-policy samples);
``fastdistill generate`` writes its output as a resumable Parquet/JSONL dataset.
"""

from fastdistill.generate.core import Sample, SamplingConfig, continuation_logprobs, sample, unsharded
from fastdistill.generate.prompts import Codec, Prompt, PromptError, build_prompts, check_template, read_records
from fastdistill.generate.store import PartStore, load_generations

__all__ = [
    "Codec",
    "PartStore",
    "Prompt",
    "PromptError",
    "Sample",
    "SamplingConfig",
    "build_prompts",
    "check_template",
    "continuation_logprobs",
    "load_generations",
    "read_records",
    "sample",
    "unsharded",
]
