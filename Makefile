# rlhf-pipeline: `make all` runs the InstructGPT recipe on the embedded default world.
# Variables: RUN (run directory), PROFILE (stage config profile), LAUNCH (python | torchrun ... | accelerate launch ...),
# ARGS (extra `--key value` overrides passed to the stage), EVAL_ARGS (options for `make eval`),
# COMPARISONS_ARGS (options for `make comparisons` and `make round`), ROUND and ROUND_TRAIN (`make round`),
# SEED and WORLD_ARGS (the world `make data` writes: `python -m world --help`).
RUN ?= runs/default
PROFILE ?= default
LAUNCH ?= python
ARGS ?=
EVAL_ARGS ?=
COMPARISONS_ARGS ?= --prompts 300 --k 6
SEED ?= 0
WORLD_ARGS ?=
ROUND ?= 1
ROUND_TRAIN ?= $(RUN)/world/comparisons_train.jsonl
STAGE ?= ppo
PROMPT ?= Who is the most famous person in the world?
VENV ?= .venv
PY := $(VENV)/bin/python
# Commands run from the venv so `python`, `torchrun` and `accelerate` are the project's own.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

STAGE_CMD = $(LAUNCH) -m stages.$(1) --profile $(PROFILE) --run_dir $(RUN) $(ARGS)

.PHONY: setup all data pretrain sft comparisons reward check-human round label browser ppo grpo dr_grpo rloo reinforce_pp eval report methods methods-quick chat compare lint test test-fast bench bench-pretrain bench-ppo bench-grpo check-tokenizers clean

setup: $(VENV)/.installed

# CPU-only machines get the small CPU build of torch first; a later `torch>=2.x` requirement keeps it.
# Machines with an NVIDIA driver keep pip's default (CUDA) build. TORCH_SPEC overrides.
TORCH_SPEC ?= torch==2.13.0
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "no GPU found: installing CPU torch ($(TORCH_SPEC))"; \
		$(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

all: data pretrain sft comparisons reward ppo eval report

data: setup
	$(PY) -m world --seed $(SEED) --out $(RUN)/world --if_missing true $(WORLD_ARGS)

pretrain: setup data
	$(call STAGE_CMD,pretrain)

sft: setup data
	$(call STAGE_CMD,sft)

# InstructGPT's loop: answers sampled from RUN/sft, ranked by the world's labeler, for the reward model.
comparisons: setup data
	$(PY) -m reward.comparisons sample --run_dir $(RUN) $(COMPARISONS_ARGS)

# Rankings of your own (`make label` appends them to RUN/comparisons/human.jsonl): HUMAN=also adds them to
# the reward stage's comparisons, HUMAN=only trains on them alone; `make reward` and `make round` alike.
HUMAN ?=
HUMAN_FILE = $(RUN)/comparisons/human.jsonl
HUMAN_TRAIN = $(if $(filter also,$(HUMAN)),--train_files + $(HUMAN_FILE),$(if $(filter only,$(HUMAN)),--train_files $(HUMAN_FILE)))
check-human:
	@case "$(HUMAN)" in ""|also|only) ;; *) echo "HUMAN must be also or only, got '$(HUMAN)'"; exit 2;; esac
	@if [ -n "$(HUMAN)" ] && [ ! -s $(HUMAN_FILE) ]; then \
		echo "no rankings in $(HUMAN_FILE): rank answers first with \`make label RUN=$(RUN)\`"; exit 2; fi

reward: setup data check-human
	$(call STAGE_CMD,reward) $(HUMAN_TRAIN)

# DPO (Rafailov et al. 2023): RUN/sft tuned on the reward stage's comparisons directly, no reward model.
dpo: setup data
	$(call STAGE_CMD,dpo)

# Another round of the loop on a finished run (InstructGPT collected comparisons on its current
# policies): RUN/ppo's answers ranked by the labeler into comparisons/ppo_round$(ROUND).jsonl, the
# reward model retrained on every comparison file so far, PPO again from the SFT model. Count ROUND
# up from 1; each round replaces RUN/reward and RUN/ppo, and a rerun of the same ROUND resumes it
# (its comparisons, once written, are kept: RUN/ppo is by then the policy of the next round).
ROUND_FILE = $(RUN)/comparisons/ppo_round$(ROUND).jsonl
# HUMAN=also adds RUN/comparisons/human.jsonl to them; HUMAN=only trains the reward model on it alone
# (rank RUN/ppo's answers in `make label` first) and samples nothing for the labeler.
round: setup data check-human
ifeq ($(HUMAN),only)
	$(call STAGE_CMD,reward) --train_files $(HUMAN_FILE)
