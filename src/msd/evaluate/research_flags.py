"""`msd-lmms-eval`: lmms-eval's command line, also accepting the research pipeline's MSD flags.

The research pipeline ran its own lmms-eval fork as

    accelerate launch -m lmms_eval --model llava_msd --model_args pretrained=M --msd_model_path D --use_msd ...

This entry point takes the same command line (with `-m msd.evaluate.research_flags` or `msd-lmms-eval` in place of
`-m lmms_eval`), turns `--msd_model_path D` into the model argument `draft=D`, drops `--use_msd` and hands the rest
to lmms-eval unchanged. Without `--use_msd` the draft is dropped too, so the same command measures plain decoding,
as the research flag did.

lmms-eval logs an error that stops an evaluation (a wrong model arg, a missing draft) and still exits with status 0.
This entry point exits with status 1 when that happened, so scripts and CI see the failure.
"""

from __future__ import annotations

import logging
import sys

from msd.errors import MSDError

logger = logging.getLogger(__name__)


def translate_arguments(argv: list[str]) -> list[str]:
    """Rewrite research-pipeline flags into lmms-eval's own: `--msd_model_path D` -> `--model_args ...,draft=D`."""
    arguments = list(argv)
    use_draft = "--use_msd" in arguments
    arguments = [argument for argument in arguments if argument != "--use_msd"]

    draft = None
    for index, argument in enumerate(arguments):
        if argument == "--msd_model_path":
            if index + 1 >= len(arguments):
                raise MSDError("--msd_model_path needs a value: the draft folder.")
            draft = arguments[index + 1]
            del arguments[index : index + 2]
            break
        if argument.startswith("--msd_model_path="):
            draft = argument.split("=", 1)[1]
            del arguments[index]
            break
    if use_draft and draft is None:
        raise MSDError("--use_msd needs --msd_model_path: the draft folder (from msd train or msd convert).")
    if not use_draft or draft is None:
        return arguments

    for index, argument in enumerate(arguments):
        if argument == "--model_args" and index + 1 < len(arguments):
            arguments[index + 1] = f"{arguments[index + 1]},draft={draft}".lstrip(",")
            return arguments
        if argument.startswith("--model_args="):
            arguments[index] = f"{argument},draft={draft}"
            return arguments
    return arguments + ["--model_args", f"draft={draft}"]


def main() -> None:
    try:
        from lmms_eval.cli.dispatch import main as lmms_eval_main
    except ImportError:
        sys.exit('msd-lmms-eval: error: lmms-eval is not installed. Run: pip install -e ".[eval]" && '
                 "pip install --no-deps lmms-eval==0.7.3")
    try:
        sys.argv = [sys.argv[0]] + translate_arguments(sys.argv[1:])
    except MSDError as error:
        sys.exit(f"msd-lmms-eval: error: {error}")
    logger.debug("running lmms-eval with %s", sys.argv[1:])
    failures = count_failures()
    lmms_eval_main()
    if failures:
        sys.exit(f"msd-lmms-eval: error: {len(failures)} evaluation(s) failed; lmms-eval's log above names the cause.")


def count_failures() -> list:
    """Record each evaluation that raises inside lmms-eval, which logs it and carries on; returns the growing list.

    lmms-eval 0.7.3 runs each evaluation through `lmms_eval.__main__.cli_evaluate_single`, so that function is wrapped.
    NOTE: with an lmms-eval without that function nothing is recorded, and failures keep exit status 0.
    """
    import lmms_eval.__main__ as lmms_main

    failures = []
    evaluate = getattr(lmms_main, "cli_evaluate_single", None)
    if evaluate is None:
        return failures

    def recording(*args, **kwargs):
        try:
            return evaluate(*args, **kwargs)
        except Exception as error:
            failures.append(error)
            raise

    lmms_main.cli_evaluate_single = recording
    return failures


if __name__ == "__main__":
    main()
