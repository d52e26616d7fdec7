"""Building the requested bench methods from model paths, and dropping the ones transformers cannot run here."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from msd.decoding import SpeculativeGenerator, TreeParams
from msd.draft import DraftModel
from msd.errors import MSDError
from msd.evaluate.methods import METHOD_NAMES, EngineMethod, GenerationLimits, Method, TransformersMethod
from msd.targets.base import TargetAdapter

logger = logging.getLogger(__name__)

PROBE_TOKENS = 4
#: transformers methods that verify their first candidates in the prompt's forward
FUSED_PROMPT_METHODS = ("prompt-lookup", "assisted")
FUSED_PROMPT_REASON = (
    "transformers verifies its first candidates in the same forward as the prompt, and the target's batch-invariant "
    "bfloat16 kernels give those tokens the prompt's rounding, so its output may differ from plain decoding. Run it "
    "with --dtype float32."
)


def build_methods(
    target: TargetAdapter,
    names: Sequence[str],
    tree: TreeParams,
    drafts: Mapping[str, DraftModel | None],
    assistant=None,
    prompt_lookup_tokens: int = 10,
) -> list[Method]:
    """Build the methods in `names`, plain first. drafts maps "msd" and "eagle" to their draft models."""
    unknown = [name for name in names if name not in METHOD_NAMES]
    if unknown:
        raise MSDError(f"unknown bench method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}.")
    tokenizer = getattr(target.processor, "tokenizer", target.processor)
    methods: list[Method] = [EngineMethod("plain", SpeculativeGenerator(target, None, tree, tokenizer))]
    for name in [name for name in METHOD_NAMES if name in names and name != "plain"]:
        if name in ("msd", "eagle"):
            draft = drafts.get(name)
            if draft is None:
                raise MSDError(f"method {name} needs a draft: pass --{'draft' if name == 'msd' else 'eagle-draft'}.")
            check_draft_kind(name, draft)
            methods.append(EngineMethod(name, SpeculativeGenerator(target, draft, tree, tokenizer)))
        elif name == "generate":
            methods.append(TransformersMethod(name, target, tokenizer))
        elif name == "prompt-lookup":
            methods.append(TransformersMethod(name, target, tokenizer, prompt_lookup_num_tokens=prompt_lookup_tokens))
        elif assistant is None:
            raise MSDError("method assisted needs a small draft model of the target's family: pass --assistant.")
        else:
            methods.append(TransformersMethod(name, target, tokenizer, assistant_model=assistant))
    return methods


def check_draft_kind(name: str, draft: DraftModel) -> None:
    """msd takes a draft that decouples visual tokens; eagle, the ablation, takes one that does not."""
    expected = name == "msd"
    if draft.config.decouple_visual != expected:
        flag = "--eagle-draft" if expected else "--draft"
        raise MSDError(
            f"the {name} method needs a draft with decouple_visual={expected}, but this draft has "
            f"decouple_visual={draft.config.decouple_visual}. Pass it with {flag} instead"
            + ("." if expected else ", or convert the ablation's research checkpoint with msd convert "
               "--no-decouple-visual.")
        )


def drop_unsupported(
    methods: list[Method], inputs: Mapping[str, torch.Tensor], requested: bool = True
) -> tuple[list[Method], dict]:
    """Try each transformers method on one sample; returns the methods that ran and {name: error} for the rest.

    transformers' prompt-lookup and assisted decoding do not support every vision-language model (for example, in
    transformers 5.25 prompt lookup fails on LLaVA, which re-checks image tokens against features on each step).
    requested: the user named the methods. A default method that cannot be exact on this target is then skipped with
    an info line instead of a warning (the report gives the reason either way).
    """
    kept, skipped = [], {}
    for method in methods:
        fused = isinstance(method, TransformersMethod) and method.name in FUSED_PROMPT_METHODS
        if fused and method.target.max_tree_tokens is not None:
            logger.log(logging.WARNING if requested else logging.INFO, "skipping %s: %s", method.name,
                       FUSED_PROMPT_REASON)
            skipped[method.name] = FUSED_PROMPT_REASON
            continue
        if isinstance(method, TransformersMethod):
            try:
                method.run(inputs, GenerationLimits(PROBE_TOKENS))
            except (ValueError, RuntimeError, TypeError, NotImplementedError) as error:
                logger.warning("skipping %s: transformers cannot run it on this target: %s", method.name, error)
                skipped[method.name] = f"{type(error).__name__}: {error}"
                continue
        kept.append(method)
    return kept, skipped
