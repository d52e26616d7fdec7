"""Evaluation: `msd bench` (tau and wall-clock speedup against plain decoding) and the lmms-eval model plugin."""

from msd.evaluate.bench import BenchSettings, SampleRecord, processor_inputs, run_bench
from msd.evaluate.methods import EngineMethod, GenerationLimits, Method, MethodRun, TransformersMethod
from msd.evaluate.report import summarize, write_report
from msd.evaluate.samples import EvalSample, load_samples

__all__ = [
    "BenchSettings",
    "EngineMethod",
    "EvalSample",
    "GenerationLimits",
    "Method",
    "MethodRun",
    "SampleRecord",
    "TransformersMethod",
    "load_samples",
    "processor_inputs",
    "run_bench",
    "summarize",
    "write_report",
]
