"""`msd generate`: speculative generation for images and a prompt, with statistics and an optional comparison."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from msd.cli.options import (
    add_model_options,
    add_sampling_options,
    add_tree_options,
    check_device,
    check_output_file,
    fit_default_tree,
    sampling_from,
    tree_from,
)
from msd.errors import MSDError
from msd.files import atomic_write_text

#: new tokens of the untimed run before a --compare measurement
WARMUP_TOKENS = 8

DESCRIPTION = """\
Generate a response to one prompt and its images with speculative decoding. The response streams to standard
output, and statistics go to standard error. Without --draft the target decodes alone (plain decoding).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate a response to images and a prompt",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser)

    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="image file (PNG, JPEG, ...); repeat for several images. Place each with <image> in the prompt, "
        "or leave the prompt without <image> to put all images before the text",
    )
    parser.add_argument("--prompt", required=True, help="the user's request")
    parser.add_argument(
        "--raw-prompt",
        action="store_true",
        help="send --prompt to the processor unchanged, without the chat template; it must then contain the "
        "model's own image token once per image",
    )

    parser.add_argument("--max-new-tokens", type=int, default=256, help="maximum tokens to generate (default 256)")
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop once the generated text contains TEXT; repeatable. As in transformers' generate, the output "
        "keeps TEXT and ends with the token that completes it",
    )

    add_sampling_options(parser)
    add_tree_options(parser)

    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run plain decoding on the same input and print the speedup and whether both outputs are identical",
    )
    parser.add_argument("--no-stream", action="store_true", help="print the response once it is complete")
    parser.add_argument("--stats-json", metavar="FILE", help="also write the statistics as JSON to FILE")
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    from msd.decoding import SamplingParams, SpeculativeGenerator
    from msd.draft import DraftModel
    from msd.images import load_image
    from msd.prompts import build_inputs
    from msd.targets import load_target

    if arguments.max_new_tokens < 1:
        raise MSDError(f"--max-new-tokens must be at least 1, got {arguments.max_new_tokens}")
    if not arguments.prompt.strip():
        raise MSDError("--prompt is empty. Pass the request as text, for example --prompt \"Describe this picture.\"")
    if any(not stop for stop in arguments.stop):
        raise MSDError("--stop is empty. Pass the text that ends generation, for example --stop \"###\".")
    check_output_file(arguments.stats_json, "--stats-json")  # before decoding, so a bad path loses no work
    check_device(arguments.device)
    sampling = sampling_from(arguments)
    tree = tree_from(arguments)
    images = [load_image(path) for path in arguments.image]  # fail on a bad image before loading any model
    draft = None
    if arguments.draft:
        draft = DraftModel.from_pretrained(arguments.draft)  # the generator checks that it fits the target

    target = load_target(
        arguments.target, dtype=arguments.dtype, device=arguments.device, cpu_linear_rows=arguments.cpu_linear_rows
    )
    tree = fit_default_tree(tree, target, arguments)
    inputs = build_inputs(target.processor, arguments.prompt, images, raw_prompt=arguments.raw_prompt)
    generator = SpeculativeGenerator(target, draft, tree)
    tokenizer = generator.tokenizer
    if arguments.compare:
        # An untimed short run first, so that neither timed run pays for the first calls' kernel set-up alone.
        generator.generate(inputs, max_new_tokens=WARMUP_TOKENS, sampling=SamplingParams())

    stream = None
    if not arguments.no_stream:
        stream = _TextStream(tokenizer)
    seed = torch.Generator(device=target.device).manual_seed(arguments.seed)
    output = generator.generate(
        inputs,
        max_new_tokens=arguments.max_new_tokens,
        sampling=sampling,
        stop_strings=arguments.stop,
        generator=seed,
        on_tokens=stream,
    )
    if stream is not None:
        stream.finish()
    else:
        print(output.text)

    label = "msd" if draft is not None else "plain"
    _print_stats(label, output.stats)
    report = {label: output.stats.as_dict()}

    if arguments.compare:
        baseline = SpeculativeGenerator(target, None).generate(
            inputs,
            max_new_tokens=arguments.max_new_tokens,
            sampling=sampling,
            stop_strings=arguments.stop,
            generator=torch.Generator(device=target.device).manual_seed(arguments.seed),
        )
        _print_stats("plain", baseline.stats)
        speedup = baseline.stats.total_time / output.stats.total_time
        identical = baseline.token_ids == output.token_ids
        print(f"speedup over plain decoding: {speedup:.2f}x (end to end, same process)", file=sys.stderr)
        if sampling.do_sample:
            print(
                f"identical to plain decoding: {'yes' if identical else 'no'} (when sampling, msd keeps the target's "
                "distribution, not its exact tokens, so a difference is not an error)",
                file=sys.stderr,
            )
        else:
            print(f"identical to plain decoding: {'yes' if identical else 'NO'}", file=sys.stderr)
        report["plain"] = baseline.stats.as_dict()
        report["speedup"] = speedup
        report["identical"] = identical
        if not identical and not sampling.do_sample:
            _write_report(arguments.stats_json, report)
            return 1
    _write_report(arguments.stats_json, report)
    return 0


def _print_stats(label: str, stats) -> None:
    accepted = stats.accepted_lengths
    mean_accepted = sum(accepted) / len(accepted) if accepted else 0.0
    tau = f"{stats.tau:.2f}" if accepted else "n/a"  # no decoding forward when the first token ended generation
    if label == "plain":  # every target forward decodes one token, and nothing is drafted
        phases = f"decoding {stats.verify_time:.2f} s"
        acceptance = f"tau {tau} tokens per target forward"
    else:
        phases = f"drafting {stats.draft_time:.2f} s, verification {stats.verify_time:.2f} s"
        acceptance = f"tau {tau} tokens per target forward, mean accepted length {mean_accepted:.2f}"
    print(
        f"[{label}] {stats.new_tokens} tokens in {stats.total_time:.2f} s ({stats.tokens_per_second:.1f} tokens/s); "
        f"{acceptance}; prefill {stats.prefill_time:.2f} s, {phases}; stopped by {stats.stop_reason}",
        file=sys.stderr,
    )


def _write_report(path: str | None, report: dict) -> None:
    if path:
        atomic_write_text(Path(path), json.dumps(report, indent=2, allow_nan=False) + "\n")


class _TextStream:
    """Prints decoded text as tokens arrive, holding back an incomplete multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, tokens: list[int]) -> None:
        self.tokens += tokens
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return
        sys.stdout.write(text[self.printed :])
        sys.stdout.flush()
        self.printed = len(text)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        sys.stdout.write(text[self.printed :] + "\n")
        sys.stdout.flush()