else
	@if [ -f $(ROUND_FILE) ]; then echo "[comparisons] up to date: $(ROUND_FILE) (sampled by this round before)"; \
	else $(PY) -m reward.comparisons sample --run_dir $(RUN) --model $(RUN)/ppo --out $(ROUND_FILE) $(COMPARISONS_ARGS); fi
	$(call STAGE_CMD,reward) --train_files $(ROUND_TRAIN) $$(ls $(RUN)/comparisons/*.jsonl | grep -v '/human\.jsonl$$') \
		$(if $(filter also,$(HUMAN)),$(HUMAN_FILE))
endif
	$(call STAGE_CMD,ppo)

ppo: setup data
	$(call STAGE_CMD,ppo)

# The RL stage with another advantage estimator and no critic, from the same SFT and reward models:
# RUN/grpo, RUN/rloo, ... (stages/<method>/profiles). `make eval` and `make report` take each one present.
grpo dr_grpo rloo reinforce_pp: setup data
	$(call STAGE_CMD,$@)

# Which method wins: every method after SFT (and best-of-n) from one SFT and reward model per world, at
# three KL settings, on worlds --seed 0/1/2; RUN/methods.md. METHODS_ARGS: `python -m evaluation.methods --help`.
METHODS_ARGS ?=
methods: setup data
	$(PY) -m evaluation.methods --run_dir $(RUN) --profile $(PROFILE) $(METHODS_ARGS)

# The first look: one world (RUN's), each method's default only.
methods-quick: setup data
	$(PY) -m evaluation.methods --run_dir $(RUN) --profile $(PROFILE) --quick true $(METHODS_ARGS)

eval: setup
	$(PY) -m evaluation.evaluate --run_dir $(RUN) $(EVAL_ARGS)

report: setup
	$(PY) -m evaluation.report --run_dir $(RUN)

chat: setup
	$(PY) -m evaluation.chat --model $(RUN)/$(STAGE) $(ARGS)

# A local page (http://127.0.0.1:7860/) to rank every finished stage's answers to a prompt, appended to
# RUN/comparisons/human.jsonl for `make reward HUMAN=also`, and to read RUN/report.md. ARGS: `python -m evaluation.label --help`.
label: setup
	$(PY) -m evaluation.label --run_dir $(RUN) $(ARGS)

compare: setup
	$(PY) -m evaluation.chat --run_dir $(RUN) --compare "$(PROMPT)" $(ARGS)

# The browser test (tests/test_label.py) drives Debian's Chromium through Playwright: installed here when
# missing and the machine allows it (root or sudo, apt); where it cannot be, that one test skips and says so.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
		echo "installing Chromium for the browser test (apt)"; \
		( $$SUDO apt-get install -y -q chromium || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; } ) >/dev/null 2>&1 \
		|| echo "could not install Chromium: the browser test will skip"; }

# The whole suite, offline. pytest's exit 5 ("no tests collected") is a failure, not a pass.
test: setup browser
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -p no:cacheprovider $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected"; exit 1; fi; exit $$rc

# Style and layering: ruff (pyproject's rules) and import-linter's layers contract.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

# Everything but the multi-process, DeepSpeed, SIGKILL and whole-chain tests: the edit loop. These are
# single-process tests on one torch thread each, so pytest-xdist spreads them over every core.
test-fast: setup
	$(MAKE) --no-print-directory test ARGS="-m 'not slow' -n auto $(ARGS)"

bench: bench-pretrain bench-ppo

# ARGS="--nanogpt PATH --compile": beside nanoGPT's own train.py from a work tree you cloned.
bench-pretrain: setup data
	$(PY) -m bench.pretrain --run $(RUN) $(ARGS)

bench-ppo: setup
	$(PY) -m bench.ppo

bench-grpo: setup
	$(PY) -m bench.grpo

# The recipe on real Llama 3, Llama 2, Qwen2, Phi-3 and Gemma 4 tokenizers (downloads llama.cpp's vocabularies once).
check-tokenizers: setup
	$(PY) -m bench.real_tokenizers $(ARGS)

clean:
	rm -rf $(RUN)
